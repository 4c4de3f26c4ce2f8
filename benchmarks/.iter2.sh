set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
O=${OUT:-out}
timeout 100 python3 -m pytest -m gpu -q -p no:cacheprovider tests/kernels/test_gemm.py -k fold 2>&1 | grep -E "passed|failed|FAILED|rel err" | head -20
V=graph,fused,fused-reuse,fused-prepass,fused-nofold,fused-nofold-nopdl
timeout 100 python3 benchmarks/fused_variants.py --model clip-vit-b-32 --batch 1 --variants $V --json $O/fv2-b32-1.json 2>&1 | grep -v Warn
timeout 100 python3 benchmarks/fused_variants.py --model clip-vit-b-32 --batch 32 --iters 25 --variants $V --json $O/fv2-b32-32.json 2>&1 | grep -v Warn

export PYTHONPATH=src PYTHONUNBUFFERED=1
timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider tests/kernels/test_gemm.py tests/test_fused.py -k "fold or statistic or real_presets" 2>&1 | grep -E "passed|failed|FAILED|^E " | head -12
for c in "clip-vit-b-32 1 50" "clip-vit-l-14 1 50" "clip-vit-b-32 32 25"; do set -- $c
timeout 90 python3 benchmarks/fused_variants.py --model $1 --batch $2 --iters $3 --variants graph,fused,fused-fold 2>&1 | grep -v Warn
done

#!/usr/bin/env bash
# Session 4 probe: deferred split-K reduction (out-proj / FC2 partial sums finished by the next LayerNorm launch),
# driver input copies, and the weight-resident batch-1 GEMM experiment. GPU tests of the new paths first.
# (Run at commit c70e58a: there "fused" let the cost model split more once the split tail was deferred, and
# "fused-defer-oldsplits" kept the old splits; the latter became the default, the former was removed.)
export PYTHONPATH=src PYTHONUNBUFFERED=1
R=/tmp/s4probe; mkdir -p $R
nvidia-smi --query-gpu=name --format=csv,noheader | tee $R/card.txt
pack() { tar czf $OUT/s4probe.tar.gz -C $R .; }
timeout 200 python3 -m pytest -q -m gpu -x tests/kernels/test_layernorm.py tests/kernels/test_gemm.py tests/test_fused.py \
  -k "partial or deferred or input_copies or pdl_prefetch or real_sizes or real_presets_gpu" 2>&1 | tail -6 | tee $R/tests.txt; pack
for m in clip-vit-b-32 siglip-base-patch16-224 clip-vit-b-16 clip-vit-l-14; do
  timeout 75 python3 benchmarks/fused_variants.py --model $m --batch 1 --variants graph,fused,fused-nodefer,fused-defer-oldsplits \
    --json $R/variants-$m-1.json 2>&1 | tail -6 | tee -a $R/variants.txt; pack
done
timeout 60 python3 benchmarks/call_overhead.py --model clip-vit-b-32 --batch 1 --json $R/call-b32-1.json 2>&1 | tail -14 | tee $R/call.txt; pack
if [ -f benchmarks/probe_ws_gemm.py ]; then
  timeout 170 python3 benchmarks/probe_ws_gemm.py --json $R/ws-gemm.json 2>&1 | tail -30 | tee $R/ws.txt; pack
fi

#!/usr/bin/env bash
# Probe (run on an H200, 2026-11-26, results in benchmarks/results/h200-2026-11-26/, most in git history at commit a54f250): TMA on by default for many rows; tile shapes under TMA at batch 32 (12-layer CUDA graphs), and the
# end-to-end effect at 32 + 32 next to the graph executor.
export PYTHONPATH=src PYTHONUNBUFFERED=1
R=/tmp/r8; mkdir -p $R
nvidia-smi --query-gpu=name --format=csv,noheader | tee $R/card.txt
T256='"BLOCK_M":128,"BLOCK_N":256,"BLOCK_K":64,"num_warps":8'
timeout 330 python3 benchmarks/kernel_bench.py --gemm-only --batches 32 --variants fused,torch \
  --extra 'notma:{"tma":false}' --extra 's4:{"num_stages":4}' --extra "t256:{$T256,\"num_stages\":3}" \
  --extra "t256s4:{$T256,\"num_stages\":4}" --extra 't128s4:{"BLOCK_M":128,"BLOCK_N":128,"BLOCK_K":64,"num_warps":8,"num_stages":4}' \
  --json $R/kernels-tma-tiles-b32.json 2>&1 | grep -v "to build" | tail -32
timeout 120 python3 benchmarks/fused_variants.py --model clip-vit-b-32 --batch 32 --iters 20 --variants graph,fused --json $R/variants-b32-32.json 2>&1 | tail -4
tar czf $OUT/r8.tar.gz -C $R .

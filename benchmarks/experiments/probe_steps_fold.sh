#!/usr/bin/env bash
# Probe (run on an H200, 2026-11-26, results in benchmarks/results/h200-2026-11-26/, most in git history at commit a54f250): with TMA, which batch-32 steps want 128x256 tiles (per-step configs, 12-layer CUDA graphs), and
# LayerNorm folding end to end at 32 + 32 (it removes 24 LayerNorm launches of 1600 / 2464 rows).
export PYTHONPATH=src PYTHONUNBUFFERED=1
R=/tmp/r9; mkdir -p $R
nvidia-smi --query-gpu=name --format=csv,noheader | tee $R/card.txt
W='{"BLOCK_M":128,"BLOCK_N":256,"BLOCK_K":64,"num_warps":8,"num_stages":3}'
timeout 200 python3 benchmarks/kernel_bench.py --gemm-only --models ViT-B/32,SigLIP-B/16 --batches 32 --variants fused \
  --extra "qkv256:{\"qkv\":$W}" --extra "fc1_256:{\"fc1\":$W}" --extra "out256:{\"out\":$W}" --extra "fc2_256:{\"fc2\":$W}" \
  --json $R/kernels-steps-b32.json 2>&1 | grep -v "to build" | tail -14
timeout 150 python3 benchmarks/fused_variants.py --model clip-vit-b-32 --batch 32 --iters 20 --variants graph,fused,fused-fold --json $R/variants-b32-32.json 2>&1 | tail -5
timeout 100 python3 benchmarks/fused_variants.py --model clip-vit-b-32 --batch 1 --variants graph,fused,fused-fold --json $R/variants-b32-1.json 2>&1 | tail -5
tar czf $OUT/r9.tar.gz -C $R .

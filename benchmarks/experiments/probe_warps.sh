#!/usr/bin/env bash
# Probe (run on an H200, 2026-11-26, results in benchmarks/results/h200-2026-11-26/, most in git history at commit a54f250): batch-1 GEMM launches are issue-latency bound (ncu: 1 warp per SM sub-partition, ~4 cycles per
# issued instruction, L2 ~20% busy). More warps per program / shorter K steps, in 12-layer CUDA graphs.
export PYTHONPATH=src PYTHONUNBUFFERED=1
R=/tmp/r6; mkdir -p $R
nvidia-smi --query-gpu=name --format=csv,noheader | tee $R/card.txt
timeout 250 python3 benchmarks/kernel_bench.py --models ViT-B/32,ViT-B/16,SigLIP-B/16,ViT-L/14 --batches 1 --gemm-only --variants fused \
  --extra 'w8:{"num_warps":8}' --extra 's5:{"num_stages":5}' --extra 's6:{"num_stages":6}' --extra 'w8s6:{"num_warps":8,"num_stages":6}' \
  --json $R/kernels-b1-warps.json 2>&1 | grep -v "to build" | tail -30
tar czf $OUT/r6.tar.gz -C $R .

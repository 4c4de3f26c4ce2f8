#!/usr/bin/env bash
# Probe (run on an H200, 2026-11-26, results in benchmarks/results/h200-2026-11-26/, most in git history at commit a54f250): where a batch-1 GEMM launch's time goes (Nsight Compute), and 128-row tiles at batch 1.
export PYTHONPATH=src PYTHONUNBUFFERED=1
R=/tmp/r4; mkdir -p $R
nvidia-smi --query-gpu=name --format=csv,noheader | tee $R/card.txt
timeout 240 ncu --kernel-name regex:_grouped_linear --launch-skip 4 --launch-count 8 --section SpeedOfLight \
  --section MemoryWorkloadAnalysis --section WarpStateStats --section LaunchStats --section Occupancy \
  python3 benchmarks/experiments/ncu_gemm_b1.py ViT-B/32 '{"BLOCK_M": 128}' > $R/ncu-b32-b1.txt 2>&1; echo "ncu rc $?"
grep -E "config|Duration|Memory Throughput|L2 Cache Throughput|DRAM Throughput|Compute \(SM\)|Registers|Achieved Occupancy|Stall|Warp Cycles Per Issued" $R/ncu-b32-b1.txt | head -120
timeout 200 python3 benchmarks/kernel_bench.py --models ViT-B/32,ViT-B/16,SigLIP-B/16,ViT-L/14 --batches 1 --gemm-only --variants fused \
  --extra 'bm128:{"BLOCK_M":128}' --extra 'bm128w8:{"BLOCK_M":128,"num_warps":8}' \
  --json $R/kernels-b1-bm128.json 2>&1 | grep -v "to build" | tail -14
tar czf $OUT/r4.tar.gz -C $R .

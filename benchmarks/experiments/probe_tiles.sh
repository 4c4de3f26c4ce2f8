#!/usr/bin/env bash
# Tile-rule probe (run on an H200, 2026-11-26): ViT-L/14 batch 1 in an 8-SM green context (M = 257 pads 3 128-row tiles to 384
# rows), and per-step tile choices at batch 32 (ViT-B/32, SigLIP-B/16), all in 12-layer CUDA graphs.
export PYTHONPATH=src PYTHONUNBUFFERED=1
R=/tmp/r3; mkdir -p $R
nvidia-smi --query-gpu=name --format=csv,noheader | tee $R/card.txt
W256='{"BLOCK_M":128,"BLOCK_N":256,"BLOCK_K":64,"num_warps":8,"num_stages":3}'
W64x256='{"BLOCK_M":64,"BLOCK_N":256,"BLOCK_K":64,"num_warps":8,"num_stages":3}'
W64x128='{"BLOCK_M":64,"BLOCK_N":128,"BLOCK_K":64,"num_warps":4,"num_stages":3}'
W128='{"BLOCK_M":128,"BLOCK_N":128,"BLOCK_K":64,"num_warps":8,"num_stages":3}'
timeout 200 python3 benchmarks/kernel_bench.py --models ViT-L/14 --batches 1 --gemm-only --sms 8 --replays 40 --variants fused,torch \
  --extra "t128x256:$W256" --extra "t64x256:$W64x256" --extra "t64x128:$W64x128" --extra "t128x128:$W128" \
  --json $R/kernels-l14-b1-sms8.json 2>&1 | grep -v "to build" | tail -9
timeout 200 python3 benchmarks/kernel_bench.py --models ViT-B/32,SigLIP-B/16 --batches 32 --gemm-only --variants fused,torch \
  --extra "out_fc2_256:{\"out\":$W256,\"fc2\":$W256}" --extra "qkv_fc1_256:{\"qkv\":$W256,\"fc1\":$W256}" \
  --extra "qkv_256:{\"qkv\":$W256}" --extra "fc1_256:{\"fc1\":$W256}" --extra "all_64x256:$W64x256" \
  --json $R/kernels-b32-steps.json 2>&1 | grep -v "to build" | tail -16
tar czf $OUT/r3.tar.gz -C $R .

#!/usr/bin/env bash
# Session 4 probe: Triton's automatic warp specialization (Hopper) for the batch-32 GEMMs (config "warp_specialize":
# device-side descriptors, one top-level K loop, producer + 2 consumer warp groups). GPU tests, per-layer GEMM
# times of the four architectures at batch 32 against the default in the same process, ViT-B/32 32+32 end to end.
# (Run at commit 14c7e78: the warp-specialized path was reverted after this probe; the kernel config
# key "warp_specialize" and the fused_variants entries fused-ws128 / fused-ws256 no longer exist.)
export PYTHONPATH=src PYTHONUNBUFFERED=1
R=/tmp/ws32; mkdir -p $R
nvidia-smi --query-gpu=name --format=csv,noheader | tee $R/card.txt
pack() { tar czf $OUT/ws32.tar.gz -C $R .; }
timeout 120 python3 -m pytest -q -m gpu -x tests/kernels/test_gemm.py -k "warp_specialized or tma_real" 2>&1 | tail -4 | tee $R/tests.txt; pack
C='"tma":true,"warp_specialize":true,"num_warps":4,"BLOCK_K":64'
timeout 300 python3 benchmarks/kernels.py --gemm-only --batches 32 --variants fused \
  --extra "ws128:{$C,\"BLOCK_M\":128,\"BLOCK_N\":128,\"num_stages\":4}" \
  --extra "ws256:{$C,\"BLOCK_M\":128,\"BLOCK_N\":256,\"num_stages\":3}" \
  --extra "ws64:{$C,\"BLOCK_M\":64,\"BLOCK_N\":256,\"num_stages\":4}" \
  --json $R/kernels-ws-b32.json 2>&1 | grep -v "to build" | tail -22 | tee $R/kernels.txt; pack
timeout 120 python3 benchmarks/fused_variants.py --model clip-vit-b-32 --batch 32 --iters 20 --rounds 3 \
  --variants graph,fused,fused-ws128,fused-ws256 --json $R/variants-b32-32.json 2>&1 | tail -6 | tee $R/variants.txt; pack

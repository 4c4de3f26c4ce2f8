#!/usr/bin/env bash
# Probe (run on an H200, 2026-11-26, results in benchmarks/results/h200-2026-11-26/, most in git history at commit a54f250): x / w tiles by tensor descriptors (TMA, config {"tma": true}) vs pointer loads, GEMM steps of
# all four architectures at batch 1 and 32 in 12-layer CUDA graphs; GPU tests of the TMA path first.
export PYTHONPATH=src PYTHONUNBUFFERED=1
R=/tmp/r7; mkdir -p $R
nvidia-smi --query-gpu=name --format=csv,noheader | tee $R/card.txt
timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider tests/kernels/test_gemm.py -k tma 2>&1 | tail -15 | tee $R/tests.txt
timeout 360 python3 benchmarks/kernel_bench.py --gemm-only --variants fused,torch \
  --extra 'tma:{"tma":true}' --extra 'tmaw8:{"tma":true,"num_warps":8}' \
  --json $R/kernels-tma.json 2>&1 | grep -v "to build" | tail -34
tar czf $OUT/r7.tar.gz -C $R .

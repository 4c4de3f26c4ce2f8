#!/usr/bin/env bash
# Probe (run on an H200, 2026-11-26, results in benchmarks/results/h200-2026-11-26/, most in git history at commit a54f250): attention block configs (batch 1 and 32, all four architectures), and TMA on/off at batch 1 and 32
# with the new defaults (TMA for skinny M only where every problem has <= 128 rows).
export PYTHONPATH=src PYTHONUNBUFFERED=1
R=/tmp/r10; mkdir -p $R
nvidia-smi --query-gpu=name --format=csv,noheader | tee $R/card.txt
timeout 260 python3 benchmarks/kernels_attention.py --sweep --json $R/attention-sweep.json 2>&1 | grep -E "^==|best|fused  |sdpa" | tail -40
timeout 200 python3 benchmarks/kernel_bench.py --gemm-only --variants fused --extra 'notma:{"tma":false}' --extra 'tma:{"tma":true}' \
  --json $R/kernels-tma-ab.json 2>&1 | grep -v "to build" | tail -28
tar czf $OUT/r10.tar.gz -C $R .

#!/usr/bin/env bash
# Probe (run on an H200, 2026-11-26, results in benchmarks/results/h200-2026-11-26/, most in git history at commit a54f250): host vs GPU time of a fused call (after the validation hot path), and the cost of one
# dependency (launch / launch + PDL / in-kernel waits) with the final sync_cost.py.
export PYTHONPATH=src PYTHONUNBUFFERED=1
R=/tmp/r12; mkdir -p $R
nvidia-smi --query-gpu=name --format=csv,noheader | tee $R/card.txt
timeout 150 python3 benchmarks/call_overhead.py --model clip-vit-b-32 --batch 1 --json $R/call-b32-1.json 2>&1 | tail -16
timeout 100 python3 benchmarks/sync_cost.py --json $R/sync-cost.json 2>&1 | tail -10
tar czf $OUT/r12.tar.gz -C $R .

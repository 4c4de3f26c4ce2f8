#!/usr/bin/env bash
# Session 3 probe (kernel since removed: run it at commit c99e361): the persistent TMA GEMM kernel (config persistent)
# at batch 32, 12-layer CUDA graphs, after its
# GPU tests.
export PYTHONPATH=src PYTHONUNBUFFERED=1
R=/tmp/r11; mkdir -p $R
nvidia-smi --query-gpu=name --format=csv,noheader | tee $R/card.txt
timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider tests/kernels/test_gemm.py -k "persistent or tma" 2>&1 | tail -6 | tee $R/tests.txt
timeout 300 python3 benchmarks/kernels.py --gemm-only --batches 32 --variants fused,torch \
  --extra 'pers:{"persistent":true}' --extra 'pers_noflat:{"persistent":true,"flatten":false}' \
  --extra 'pers_s4:{"persistent":true,"num_stages":4}' \
  --json $R/kernels-persistent.json 2>&1 | grep -v "to build" | tail -24
tar czf $OUT/r11.tar.gz -C $R .

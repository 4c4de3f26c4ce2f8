#!/usr/bin/env bash
# One device call for a development iteration: A/B of the fused executor's options (same process as the graph
# baseline), per-stage times, then the GPU tests. Logs and JSON go to $OUT.
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
O=${OUT:-out}; mkdir -p "$O"
step() { local t=$1; shift; echo "=== $(date +%T) $*" | tee -a "$O/log.txt"
  timeout "$t" "$@" 2>&1 | grep -v "Warning\|warn_once\|^\s*$" | tail -${TAIL:-30} | tee -a "$O/log.txt"; }
nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$O/card.txt"
step 60 python3 benchmarks/fused_variants.py --model clip-vit-b-32 --batch 1 --json "$O/fv-b32-1.json"
step 90 python3 benchmarks/fused_variants.py --model clip-vit-l-14 --batch 1 --json "$O/fv-l14-1.json"
step 60 python3 benchmarks/fused_variants.py --model clip-vit-b-32 --batch 32 --iters 25 --json "$O/fv-b32-32.json"
step 60 python3 benchmarks/fused_variants.py --model siglip-base-patch16-224 --batch 1 --variants graph,fused,fused-nopdl,fused-fold --json "$O/fv-siglip-1.json"
TAIL=40 step 240 python3 -m pytest -m gpu -q -p no:cacheprovider tests/kernels tests/test_fused.py tests/test_executors.py
echo "=== done $(date +%T)"

#!/usr/bin/env bash
# One device call that produces every GPU figure the README/BENCHMARKS.md cite, in priority order, each step
# under its own time limit. Results go to $OUT/results.tar.gz (the device returns at most 8 files).
#   run on the device:  bash benchmarks/device_session.sh
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
R=${OUT:-out}/r; mkdir -p "$R"
# each step: its own time limit, its output tail logged, and the archive refreshed (a cut-off call still returns it)
step() {
  local t=$1; shift; echo "=== $(date +%T) $*" | tee -a "$R/log.txt"
  timeout "$t" "$@" 2>&1 | grep -v "Warning\|warn_once\|^\s*$" | tail -40 | tee -a "$R/log.txt"
  tar czf "${OUT:-out}/results.tar.gz" -C "$R" .
}
nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$R/card.txt"
python3 -c "import torch,triton,transformers;print('torch',torch.__version__,'triton',triton.__version__,'transformers',transformers.__version__)" | tee -a "$R/card.txt"
# 1. end-to-end, all stock executors + fused, the cases
step 200 python3 benchmarks/e2e.py --cases b32-1,b32-32,l14-1 --executors eager,streams,graph,compile,fused --out "$R"
# 2. SigLIP and zero-shot (1 image x 1000 prompts) next to the graph executor
step 90 python3 benchmarks/e2e.py --cases siglip-1,b32-zeroshot --executors eager,graph,fused --iters 50 --out "$R"
# 3. 8-SM green context (stand-in for Orin Nano; SMs only, not bandwidth) vs the full card, with energy
step 100 python3 -m dualfuse.cli bench --model clip-vit-b-32 --batch 1 --executors graph,fused --sms 8,full --energy --no-progress --json "$R/sms-b32-1.json"
step 60 python3 -m dualfuse.cli bench --model clip-vit-l-14 --batch 1 --executors graph,fused --sms 8 --iters 30 --no-progress --json "$R/sms-l14-1.json"
# 4. profiles: eager alone, graph vs fused side by side
step 60 python3 -m dualfuse.cli profile --model clip-vit-b-32 --executor eager --out "$R/profile-eager"
step 90 python3 -m dualfuse.cli profile --model clip-vit-b-32 --compare graph,fused --out "$R/profile-graph-vs-fused"
# 5. accuracy parity of every CUDA executor on all four presets
for m in clip-vit-b-32 clip-vit-b-16 clip-vit-l-14 siglip-base-patch16-224; do
  step 45 python3 -m dualfuse.cli eval --model $m --executor eager,streams,graph,fused --json "$R/eval-$m.json"
done
echo "=== done $(date +%T)"

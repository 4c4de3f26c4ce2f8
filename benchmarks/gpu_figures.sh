#!/usr/bin/env bash
# The GPU runs that produce every figure README.md / BENCHMARKS.md cite, in priority order, each step under its
# own time limit, split in parts of at most 10 minutes each:
#   bash benchmarks/gpu_figures.sh A    # end-to-end: all executors, the target cases; fused A/B; SM limits + energy
#   bash benchmarks/gpu_figures.sh B    # accuracy parity (fp16, bf16), kernels
#   bash benchmarks/gpu_figures.sh C    # GPU tests
#   bash benchmarks/gpu_figures.sh D    # drop-in: text-length stream with buckets, first calls, uint8 frames, memory
#   bash benchmarks/gpu_figures.sh M    # the model table (README "Results"), every row in one process
#   bash benchmarks/gpu_figures.sh P    # an older commit ($OLD) against this one: both commits' executors in one process
#   bash benchmarks/gpu_figures.sh E    # edge regime: int8 weights (both widenings), 8 SMs and full card; the soak
#   bash benchmarks/gpu_figures.sh S    # the real-time loop (full card, 8 SMs); LayerNorm folding on the sm_80 path
#   bash benchmarks/gpu_figures.sh X    # the byte-bound stand-in in 8 SMs: probe, every executor, int8 / fp8, A/B, shares
#   bash benchmarks/gpu_figures.sh X2   # the stand-in: so400m in 8 SMs, every case in 16 SMs; the stream loops (Orin Nano)
#   bash benchmarks/gpu_figures.sh X3   # the stand-in on the full card; its GEMM config sweep (8, 16 SMs), merged
#   bash benchmarks/gpu_figures.sh T    # single towers and the VLM vision tower: fused vs graph vs compile; stand-in, 8 SMs
#   bash benchmarks/gpu_figures.sh T2   # single towers: the GPU tests
#   bash benchmarks/gpu_figures.sh Q    # corpus embedding: dualfuse embed vs a DataLoader baseline vs the model ceiling
#   bash benchmarks/gpu_figures.sh N    # never slower: models x shapes vs every stock executor (MODELS=b32,... per call)
# JSON and logs are written to /tmp/dualfuse-results and packed into ${OUT:-out}/results-<part>.tar.gz after every
# step (a run cut off by its time limit still leaves the archive). Set DUALFUSE_COMMIT to the commit being measured
# (a copied work tree may have no .git). File them under
# benchmarks/results/<card>-<date>/ (see benchmarks/README.md).
set -u
PART=${1:-A}
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
R=/tmp/dualfuse-results; mkdir -p "$R" "${OUT:-out}"  # not under $OUT: only the archive is kept
# each step: its own time limit, its output tail logged, and the archive refreshed (a run cut off by its limit still leaves it)
step() {
  local t=$1; shift; echo "=== $(date +%T) $*" | tee -a "$R/log-$PART.txt"
  timeout "$t" "$@" 2>&1 | grep -v "Warning\|warn_once\|^\s*$\|Model config" | tail -${TAIL:-40} | tee -a "$R/log-$PART.txt"
  tar czf "${OUT:-out}/results-$PART.tar.gz" -C "$R" .
}
nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$R/card.txt"
echo "commit ${DUALFUSE_COMMIT:=unknown}" | tee -a "$R/card.txt"
export DUALFUSE_COMMIT
python3 -c "import torch,triton,transformers;print('torch',torch.__version__,'triton',triton.__version__,'transformers',transformers.__version__)" | tee -a "$R/card.txt"
if [ "$PART" = A ]; then
  # 1. end-to-end, all stock executors + fused, the target cases
  step 220 python3 benchmarks/e2e.py --cases b32-1,b32-32,l14-1 --executors eager,streams,graph,compile,fused --out "$R"
  # 2. SigLIP, ViT-B/16 and zero-shot (1 image x 1000 prompts) next to the graph executor
  step 120 python3 benchmarks/e2e.py --cases siglip-1,b16-1,b32-zeroshot --executors eager,graph,fused --iters 50 --out "$R"
  # 3. the fused executor's options, A/B in one process (deferred split-K, PDL, LN folding, fp32 residual stream)
  step 90 python3 benchmarks/fused_variants.py --model clip-vit-b-32 --batch 1 --variants graph,fused,fused-nodefer,fused-nopdl,fused-fold,fused-fold-nopdl,fused-res32 --json "$R/variants-b32-1.json"
  # 4. green contexts (stand-ins for Orin Nano 8 SMs / AGX Orin 16 SMs; SMs only, not bandwidth) vs the full card, with energy
  step 150 python3 -m dualfuse.cli bench --model clip-vit-b-32 --batch 1 --executors graph,fused --sms 8,16,full --energy --no-progress --json "$R/sms-b32-1.json"
  step 90 python3 -m dualfuse.cli bench --model clip-vit-l-14 --batch 1 --executors graph,fused --sms 8 --iters 30 --no-progress --json "$R/sms-l14-1.json"
elif [ "$PART" = B ]; then
  # 5. accuracy parity of every CUDA executor on all four presets (fp16), and bf16 on two
  for m in clip-vit-b-32 clip-vit-b-16 clip-vit-l-14 siglip-base-patch16-224; do
    step 70 python3 -m dualfuse.cli eval --model $m --executor eager,streams,graph,compile,fused --json "$R/eval-$m.json"
  done
  for m in clip-vit-b-32 siglip-base-patch16-224; do
    step 50 python3 -m dualfuse.cli eval --model $m --executor eager,graph,fused --dtype bf16 --json "$R/eval-bf16-$m.json"
  done
  # 6. kernels of all four architectures at batch 1 and 32 (GEMM steps, attention, LayerNorm)
  step 200 python3 benchmarks/kernel_bench.py --json "$R/kernels.json"
elif [ "$PART" = C ]; then
  # 7. GPU tests (PYTEST_ARGS="-n 4 --dist loadfile" compiles the kernels of four test files at once, with pytest-xdist)
  TAIL=25 step ${TESTS_S:-560} python3 -m pytest -m gpu -q -p no:cacheprovider --durations=10 ${PYTEST_ARGS:-} tests
elif [ "$PART" = D ]; then
  # 8. the drop-in: a stream cycling through 12 text lengths (buckets on/off), first-call times, uint8 frames vs host
  #    normalization at batch 1 and 32; GPU memory of fuse() beyond the weights
  step 150 python3 benchmarks/frames_buckets.py --model clip-vit-b-32 --out "$R/frames-buckets-b32.json"
  step 60 python3 benchmarks/fuse_memory.py --model clip-vit-b-32 --dtype fp16 --device cuda
elif [ "$PART" = M ]; then
  # 9. the model table (README "Results", BENCHMARKS.md): every row, one process
  TAIL=60 step ${MODELS_S:-560} python3 benchmarks/models.py --out "$R/models"
elif [ "$PART" = P ]; then
  # 10. a change that must keep the numbers: an older commit's executors (its src/ unpacked into $OLD, e.g.
  #     `git archive f471400 src | tar x -C .old`) and this commit's, interleaved rounds in one process
  OLD=${OLD:-.old}
  for m in clip-vit-b-32 siglip-base-patch16-224; do
    step 120 python3 benchmarks/fused_variants.py --model $m --batch 1 --variants graph,fused,base-graph,base-fused --base "$OLD" --rounds 10 --json "$R/base-$m-1.json"
  done
elif [ "$PART" = E ]; then
  # 11. the edge regime: int8 weights (weight streaming + end to end) in 8 SMs and on the full card, then the soak
  step 200 python3 benchmarks/int8.py --sms 8 --widen-convert --json "$R/int8-sms8.json"
  step 200 python3 benchmarks/int8.py --widen-convert --json "$R/int8.json"
  step 150 python3 benchmarks/soak.py --model clip-vit-b-32 --calls ${SOAK_CALLS:-10000} --out "$R/soak"
elif [ "$PART" = S ]; then
  # 12. the real-time loop (fp16 and int8 weights, full card and 8 SMs), then the sm_80 path's A/B on LayerNorm folding
  for m in clip-vit-b-32 siglip-base-patch16-224; do
    for w in fp16 int8; do
      step 50 python3 -m dualfuse.cli stream --model $m --synthetic 300 --weights $w --prompts "a dog,a cat,a car,a person" --json "$R/stream-$m-$w.json" --out "$R/stream-$m-$w"
      step 60 python3 -m dualfuse.cli stream --model $m --synthetic 300 --weights $w --sms 8 --prompts "a dog,a cat,a car,a person" --json "$R/stream-$m-$w-sms8.json" --out "$R/stream-$m-$w-sms8"
    done
  done
  step 100 python3 benchmarks/fused_variants.py --model clip-vit-b-32 --batch 1 --variants graph,fused-nopdl,fused-fold-nopdl,fused-notma-nopdl,fused-notma-nopdl-fold,fused,fused-fold --json "$R/variants-fold-b32-1.json"
elif [ "$PART" = X ]; then
  # 13. the byte-bound stand-in: every executor's weights host-mapped (read over PCIe), 8 SMs (Orin Nano / NX), the
  #     rows the targets compare (fused fp16 / int8 / fp8, the BLOCK_M 64, no-fold and PDL A/B rows, graph, compile,
  #     eager, torchao int8 + compile: its wheel on PYTHONPATH), one process per case so that each fits its limit
  #     (the JSON is saved after every row). X2: so400m, 16 SMs, the stream loops; X3: the full card, the GEMM sweep.
  step 175 python3 benchmarks/standin.py --sms 8 --rows targets --cases "vit-b32 img" --tag b32-img --out "$R/standin"
  step 185 python3 benchmarks/standin.py --sms 8 --rows targets --cases "vit-b32 1+1" --tag b32-pair --out "$R/standin"
  step 200 python3 benchmarks/standin.py --sms 8 --rows targets --cases "siglip-b16 1+1" --tag siglip --out "$R/standin"
elif [ "$PART" = X2 ]; then
  step 200 python3 benchmarks/standin.py --sms 8 --rows targets --cases "so400m img" --tag so400m --out "$R/standin"
  step 200 python3 benchmarks/standin.py --sms 16 --no-compile --rows targets --out "$R/standin"
  for m in clip-vit-b-32 siglip-base-patch16-224; do
    for w in fp16 int8; do
      step 40 python3 -m dualfuse.cli stream --model $m --synthetic 300 --weights $w --stand-in orin-nano --prompts "a dog,a cat,a car" --json "$R/stream-standin-$m-$w.json"
    done
  done
elif [ "$PART" = X3 ]; then
  # 14. the stand-in on the full card; then its GEMM configs: sweep at 8 and 16 SMs, and write
  #     kernels/gemm/standin_gemm.json and dualfuse/standin_shares.json (commit them; rerun X to see the tuned picks)
  step 110 python3 benchmarks/standin.py --sms 0 --no-compile --rows targets --out "$R/standin"
  for sms in 8 16; do step 190 python3 benchmarks/standin.py --sms $sms --tune --out "$R/standin"; done
  step 30 python3 benchmarks/standin.py --merge "$R/standin"
elif [ "$PART" = T ]; then
  # 15. single towers: the image towers at batch 1 (LLaVA-1.5's L/14-336 hidden_states[-2], so400m patch tokens,
  #     SigLIP B/16 pooled, B/32 with projection, a LLaVA-1.5-shaped VLM's vision part) fused (Triton; library GEMMs)
  #     vs graph vs compile;
  #     then in the byte-bound stand-in (Orin Nano: 8 SMs, weights host-mapped) and in 8 SMs of HBM. Part T2: the GPU
  #     tests of tests/test_towers.py (hidden-state copies inside the graph)
  step 240 python3 benchmarks/towers.py --out "$R/towers" --iters 50
  step 160 python3 benchmarks/towers.py --stand-in orin-nano --no-compile --out "$R/towers" --iters 30
  step 150 python3 benchmarks/towers.py --sms 8 --no-compile --out "$R/towers" --iters 30
elif [ "$PART" = T2 ]; then
  step 90 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_towers.py
elif [ "$PART" = Q ]; then
  # 16. corpus embedding, one GPU: dualfuse embed (CPU and nvJPEG decode), a clip-retrieval-style DataLoader
  #     baseline (HF model, fp16, batch 256), the fused model on frames already decoded; 10,000 generated JPEGs
  step 560 python3 benchmarks/embed_bench.py --out "$R/embed"
elif [ "$PART" = N ]; then
  # 17. never slower: fused and auto against graph, compile (both modes), eager and ONNX Runtime per cell;
  #     one model group per call (MODELS=b32,siglip-b16 / l14 / so400m / h14 / bigg14)
  step 560 python3 benchmarks/never_slower.py --models ${MODELS:-b32,siglip-b16} --shapes ${SHAPES:-all} --out "$R/never-slower"
else
  echo "unknown part '$PART': expected A, B, C, D, E, S, M, P, X, X2, X3, T, T2, Q or N" >&2; exit 2
fi
echo "=== done $(date +%T)"

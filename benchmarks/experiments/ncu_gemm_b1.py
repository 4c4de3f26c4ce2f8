"""The four GEMM launches of one ViT-B/32 layer (both towers) at batch 1, for Nsight Compute.

    ncu --kernel-name regex:_grouped_linear --launch-skip 4 --launch-count 8 --section SpeedOfLight \\
        --section MemoryWorkloadAnalysis --section WarpStateStats python3 benchmarks/experiments/ncu_gemm_b1.py

Runs the steps (QKV, out-proj + residual, FC1 + act, FC2 + residual) with the default configs twice, then once
more with each config override given as JSON arguments (e.g. '{"BLOCK_M": 128}'), eagerly (ncu serializes
launches anyway)."""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/kernel_bench.py
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
from kernel_bench import MODELS, STEPS, Tower  # noqa: E402

from dualfuse.kernels.gemm import GroupedLinear  # noqa: E402


def main():
    gen = torch.Generator().manual_seed(0)
    (v, t, act) = MODELS[sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("{") else "ViT-B/32"]
    towers = [Tower(*v, act, 1, 1, torch.float16, "cuda", gen), Tower(*t, act, 1, 1, torch.float16, "cuda", gen)]
    probs = [tw.problems(0) for tw in towers]
    overrides = [None] + [json.loads(a) for a in sys.argv[1:] if a.startswith("{")]
    for i, cfg in enumerate(overrides):
        ops = [GroupedLinear([p[s] for p in probs], config=cfg) for s in STEPS]
        for op, s in zip(ops, STEPS):
            print(f"config {i} {s}: {op.config} splits {op.splits} programs {op.num_programs}", flush=True)
        for _ in range(2 if i == 0 else 1):
            for op in ops:
                op()
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()

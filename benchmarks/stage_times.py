"""Per-stage GPU time of the fused executor: torch.profiler over graph replays; the k-th kernel of a replay
is plan stage k. Prints time per kernel kind and the slowest stages; used to decide what to optimize.

    python benchmarks/stage_times.py --model clip-vit-b-32 --image-batch 1 --text-batch 1
"""
import argparse
import collections
import sys

import torch


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="clip-vit-b-32")
    p.add_argument("--image-batch", type=int, default=1)
    p.add_argument("--text-batch", type=int, default=1)
    p.add_argument("--replays", type=int, default=20)
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args(argv)
    import dualfuse
    from dualfuse import executors
    from dualfuse.bench import random_inputs
    from torch.profiler import ProfilerActivity, profile

    model = dualfuse.load(args.model)
    ex = executors.get("fused", model, dtype=torch.float16, device="cuda")
    (px, ids), = random_inputs(ex.spec, args.image_batch, args.text_batch, None, sets=1, device="cuda",
                               dtype=torch.float16)
    runner = ex.runner(args.image_batch, args.text_batch, ids.shape[1])
    for _ in range(5):
        runner(px, ids)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.replays):
            runner.graph.replay()
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                      and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()),
                     key=lambda e: e.time_range.start)
    n = len(runner.plan.stages)
    if len(kernels) != n * args.replays:
        print(f"expected {n * args.replays} kernels, profiler saw {len(kernels)}: cannot attribute by order")
        return 1
    per_stage = [0.0] * n
    for i, k in enumerate(kernels):
        per_stage[i % n] += k.time_range.elapsed_us() / args.replays
    start = kernels[0].time_range.start
    wall = (kernels[-1].time_range.end - start) / args.replays
    by_kind = collections.defaultdict(float)
    for s, t in zip(runner.plan.stages, per_stage):
        by_kind[s.kind] += t
    busy = sum(per_stage)
    print(f"{args.model} {args.image_batch}+{args.text_batch}: {n} launches, kernel time {busy:.1f} µs, "
          f"wall per replay {wall:.1f} µs (gaps {wall - busy:.1f} µs)")
    for kind, t in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        cnt = sum(1 for s in runner.plan.stages if s.kind == kind)
        print(f"  {kind:<11} {t:8.1f} µs in {cnt:3d} launches ({t / cnt:6.2f} µs each)")
    order = sorted(range(n), key=lambda i: -per_stage[i])[: args.top]
    for i in order:
        s = runner.plan.stages[i]
        print(f"  stage {i:3d} {s.kind:<10} {'+'.join(st.label for st in s.steps):<24} {per_stage[i]:7.2f} µs "
              f"{s.bytes / 1e6:6.2f} MB -> {s.bytes / per_stage[i] / 1e3:6.0f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

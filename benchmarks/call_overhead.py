"""Where a fused call's time goes outside the kernels: host-side validation, input copies, the CUDA graph launch,
the output clone and the final read-back, next to the GPU time of the graph replay alone.

    python benchmarks/call_overhead.py --model clip-vit-b-32 --batch 1

Prints medians over --iters calls (µs): the whole call as `dualfuse bench` times it (CUDA events, synchronized per
call), the replay alone on the GPU (events around `graph.replay()` with the inputs already in place), and host
wall times of each piece of the call (time.perf_counter; the GPU runs asynchronously meanwhile).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="clip-vit-b-32")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import dualfuse
    from dualfuse import executors
    from dualfuse.bench import random_inputs
    from dualfuse.timing import time_calls

    dev = torch.device("cuda")
    model = dualfuse.load(args.model)
    fused = executors.get("fused", model, dtype=torch.float16, device=dev)
    graph = executors.get("graph", model, dtype=torch.float16, device=dev)
    (px, ids), = random_inputs(fused.spec, args.batch, args.batch, None, sets=1, device=dev, dtype=torch.float16)
    for _ in range(20):
        fused.encode(px, ids)
        graph.encode(px, ids)
    torch.cuda.synchronize()
    med = lambda xs: statistics.median(xs) * 1e3  # noqa: E731  ms -> µs
    out = {}
    out["graph executor: whole call"] = med(time_calls(lambda i: graph.encode(px, ids), args.iters, dev))
    out["fused: whole call"] = med(time_calls(lambda i: fused.encode(px, ids), args.iters, dev))
    runner = fused.runner(args.batch, args.batch, ids.shape[1])
    out["fused: graph.replay() alone, GPU (events)"] = med(time_calls(lambda i: runner.graph.replay(), args.iters, dev))

    host = {k: [] for k in ("validate", "copy inputs", "graph.replay() host", "clone output", "flag read (sync)",
                            "whole call host")}
    for _ in range(args.iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        v_px, v_ids = fused.validate(px, ids)
        t1 = time.perf_counter()
        runner.buf["vision"].input.copy_(v_px)
        runner.buf["text"].input.copy_(v_ids)
        t2 = time.perf_counter()
        runner.graph.replay()
        t3 = time.perf_counter()
        o = runner.output.clone()
        t4 = time.perf_counter()
        runner.embed_op.raise_on_bad_ids()
        t5 = time.perf_counter()
        for k, a, b in (("validate", t0, t1), ("copy inputs", t1, t2), ("graph.replay() host", t2, t3),
                        ("clone output", t3, t4), ("flag read (sync)", t4, t5), ("whole call host", t0, t5)):
            host[k].append((b - a) * 1e6)
    del o
    for k, xs in host.items():
        out[f"fused host: {k}"] = statistics.median(xs)
    print(f"{args.model} {args.batch}+{args.batch} fp16 on {torch.cuda.get_device_name(dev)}: median µs of {args.iters}")
    for k, v in out.items():
        print(f"  {k:<45} {v:9.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=args.model, batch=args.batch, card=torch.cuda.get_device_name(dev), us=out), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

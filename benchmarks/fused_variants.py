"""A/B of the fused executor's options in ONE process: LayerNorm folded into the GEMMs (vertical fusion, off by
default) on/off, programmatic dependent launch on/off, next to the two-branch CUDA graph executor as the stock baseline.

Every variant is timed like `dualfuse bench` times an executor (dualfuse.timing.time_calls: CUDA events around each
`encode` call, synchronized per call, inputs rotated), in rounds that interleave the variants so clock or
thermal drift hits all of them alike. Each variant's output is checked against the fp32 reference first.

    python benchmarks/fused_variants.py --model clip-vit-b-32 --batch 1 --json out.json

With ``--base DIR`` (``DIR/src/dualfuse`` from another commit, e.g. ``git archive REV src | tar x -C .old``), the
variants ``base-graph``, ``base-fused``, ``base-fused-noidcheck`` and ``base-fused-int8`` (name them in ``--variants``)
run that commit's executors in the same process, interleaved with this commit's: a change that must keep the numbers
is compared without the drift between processes.
"""
from __future__ import annotations

import argparse
import importlib
import json
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

VARIANTS = {  # name: (executor, kwargs)
    "graph": ("graph", {}),
    "fused": ("fused", {}),
    "fused-nopdl": ("fused", {"pdl": False}),
    "fused-fold": ("fused", {"fold_ln": True}),
    "fused-fold-nopdl": ("fused", {"fold_ln": True, "pdl": False}),
    "fused-res32": ("fused", {"residual_dtype": torch.float32}),  # residual stream in fp32, not the model dtype
    "fused-nodefer": ("fused", {"defer_split_reduce": False}),  # split-K reduced in the GEMM, not the next LN
    "fused-noidcheck": ("fused", {"check_ids": False}),  # no token-id range check (its flag read-back skipped)
    "fused-int8": ("fused", {"weights": "int8"}),  # weight-only int8 (the quantized GEMM path)
    # the sm_80 / sm_87 (Jetson Orin) path on a Hopper card: no PDL, no TMA loads; LayerNorms apart or folded
    "fused-notma-nopdl": ("fused", {"pdl": False, "fold_ln": False, "gemm_config": {"tma": False}}),
    "fused-notma-nopdl-fold": ("fused", {"pdl": False, "fold_ln": True, "gemm_config": {"tma": False}}),
}
BASE_VARIANTS = {  # --base: the other commit's executors
    "base-graph": ("graph", {}), "base-fused": ("fused", {}), "base-fused-noidcheck": ("fused", {"check_ids": False}),
    "base-fused-int8": ("fused", {"weights": "int8"})}


def load_base(root: str):
    """The executors of another commit (``root/src/dualfuse``) imported as ``dualfuse_base``
    (a copy whose absolute imports are renamed), so both commits' kernels and executors live in one process."""
    src = Path(root) / "src" / "dualfuse"
    if not (src / "__init__.py").is_file():
        raise SystemExit(f"--base {root}: expected {src}/__init__.py (e.g. `git archive REV src | tar x -C {root}`)")
    dst = Path(tempfile.mkdtemp(prefix="dualfuse-base-")) / "dualfuse_base"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    for f in dst.rglob("*.py"):
        f.write_text(re.sub(r"\b(from|import) dualfuse\b", r"\1 dualfuse_base", f.read_text()))
    sys.path.insert(0, str(dst.parent))
    importlib.import_module("dualfuse_base")
    return importlib.import_module("dualfuse_base.executors")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="clip-vit-b-32")
    p.add_argument("--batch", type=int, default=1, help="image and text batch")
    p.add_argument("--text-batch", type=int, default=None)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--iters", type=int, default=50, help="calls per variant per round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--warmup", type=int, default=10, help="calls per variant before the timed rounds")
    p.add_argument("--device", default="cuda", help="cuda (figures); cpu only as a smoke test (TRITON_INTERPRET=1)")
    p.add_argument("--json", default=None)
    p.add_argument("--base", default=None, metavar="DIR",
                   help="another commit's tree (DIR/src/dualfuse), run by the variants base-graph, base-fused, "
                        "base-fused-noidcheck, base-fused-int8")
    args = p.parse_args(argv)

    import dualfuse
    from dualfuse import executors, reference
    from dualfuse.bench import cosine_check, random_inputs
    from dualfuse.environment import environment
    from dualfuse.timing import time_calls

    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    known = dict(VARIANTS, **(BASE_VARIANTS if args.base else {}))
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"unknown variants {unknown}; known: {', '.join(known)}", file=sys.stderr)
        return 2
    if args.base and all(n in BASE_VARIANTS for n in names):
        print("--base needs at least one variant of this commit beside the base ones (e.g. --variants "
              "graph,fused,base-graph,base-fused)", file=sys.stderr)
        return 2
    base = load_base(args.base) if args.base else None
    dev = torch.device(args.device)
    bt = args.batch if args.text_batch is None else args.text_batch
    model = dualfuse.load(args.model)
    exs = {n: (base if n in BASE_VARIANTS else executors).get(
        known[n][0], model, dtype=torch.float16, device=dev, **known[n][1]) for n in names}
    spec = next(exs[n] for n in names if n not in BASE_VARIANTS).spec  # this commit's spec (inputs, reference)
    inputs = random_inputs(spec, args.batch, bt, None, sets=4, device=dev, dtype=torch.float16)
    ref_spec = spec.to(dev, torch.float32)
    px0, ids0 = inputs[0]
    refs = reference.encode(ref_spec, px0.float(), ids0)
    cos = {}
    for n, ex in exs.items():
        cos[n] = cosine_check(ex.encode(px0, ids0), refs)["min_cosine"]
        for _ in range(args.warmup):  # warm-up (graph capture happened in the first call)
            ex.encode(*inputs[0])
    samples = {n: [] for n in names}
    for r in range(args.rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            ex = exs[n]
            samples[n] += time_calls(lambda i: ex.encode(*inputs[i % len(inputs)]), args.iters, dev)
    base = statistics.median(samples["graph"]) if "graph" in samples else None
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (smoke test, not a figure)"
    print(f"{args.model} {args.batch}+{bt} fp16 on {card}: median (p10..p90) ms of "
          f"{args.rounds * args.iters} calls")
    rows = []
    for n in names:
        xs = sorted(samples[n])
        med = statistics.median(xs)
        row = dict(variant=n, median_ms=med, p10_ms=xs[len(xs) // 10], p90_ms=xs[(9 * len(xs)) // 10],
                   min_cosine=cos[n], vs_graph=(med / base) if base else None, samples=xs)
        rows.append(row)
        extra = f"  {row['vs_graph']:.3f} of graph" if base else ""
        print(f"  {n:<20} {med:8.3f} ({row['p10_ms']:.3f}..{row['p90_ms']:.3f})  min cos {cos[n]:.6f}{extra}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=args.model, image_batch=args.batch, text_batch=bt, env=environment(dev),
                           base=args.base, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""End-to-end benchmark cases for BENCHMARKS.md: `dualfuse bench` per case, all executors side by side in one
process per case, then one summary table of fused vs the best stock executor and vs the two-branch graph.

    python benchmarks/e2e.py --out benchmarks/results/<card>-<date>/e2e/    # all cases
    python benchmarks/e2e.py --cases b32-1,l14-1 --executors eager,graph,fused

Each case writes <out>/<case>.json (default out: ./results): the full `dualfuse bench --json` record (card,
versions, every sample).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

CASES = {  # name: (model, image batch, text batch)
    "b32-1": ("clip-vit-b-32", 1, 1),
    "b32-32": ("clip-vit-b-32", 32, 32),
    "l14-1": ("clip-vit-l-14", 1, 1),
    "b16-1": ("clip-vit-b-16", 1, 1),
    "siglip-1": ("siglip-base-patch16-224", 1, 1),
    "b32-zeroshot": ("clip-vit-b-32", 1, 1000),
}
TARGETS = {  # fused time / two-branch graph time must be at most this (the project's speed targets)
    "b32-1": 1 / 3, "l14-1": 1 / 3, "b32-32": 1 / 1.8,
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    p.add_argument("--executors", default=None, help="passed to dualfuse bench (default: all)")
    p.add_argument("--out", default="results", help="folder for the per-case JSON")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--dtype", default="fp16")
    args = p.parse_args(argv)

    from dualfuse.cli import main as cli_main

    os.makedirs(args.out, exist_ok=True)
    summary = []
    for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
        if case not in CASES:
            print(f"unknown case {case!r}; known: {', '.join(CASES)}", file=sys.stderr)
            return 2
        model, bi, bt = CASES[case]
        path = os.path.join(args.out, f"{case}.json")
        cmd = ["bench", "--model", model, "--image-batch", str(bi), "--text-batch", str(bt), "--dtype", args.dtype,
               "--json", path, "--no-progress"]
        if args.executors:
            cmd += ["--executors", args.executors]
        if args.iters:
            cmd += ["--iters", str(args.iters)]
        print(f"\n=== {case}: dualfuse {' '.join(cmd)}", flush=True)
        t0 = time.time()
        rc = cli_main(cmd)
        print(f"=== {case}: exit {rc} in {time.time() - t0:.0f} s", flush=True)
        if not os.path.exists(path):
            summary.append((case, None))
            continue
        with open(path) as f:
            summary.append((case, json.load(f)))

    print("\ncase           card                       graph ms  best stock       fused ms  fused/graph  target  min cos")
    for case, res in summary:
        if res is None:
            print(f"{case:<14} (no result)")
            continue
        rows = {r["executor"]: r for r in res["results"]}
        g, f = rows.get("graph", {}), rows.get("fused", {})
        best = res.get("best_stock") or "-"
        best_ms = rows.get(best, {}).get("median_ms")
        gm, fm = g.get("median_ms"), f.get("median_ms")
        ratio = fm / gm if fm and gm else None
        target = TARGETS.get(case)
        verdict = "" if target is None or ratio is None else ("PASS" if ratio <= target else "MISS")
        fmt = lambda x, s="{:.3f}": "-" if x is None else s.format(x)  # noqa: E731
        print(f"{case:<14} {res['card'][:26]:<26} {fmt(gm):>8}  {best:<8}{fmt(best_ms):>8}  {fmt(fm):>8}  "
              f"{fmt(ratio, '{:.2f}'):>11}  {fmt(target, '{:.2f}'):>6} {verdict:<4} {fmt(f.get('min_cosine'), '{:.5f}')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

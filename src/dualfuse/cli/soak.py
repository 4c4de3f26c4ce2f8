"""``benchmarks/soak.py``: the soak's command line (dualfuse.soak has the logic, dualfuse.soak_plot the plot).

    python benchmarks/soak.py --model clip-vit-b-32 --calls 10000 --out benchmarks/results/soak
    python benchmarks/soak.py --model clip-tiny --device cpu          # CPU: Triton interpreter, small shapes

Writes ``soak.json`` and ``soak.png`` under ``--out``, prints a table; exit status 1 when a check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from ..soak import __doc__ as soak_doc
from ..soak import run_soak

def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title=f"soak: {result['calls']} calls on {result['device_name']} ({result['dtype']}), "
                    f"{result['elapsed_s']:.1f} s")
    for col in ("shape", "calls", "p50 ms", "p99 ms", "p99/p50", "ok"):
        t.add_column(col, justify="left" if col == "shape" else "right")
    for label, v in result["per_shape"].items():
        ratio = f"{v['p99_over_p50']:.2f}" if v["p99_over_p50"] else "-"
        t.add_row(label, str(v["calls"]), f"{v['p50_ms']:.3f}", f"{v['p99_ms']:.3f}", ratio,
                  {True: "yes", False: "NO", None: "n/a"}[v["ok"]])
    console.print(t)
    c = Table(title="checks")
    for col in ("check", "ok", "detail"):
        c.add_column(col)
    for name, v in result["checks"].items():
        c.add_row(name, "yes" if v["ok"] else "NO", str(v["detail"]))
    console.print(c)


# CPU default: 80 calls of clip-tiny ran in 101 s wall (87 s of calls, ~1.1 s a call through the interpreter) on a
# 2-core machine; 500 calls took 20.6 min there under load (~9 min unloaded), too slow for CI
CPU_CALLS = 80


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=soak_doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="preset name or local path (default clip-vit-b-32 on CUDA, "
                                                 "clip-tiny on CPU)")
    p.add_argument("--calls", type=int, default=None,
                   help=f"measured calls (default 10000 on CUDA, {CPU_CALLS} on CPU)")
    p.add_argument("--out", default="soak-results", help="folder for soak.json and soak.png")
    p.add_argument("--dtype", default=None, help="fp16 | bf16 | fp32 (default fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", default=None, help="default cuda when there is one, else cpu (Triton interpreter)")
    p.add_argument("--bad-every", type=int, default=None, help="one bad call every N calls (default 97; 10 on CPU)")
    p.add_argument("--check-every", type=int, default=None, help="compare every N-th call with its reference "
                                                                 "(default 10; 1 on CPU)")
    p.add_argument("--image-batches", default=None, help="comma list (default 1,2,4,8; 1,2 on CPU)")
    p.add_argument("--text-batches", default=None, help="comma list (default 1,8,64; 1,2 on CPU)")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)

    cpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cpu")
    if cpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
    def ints(s, default):
        if s is None:
            return default
        try:
            vals = tuple(int(v) for v in s.split(","))
        except ValueError:
            raise SystemExit(f"expected a comma list of positive ints, got {s!r}") from None
        if not vals or min(vals) < 1:
            raise SystemExit(f"expected a comma list of positive ints, got {s!r}")
        return vals

    calls = args.calls if args.calls is not None else (CPU_CALLS if cpu else 10000)
    if calls < 1:
        raise SystemExit(f"--calls must be >= 1, got {calls}")
    model = args.model or ("clip-tiny" if cpu else "clip-vit-b-32")
    dtype = args.dtype or ("fp32" if cpu else "fp16")
    image_batches = ints(args.image_batches, (1, 2) if cpu else (1, 2, 4, 8))
    text_batches = ints(args.text_batches, (1, 2) if cpu else (1, 8, 64))
    device = args.device or ("cpu" if cpu else "cuda")

    result = run_soak(model, calls, device=device, dtype=dtype, image_batches=image_batches,
                      text_batches=text_batches, bad_every=args.bad_every or (10 if cpu else 97),
                      check_every=args.check_every or (1 if cpu else 10), log=print)
    doc = result.to_dict()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(doc, indent=1, default=str))
    if not args.no_plot:
        from ..soak_plot import plot

        plot(doc, out / "soak.png")
    print_table(doc)
    print(f"wrote {out / 'soak.json'}" + ("" if args.no_plot else f" and {out / 'soak.png'}"))
    return 0 if result.ok else 1

if __name__ == "__main__":
    sys.exit(main())

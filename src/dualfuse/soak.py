"""Soak: many fused calls over a cycle of call shapes, with bad calls mixed in, watching memory and latency.

    python benchmarks/soak.py --model clip-vit-b-32 --calls 10000 --out benchmarks/results/soak
    python benchmarks/soak.py --model clip-tiny --device cpu          # CPU: Triton interpreter, small shapes

The cycle (:func:`shape_cycle`) mixes both-tower calls, image-only and text-only calls, image batches 1..8, text
batches 1..64 and text lengths in every text-length bucket (lengths just under a bucket too, which pad up to it).
Every ``--bad-every`` calls one bad call runs instead (a token id out of the vocabulary, an image of the wrong size,
integer pixels), each expected to raise a ValueError naming the input; the good call after it must be exact.

Before the measured calls one pass over the cycle builds every runner (warm-up) and keeps each shape's output as its
reference: the same inputs must give the same bits on every later call (checked on every ``--check-every``-th call
and on every call right after a bad one).

Checks (exit status 1 when one fails):

- ``memory_flat``: CUDA allocated and reserved memory and host RSS: the highest sample of the last window (1,000
  calls, or a fifth of the calls when fewer) at most 1% above the highest of the first window (CUDA only: on the CPU
  the interpreter's own caches move host RSS; it is reported, not checked).
- ``latency``: per shape, p99 <= 1.5 x p50 (CUDA; shapes with fewer than 20 measured calls, and CPU runs, whose
  interpreter times follow the machine's load, are reported, not checked).
- ``bad_calls_raised``, ``outputs_exact``, ``good_after_bad_exact``.
- ``runners_bounded``: the cache never holds more than ``max_graphs`` runners and no runner is built after the
  warm-up (the cycle's runner keys fit in max_graphs).

Writes ``soak.json`` and ``soak.png`` (memory and latency over calls) under ``--out`` and prints a rich table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .timing import percentile

# host RSS: /proc/self/statm (Linux); elsewhere the peak RSS from getrusage
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def host_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass(frozen=True)
class Shape:
    """One call of the cycle: ``kind`` "both" (encode), "image" (encode_image) or "text" (encode_text)."""

    kind: str
    images: int
    texts: int
    text_len: int

    @property
    def label(self) -> str:
        if self.kind == "image":
            return f"img{self.images}"
        if self.kind == "text":
            return f"txt{self.texts}x{self.text_len}"
        return f"img{self.images}+txt{self.texts}x{self.text_len}"


def shape_cycle(context_length: int, buckets=None, *, image_batches=(1, 2, 4, 8),
                text_batches=(1, 8, 64)) -> list[Shape]:
    """The shapes a soak cycles through, in a fixed order: for each text-length bucket (or the context length
    when bucketing is off) a both-tower call at that length and one at a length just under it (same runner, padded
    up), walking the image and text batches; then each image batch alone and each text batch alone."""
    lengths = sorted(set(buckets) if buckets else {context_length})
    shapes = []
    k = 0
    for n in lengths:
        for length in sorted({n, max(1, n - 3)}, reverse=True):
            shapes.append(Shape("both", image_batches[k % len(image_batches)], text_batches[k % len(text_batches)],
                                length))
            k += 1
    shapes += [Shape("image", b, 0, context_length) for b in image_batches]
    shapes += [Shape("text", 0, b, lengths[i % len(lengths)]) for i, b in enumerate(text_batches)]
    return shapes


def make_inputs(io, shape: Shape, device, dtype, seed: int):
    """Fixed inputs of one shape: normalized-like pixels and token ids ending at an EOS (the largest id, also the
    first EOS), all inside the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    px = ids = None
    if shape.images:
        px = torch.randn(shape.images, io.channels, io.image_size, io.image_size, generator=g).to(device, dtype)
    if shape.texts:
        vocab = io.vocab_size
        eos = io.eos_token_id if io.eos_token_id is not None and 0 <= io.eos_token_id < vocab else vocab - 1
        ids = torch.randint(1, vocab - 1, (shape.texts, shape.text_len), generator=g)
        ids[ids == eos] = 1
        ids[:, -1] = vocab - 1 if io.text_pooling == "argmax" else eos
        ids = ids.to(device)
    return px, ids


def run_call(ex, shape: Shape, px, ids):
    if shape.kind == "both":
        return ex.encode(px, ids)
    if shape.kind == "image":
        return ex.encode_image(px), None
    return None, ex.encode_text(ids)


BAD_KINDS = ("bad_id", "wrong_shape", "wrong_dtype")


def make_bad_inputs(io, kind: str, px, ids):
    """The inputs of one bad call, built from a good call's: built once, during the warm-up, so that the soak's own
    allocations (an int32 copy of 8 images is 4.8 MB) never land in the memory windows it compares."""
    if kind == "bad_id":
        bad = ids.clone()
        bad[0, 0] = io.vocab_size  # one past the table
        return px, bad
    if kind == "wrong_shape":
        return px[..., :-1], ids  # one pixel column short (a view)
    return (px * 100).to(torch.int32), ids  # integer pixels: never normalized


def bad_call(ex, px, ids):
    """Run one bad call on inputs from make_bad_inputs; returns the error message (None when nothing was raised)."""
    try:
        ex.encode(px, ids)
    except ValueError as e:
        return str(e)
    return None


BAD_MESSAGES = {"bad_id": "input_ids", "wrong_shape": "pixel_values", "wrong_dtype": "pixel_values"}


def _same(a, b) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def soak(ex, calls: int, *, shapes: list[Shape] | None = None, bad_every: int = 97, check_every: int = 10,
         sample_every: int | None = None, seed: int = 0, log=None) -> dict:
    """Run the soak on executor ``ex`` (a FusedExecutor); returns the result dict (samples, per-shape latency,
    checks). ``calls`` counts measured calls (good and bad), after one warm-up pass over the shapes."""
    dev, cuda = ex.device, ex.device.type == "cuda"
    io = ex.io
    if shapes is None:
        shapes = shape_cycle(io.context_length, getattr(ex, "text_buckets", None))
    sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)
    sample_every = sample_every or max(1, min(50, calls // 100 or 1))
    inputs = [make_inputs(io, s, dev, ex.dtype, seed + i) for i, s in enumerate(shapes)]
    both = [i for i, s in enumerate(shapes) if s.kind == "both"]
    bad_inputs = {(kind, i): make_bad_inputs(io, kind, *inputs[i]) for kind in BAD_KINDS for i in both}

    # warm-up: build every runner, keep each shape's output as its reference
    t0 = time.perf_counter()
    refs = []
    for s, (px, ids) in zip(shapes, inputs):
        img, txt = run_call(ex, s, px, ids)
        refs.append((None if img is None else img.clone(), None if txt is None else txt.clone()))
    sync()
    warmup_s = time.perf_counter() - t0
    built_after_warmup = len(ex.build_times)
    max_graphs = getattr(ex, "max_graphs", None)

    def memory():
        row = {"rss": host_rss_bytes()}
        if cuda:
            row["allocated"] = torch.cuda.memory_allocated(dev)
            row["reserved"] = torch.cuda.memory_reserved(dev)
        return row

    samples, lat = [], {s.label: [] for s in shapes}
    per_call = []  # (call index, shape label, ms)
    bad, exact_fail, after_bad_fail = [], [], []
    max_runners, checked, after_bad_checked = len(ex.runners), 0, 0
    pending_after_bad = False
    t_start = time.perf_counter()
    k_good = 0
    for call in range(calls):
        if bad_every and call % bad_every == bad_every - 1 and both:
            kind = BAD_KINDS[(call // bad_every) % len(BAD_KINDS)]
            i = both[(call // bad_every) % len(both)]
            msg = bad_call(ex, *bad_inputs[kind, i])
            ok = msg is not None and BAD_MESSAGES[kind] in msg
            bad.append({"call": call, "kind": kind, "shape": shapes[i].label, "raised": msg is not None, "ok": ok,
                        "message": (msg or "")[:200]})
            pending_after_bad = True
            continue
        i = k_good % len(shapes)
        k_good += 1
        s = shapes[i]
        t = time.perf_counter()
        img, txt = run_call(ex, s, *inputs[i])
        sync()
        ms = (time.perf_counter() - t) * 1e3
        lat[s.label].append(ms)
        per_call.append((call, s.label, ms))
        max_runners = max(max_runners, len(ex.runners))
        if pending_after_bad or call % check_every == 0:
            same = _same(img, refs[i][0]) and _same(txt, refs[i][1])
            checked += 1
            if not same:
                exact_fail.append({"call": call, "shape": s.label})
            if pending_after_bad:
                after_bad_checked += 1
                if not same:
                    after_bad_fail.append({"call": call, "shape": s.label})
            pending_after_bad = False
        if call % sample_every == 0 or call == calls - 1:
            samples.append({"call": call, **memory()})
        if log is not None and calls >= 10 and call % max(1, calls // 10) == 0:
            log(f"  call {call}/{calls}  {s.label}  {ms:.2f} ms  runners {len(ex.runners)}")
    elapsed = time.perf_counter() - t_start

    # -- checks --------------------------------------------------------------------------------------------------
    window = max(1, min(1000, calls // 5))
    first = [m for m in samples if m["call"] < window]
    last = [m for m in samples if m["call"] >= calls - window]
    mem = {}
    for key in ("allocated", "reserved", "rss"):
        if first and last and key in first[0]:
            a, b = max(m[key] for m in first), max(m[key] for m in last)
            mem[key] = {"first_window_max": a, "last_window_max": b, "growth": (b - a) / a if a else 0.0,
                        "checked": cuda}
    mem_ok = all(v["growth"] <= 0.01 for v in mem.values() if v["checked"])
    per_shape, lat_ok = {}, True
    for label, v in lat.items():
        p50, p99 = percentile(v, 50, nearest=True), percentile(v, 99, nearest=True)
        checked_shape = len(v) >= 20 and cuda  # on CPU the interpreter's times follow the machine's load
        ok = (p99 <= 1.5 * p50) if checked_shape else None
        lat_ok &= ok is not False
        per_shape[label] = {"calls": len(v), "p50_ms": p50, "p99_ms": p99, "p99_over_p50": p99 / p50 if v else None,
                            "ok": ok}
    no_rebuild = len(ex.build_times) == built_after_warmup
    checks = {
        "memory_flat": {"ok": mem_ok, "detail": {k: round(v["growth"] * 100, 3) for k, v in mem.items()},
                        "note": "growth in % (first window -> last); checked on CUDA only"},
        "latency": {"ok": lat_ok, "detail": {k: v["ok"] for k, v in per_shape.items()},
                    "note": "p99 <= 1.5 x p50 per shape with >= 20 calls; checked on CUDA only"},
        "bad_calls_raised": {"ok": all(b["ok"] for b in bad), "detail": f"{sum(b['ok'] for b in bad)}/{len(bad)}"},
        "outputs_exact": {"ok": not exact_fail, "detail": f"{checked - len(exact_fail)}/{checked} checked calls"},
        "good_after_bad_exact": {"ok": not after_bad_fail,
                                 "detail": f"{after_bad_checked - len(after_bad_fail)}/{after_bad_checked}"},
        "runners_bounded": {"ok": (max_graphs is None or max_runners <= max_graphs) and no_rebuild,
                            "detail": {"max_runners": max_runners, "max_graphs": max_graphs,
                                       "built_after_warmup": len(ex.build_times) - built_after_warmup}},
    }
    return {
        "executor": getattr(ex, "name", type(ex).__name__), "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if cuda else "cpu", "dtype": str(ex.dtype),
        "calls": calls, "warmup_s": warmup_s, "elapsed_s": elapsed, "shapes": [asdict(s) | {"label": s.label}
                                                                             for s in shapes],
        "per_shape": per_shape, "memory": mem, "samples": samples, "per_call": per_call, "bad_calls": bad,
        "exact_failures": exact_fail + after_bad_fail, "checks": checks,
        "ok": all(c["ok"] for c in checks.values()),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    xs = [m["call"] for m in result["samples"]]
    for key, name in (("allocated", "CUDA allocated"), ("reserved", "CUDA reserved"), ("rss", "host RSS")):
        if result["samples"] and key in result["samples"][0]:
            a.plot(xs, [m[key] / 2**20 for m in result["samples"]], label=name)
    a.set_ylabel("MiB")
    a.ticklabel_format(axis="y", useOffset=False, style="plain")
    for bad in result["bad_calls"]:
        a.axvline(bad["call"], color="0.85", lw=0.5, zorder=0)
    a.legend()
    a.set_title(f"soak: {result['calls']} calls, {result['executor']} on {result['device_name']}")
    labels = sorted({c[1] for c in result["per_call"]})
    for label in labels:
        pts = [(c[0], c[2]) for c in result["per_call"] if c[1] == label]
        b.scatter([p[0] for p in pts], [p[1] for p in pts], s=3, label=label)
    b.set_yscale("log")
    b.set_ylabel("ms per call")
    b.set_xlabel("call")
    b.legend(fontsize=6, ncol=3, markerscale=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    import dualfuse
    from dualfuse.executors.fused import FusedExecutor

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

    # max_graphs: every runner of the cycle stays cached (a soak measures replays, not LRU churn)
    probe = FusedExecutor(dualfuse.load(model), dtype=dtype, device=device)
    shapes = shape_cycle(probe.io.context_length, probe.text_buckets, image_batches=image_batches,
                         text_batches=text_batches)
    keys = {probe.runner_key(s.images, s.texts, s.text_len) for s in shapes}
    ex = probe
    ex.max_graphs = max(ex.max_graphs, len(keys))
    print(f"soak: {model} {dtype} on {device}: {calls} calls over {len(shapes)} shapes ({len(keys)} runners)")
    result = soak(ex, calls, shapes=shapes, bad_every=args.bad_every or (10 if cpu else 97),
                  check_every=args.check_every or (1 if cpu else 10), log=print)
    result["model"] = model
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(result, indent=1, default=str))
    if not args.no_plot:
        plot(result, out / "soak.png")
    print_table(result)
    print(f"wrote {out / 'soak.json'}" + ("" if args.no_plot else f" and {out / 'soak.png'}"))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

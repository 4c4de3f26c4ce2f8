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

Library: :func:`run_soak` (a model) and :func:`soak` (an executor) return a :class:`SoakResult`; the command line
is dualfuse/cli/soak.py (run as ``benchmarks/soak.py``), the plot dualfuse/soak_plot.py. The command writes
``soak.json`` and ``soak.png`` (memory and latency over calls) under ``--out`` and prints a rich table.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field, fields

import torch

from .config import FusedConfig, config_of

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


@dataclass
class SoakResult:
    """One soak: what ran, per-shape latency, memory samples, bad calls and the checks (module docstring).
    ``to_dict()`` is soak.json."""

    executor: str
    device: str
    device_name: str
    dtype: str
    calls: int
    warmup_s: float
    elapsed_s: float
    shapes: list
    per_shape: dict
    memory: dict
    samples: list
    per_call: list  # (call index, shape label, ms)
    bad_calls: list
    exact_failures: list
    checks: dict
    ok: bool
    model: str | None = None
    fused_config: FusedConfig | None = None  # the fused executor's options
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("fused_config", "extra")}
        d["fused_config"] = self.fused_config.to_dict() if self.fused_config is not None else None
        return d | self.extra


def run_soak(model: str, calls: int, *, device, dtype, image_batches=(1, 2, 4, 8), text_batches=(1, 8, 64),
             bad_every: int = 97, check_every: int = 10, config: FusedConfig | None = None, log=None) -> SoakResult:
    """Build the fused executor for ``model`` (a preset name or local path; ``config``: its options) and soak it
    over the cycle of ``image_batches`` x ``text_batches`` shapes (:func:`shape_cycle`). ``max_graphs`` is raised
    to the cycle's runner count: a soak measures replays, not LRU churn."""
    from . import load
    from .executors.fused import FusedExecutor

    probe = FusedExecutor(load(model), dtype=dtype, device=device, config=config)
    shapes = shape_cycle(probe.io.context_length, probe.text_buckets, image_batches=image_batches,
                         text_batches=text_batches)
    keys = {probe.runner_key(s.images, s.texts, s.text_len) for s in shapes}
    probe.max_graphs = max(probe.max_graphs, len(keys))
    if log is not None:
        log(f"soak: {model} {dtype} on {device}: {calls} calls over {len(shapes)} shapes ({len(keys)} runners)")
    result = soak(probe, calls, shapes=shapes, bad_every=bad_every, check_every=check_every, log=log)
    result.model = model
    return result


def soak(ex, calls: int, *, shapes: list[Shape] | None = None, bad_every: int = 97, check_every: int = 10,
         sample_every: int | None = None, seed: int = 0, log=None) -> SoakResult:
    """Run the soak on executor ``ex`` (a FusedExecutor): a :class:`SoakResult` (samples, per-shape latency,
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
    return SoakResult(
        executor=getattr(ex, "name", type(ex).__name__), device=str(dev),
        device_name=torch.cuda.get_device_name(dev) if cuda else "cpu", dtype=str(ex.dtype),
        calls=calls, warmup_s=warmup_s, elapsed_s=elapsed, shapes=[asdict(s) | {"label": s.label} for s in shapes],
        per_shape=per_shape, memory=mem, samples=samples, per_call=per_call, bad_calls=bad,
        exact_failures=exact_fail + after_bad_fail, checks=checks, ok=all(c["ok"] for c in checks.values()),
        fused_config=config_of(ex),
    )

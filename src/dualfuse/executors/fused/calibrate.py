"""Calibrate the fused executor's choices on this card, once: time both implementations of every linear and
attention stage of a model's call shapes, and (for ``executor="auto"``) the fused and graph executors end to end;
merge into this card's calibration cache (dualfuse.calibration).

    from dualfuse.executors.fused.calibrate import calibrate
    result = calibrate("clip-vit-l-14", shapes=[(1, 1, 77), (256, 0, 77), (0, 1024, 77)])
    print(result.seconds, result.path)

Stage timings: the stage's launch (or a single step's launch) replayed ``repeats`` times back to back inside one
CUDA graph (dualfuse.timing.time_graph, so launch overhead is the graph's, as in a real call), median over
``replays`` replays, in microseconds per launch; for a stage of two steps, also each step alone on Triton and on
the library. The buffers hold small random values while timing. Call timings: the median of ``iters`` calls of
``encode`` (dualfuse.timing.time_calls) per shape, the fused executor already using the new stage choices.

Where the timings go: ``Calibration.steps`` / ``stages`` (keyed by shape signatures, shared by every model) and
``Calibration.calls[model key][call family]`` (the last shape timed in a family wins). ``timer``: a replacement
for the stage timer, ``timer(op) -> microseconds`` (CPU tests give fixed numbers).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ... import calibration as C

STAGE_KINDS = ("linear", "attention")


@dataclass
class CalibrationResult:
    path: str | None
    seconds: float
    stages_timed: int
    calls: dict = field(default_factory=dict)  # family -> {"fused": ms, "graph": ms, "shape": [...]}
    choices: dict = field(default_factory=dict)  # "BxTxL" -> list of (step labels, implementations, why)

    def to_dict(self) -> dict:
        return dict(path=self.path, seconds=self.seconds, stages_timed=self.stages_timed, calls=self.calls,
                    choices=self.choices)


def graph_timer(repeats: int = 20, replays: int = 15):
    """Microseconds per launch of ``op``: ``repeats`` launches per CUDA-graph replay, median of ``replays``."""
    from ...timing import stats, time_graph

    def timer(op) -> float:
        ms = time_graph([[op] * repeats], replays, warmup=3, warm_ms=5.0)
        return stats(ms)["median_ms"] * 1e3 / repeats

    return timer


def _randomize(runner) -> None:
    """Small random values in every floating buffer (torch.empty may hold NaNs / infs)."""
    g = torch.Generator(device=runner.ex.device).manual_seed(0)
    for b in runner.buf.values():
        for v in vars(b).values():
            if isinstance(v, torch.Tensor) and v.is_floating_point() and v._base is None:
                v.copy_(torch.randn(v.shape, generator=g, device=v.device, dtype=torch.float32) * 0.1)


def time_stages(ex, shape, cal: "C.Calibration", timer) -> int:
    """Time the linear / attention stages of ``ex``'s runner for ``shape`` (both implementations) into ``cal``;
    returns how many timings were taken (signatures already in ``cal`` are not timed again)."""
    from ...plan import Stage
    from .library import LIBRARY_OPS, library_ok, signature

    bi, bt, n = shape
    r = ex.runner(bi, bt, n, capture=False)
    _randomize(r)
    taken = 0
    for i, stage in enumerate(r.plan.stages):
        if stage.kind not in STAGE_KINDS:
            continue
        problems = r.stage_problems[i]
        sigs = [signature(p) for p in problems]
        if len(sigs) > 1 and C.stage_key(sigs) not in cal.stages:
            cal.stages[C.stage_key(sigs)] = {C.TRITON: timer(r.ops[i])}
            taken += 1
        for step, p, sig in zip(stage.steps, problems, sigs):
            entry = cal.steps.setdefault(sig, {})
            if C.TRITON not in entry:
                op = r.ops[i] if len(sigs) == 1 else r.build_triton(Stage(stage.kind, [step]), [p])
                entry[C.TRITON] = timer(op)
                taken += 1
            if C.LIBRARY not in entry and library_ok(p):
                entry[C.LIBRARY] = timer(LIBRARY_OPS[stage.kind]([p]))
                taken += 1
    dropped = ex.runners.pop(ex.runner_key(bi, bt, n), None)  # its buffers go (a user call builds its own)
    if dropped is not None:
        dropped.release()
    return taken


def calibrate(model, shapes, *, dtype=None, device=None, path: str | None = None, calls: bool = True,
              iters: int = 30, warmup: int = 5, timer=None, save: bool = True, log=None,
              fresh: bool = False) -> CalibrationResult:
    """Calibrate ``model`` (preset name or model object) on ``device`` for ``shapes`` (a list of
    ``(images, texts, text_len)``); merged into the cache file (``path``: this file instead) and saved. ``calls``:
    also time the fused and graph executors end to end per shape (for ``executor="auto"``). Timings already in
    the file are kept (not taken again) unless ``fresh``: then the file is rewritten from this run's timings alone
    (e.g. after a run on a busy or throttled card)."""
    from ... import presets
    from ...adapters import to_spec
    from ...bench import call_towers, random_inputs
    from ...timing import stats, sync, time_calls
    from .. import get
    from ..base import resolve_device, resolve_dtype

    t0 = time.perf_counter()
    log = log or (lambda msg: None)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    source = presets.load(model) if isinstance(model, str) else model
    spec = to_spec(source)
    shapes = [tuple(s) for s in shapes]
    ctx = spec.text.context_length if spec.text is not None else None
    for s in shapes:
        if (len(s) != 3 or not all(isinstance(x, int) and not isinstance(x, bool) for x in s) or min(s) < 0
                or s[0] + s[1] == 0):
            raise ValueError(f"calibrate: expected shapes (images, texts, text_len) of ints >= 0, got {s!r}")
        for n, tower in ((s[0], "vision"), (s[1], "text")):
            if n and getattr(spec, tower) is None:
                raise ValueError(f"calibrate: shape {s!r} asks for {'images' if tower == 'vision' else 'texts'}, "
                                 f"but this model has no {tower} tower (a single {spec.tower} tower)")
        if s[1] and not 1 <= s[2] <= ctx:
            raise ValueError(f"calibrate: text length must be in [1, {ctx}], got shape {s!r}")
    if calls and spec.tower is not None:  # executor 'auto' serves dual encoders only: nothing would read them
        log("calibrate: a single tower: stages only (executor 'auto', which reads call timings, is for dual "
            "encoders)")
        calls = False
    ident = C.identity(device)
    cal = (None if fresh else C.load(device, path=path, ident=ident)) or C.Calibration(ident, path=path)
    if timer is None:
        if device.type != "cuda":
            raise ValueError("calibrate: timing needs a CUDA device (or a timer=... for tests)")
        timer = graph_timer()
    ex = get("fused", source, dtype=dtype, device=device, spec=spec, gemm_impl="triton")
    if ex.fallback is not None:
        raise ValueError(f"calibrate: the fused kernels do not cover this model ({ex.notes})")
    taken = 0
    for s in shapes:
        log(f"calibrate: stages of {s[0]} image(s) + {s[1]} text(s) of {s[2]} tokens")
        taken += time_stages(ex, s, cal, timer)
    del ex
    result = CalibrationResult(None, 0.0, taken)
    fused = get("fused", source, dtype=dtype, device=device, spec=spec, gemm_impl="auto", calibration=cal)
    for s in shapes:
        key = f"{s[0]}x{s[1]}x{s[2]}"
        result.choices[key] = [(c["steps"], c["impls"], c["why"]) for c in fused.library_choices(*s)
                               if c["kind"] in STAGE_KINDS and "library" in c["impls"]]
    if calls:
        graph = get("graph" if device.type == "cuda" else "eager", source, dtype=dtype, device=device, spec=spec)
        mkey = C.model_key(spec, dtype, fused.weight_format)
        for s in shapes:
            fam = C.call_family(s[0], s[1])
            log(f"calibrate: fused vs graph at {s} ({fam})")
            inputs = random_inputs(spec, s[0], s[1], s[2], sets=2, device=device, dtype=dtype)
            row = {"shape": list(s)}
            with torch.no_grad():
                for name, ex in (("fused", fused), ("graph", graph)):
                    for i in range(warmup + 1):
                        call_towers(ex, *inputs[i % 2])
                    sync(device)
                    row[name] = stats(time_calls(lambda i: call_towers(ex, *inputs[i % 2]), iters, device))["median_ms"]
            cal.calls.setdefault(mkey, {})[fam] = row
            result.calls[fam] = row
        del graph
    del fused
    if save:
        result.path = cal.save(path)
    result.seconds = time.perf_counter() - t0
    return result

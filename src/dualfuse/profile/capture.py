"""Capture: run an executor under torch.profiler with per-tower/layer/op labels (labels.py) and turn the trace
into a flat list of :class:`~dualfuse.profile.analyze.Event` — one per GPU kernel (CUDA) or per top-level CPU op
(CPU) — attributed to towers, layers and ops (attribution.py; CUDA graph replays: matching.py).

compile is profiled as its two per-tower compiled graphs, ``encode_image`` then ``encode_text``, each inside a
tower range: exactly the kernels Inductor generates for each tower (``encode`` compiles both towers into one graph
on one stream, i.e. the same kernels back to back, one graph launch instead of two). Inductor fuses across layers,
so compile kernels are attributed to towers, not layers. The unprofiled latency is measured on ``encode``.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import torch

from ..bench import call_towers
from ..timing import stats, sync, time_calls
from .analyze import Event
from .attribution import AttributionInfo, allocate_costs, contextual_classes, extract
from .labels import FORWARD, Labeller, Range, label
from .matching import match_order
from .trace import TraceIndex, load_trace


@dataclass
class Capture:
    events: list[Event]
    windows: list[tuple[float, float]]
    notes: list[str]
    trace_path: str | None
    mode: str
    plan: object = None
    attributed_by: str = ""
    latency: dict | None = None


def executor_mode(ex) -> str:
    from ..executors.fused import FusedExecutor

    if isinstance(ex, FusedExecutor):
        return "fused" if ex.fallback is None else "full"
    name = getattr(ex, "name", "")
    if not (hasattr(ex, "model") and hasattr(ex, "image_fn") and hasattr(ex, "text_fn")):
        return "none"
    if name == "compile":
        return "split"
    return "full"


def _runner_key(ex, px, ids):
    bi = px.shape[0] if px is not None else 0
    bt = ids.shape[0] if ids is not None else 0
    L = ids.shape[1] if ids is not None else ex.io.context_length
    return bi, bt, L


def capture(ex, px, ids, *, iters: int = 3, warmup: int = 1, nvtx: bool = False, trace_path: str | None = None,
            latency_runs: int | None = None) -> Capture:
    """Profile ``iters`` forwards of ``ex`` on (px, ids) after ``warmup`` ones; see the module docstring.

    ``latency_runs``: unprofiled, unlabelled calls timed afterwards (default 20 on CUDA, 2 on CPU; 0 = none)."""
    from torch.profiler import ProfilerActivity, profile

    from ..plan import make_plan

    device = ex.device
    cuda = device.type == "cuda"
    nvtx = nvtx and cuda
    mode = executor_mode(ex)
    target = ex.fallback if mode == "full" and getattr(ex, "fallback", None) is not None else ex
    notes: list[str] = []
    if target is not ex:
        notes.append(f"the fused executor fell back to {target.name!r} for this model: profiling that")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:  # start CUPTI once before the runs (and any graph capture) so that graph kernels are reported
        with profile(activities=acts):
            torch.cuda.synchronize(device)
    bi, bt, L = _runner_key(ex, px, ids)
    elt = torch.finfo(ex.dtype).bits // 8
    plan = make_plan(ex.spec, bi, bt, L, elt=elt)
    runner = stage_blocks = None
    if mode == "fused":
        runner = ex.runner(bi, bt, L)
        plan = runner.plan
        stage_blocks = [getattr(op, "num_programs", None) for op in runner.ops]
    graph_replay = (mode == "fused" and runner.graph is not None) or \
        (cuda and getattr(target, "name", "") == "graph")
    info = AttributionInfo(mode=mode, device_type="cuda" if cuda else "cpu", plan=plan, stage_blocks=stage_blocks,
                           elt=elt)
    split = mode == "split"
    if split and (px is None or ids is None):
        split = False  # one tower: encode_image / encode_text is what runs anyway; label it as that tower
    inductor_cfg = _inductor_kernel_names(True) if (mode == "split" and not cuda) else None
    tmpdir = tempfile.mkdtemp(prefix="dualfuse-profile-")
    path = trace_path or os.path.join(tmpdir, "trace.json")
    latency = refs = None
    # graph capture and compilation must happen before the profiled runs
    warm = max(warmup, 1) if (cuda or mode == "split") else max(warmup, 0)

    def call():
        if split:  # one tower after the other, each in its tower range (compile: see the module docstring)
            with Range(label("vision"), nvtx):
                img = ex.encode_image(px)
            with Range(label("text"), nvtx):
                return img, ex.encode_text(ids)
        if mode == "split":  # one tower of compile: label it
            with Range(label("vision" if px is not None else "text"), nvtx):
                return call_towers(ex, px, ids)
        return call_towers(ex, px, ids)

    try:
        with Labeller(target, mode, nvtx=nvtx, runner=runner), torch.no_grad():
            for _ in range(warm):
                call()
            sync(device)
            if graph_replay:
                refs = _reference(target, mode, runner, px, ids, info, acts, tmpdir, notes)
            with profile(activities=acts, record_shapes=True) as prof:
                for i in range(iters):
                    with Range(f"{FORWARD}{i}", nvtx):
                        call()
                    sync(device)
            prof.export_chrome_trace(path)
        runs = latency_runs if latency_runs is not None else (max(iters, 20) if cuda else max(iters, 2))
        if runs > 0:
            with torch.no_grad():
                call_towers(ex, px, ids)  # compile: encode's own graph compiles here, outside the timing
                sync(device)
                latency = measure_latency(ex, px, ids, runs)
    finally:
        if inductor_cfg is not None:
            _inductor_kernel_names(inductor_cfg)
    ext = extract(path, info)
    notes += ext.notes
    events = ext.events
    attributed_by = {"full": "labels: record_function ranges around each tower, block and op",
                     "split": "tower labels: compile's per-tower graphs (encode_image, encode_text) in tower ranges; "
                              "Inductor fuses across layers, so there is no per-layer split",
                     "fused": "plan stages: one launch per stage",
                     "none": "none: this executor has no labels"}[mode]
    if graph_replay:
        attributed_by += "; CUDA graph replays matched in launch order to a labelled run outside the graph"
        for it, rep in sorted(ext.replay.items()):
            if refs is None:
                notes.append("no labelled reference run: CUDA graph kernels left unattributed")
            else:
                _, note = match_order(rep, refs)
                if note and note not in notes:
                    notes.append(note)
                if mode == "full":  # costs and classes from the groups, as for kernels launched in ranges
                    for e in rep:
                        e.flops = e.bytes = e.cost_source = None
            events += rep
        if mode == "full":
            contextual_classes(events)
    elif ext.replay:
        for rep in ext.replay.values():
            events += rep
        notes.append("kernels from CUDA graph replays could not be attributed (no labelled run to match)")
    allocate_costs(events, plan if mode in ("full", "split") else None, notes)
    if mode == "none":
        notes.append(f"executor {getattr(ex, 'name', type(ex).__name__)!r} has no labels: its kernels are "
                     "unattributed (profile knows how to label dualfuse's own executors)")
    if split:
        notes.append("compile was profiled as encode_image + encode_text (two compiled graphs) to attribute kernels "
                     "to towers; the latency line is encode (one graph)")
    events.sort(key=lambda e: (e.iteration, e.start_us))
    return Capture(events, ext.windows, notes, path, mode, plan, attributed_by, latency)


def _inductor_kernel_names(value):
    """Set Inductor's C++ kernel profiling flag (CPU kernels show up as ops); returns the previous value."""
    try:
        import torch._inductor.config as icfg
        old = icfg.cpp.enable_kernel_profile
        icfg.cpp.enable_kernel_profile = value
        return old
    except Exception:  # noqa: BLE001
        return None


def _reference(target, mode, runner, px, ids, info, acts, tmpdir, notes):
    """One labelled run outside the CUDA graph: per-tower (graph) or per-stage (fused) kernel sequences."""
    from torch.profiler import profile

    path = os.path.join(tmpdir, "reference.json")
    try:
        with profile(activities=acts, record_shapes=True) as prof:
            with torch.profiler.record_function(f"{FORWARD}ref"):
                if mode == "fused":
                    runner.launch_all()
                else:
                    vpx, vids = target.validate(px, ids)
                    if vpx is not None:
                        target.image_fn(vpx)
                    if vids is not None:
                        target.text_fn(vids)
            sync(target.device)
        prof.export_chrome_trace(path)
    except Exception as e:  # noqa: BLE001
        notes.append(f"labelled reference run failed ({type(e).__name__}: {e}); graph kernels unattributed")
        return None
    index = TraceIndex(load_trace(path))
    ref_info = AttributionInfo(mode=mode, device_type=info.device_type, plan=info.plan,
                               stage_blocks=info.stage_blocks, elt=info.elt)
    # extract() keeps only forwards with an iteration: the reference forward is iteration -1
    ext = extract(index, ref_info)
    evs = [e for e in ext.events if e.iteration == -1]
    if mode == "full":
        allocate_costs(evs, info.plan)
    evs.sort(key=lambda e: e.start_us)
    if mode == "fused":
        return [evs]
    return [[e for e in evs if e.tower == "vision"], [e for e in evs if e.tower == "text"]]


def measure_latency(ex, px, ids, runs: int) -> dict:
    """Unprofiled, unlabelled per-call latency (ms): median and p90 of ``runs`` calls."""
    if runs <= 0:
        return {}
    s = stats(time_calls(lambda i: call_towers(ex, px, ids), runs, ex.device))
    return dict(median_ms=s["median_ms"], p90_ms=s["p90_ms"], runs=s["runs"],
                timer="cuda events" if ex.device.type == "cuda" else "perf_counter")

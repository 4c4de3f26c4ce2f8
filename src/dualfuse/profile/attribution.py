"""Attribution: which tower, layer and op each kernel (or CPU op) of a trace belongs to, and its FLOPs and bytes.

A CUDA kernel belongs to the innermost label around the host call that launched it (the profiler's correlation id
links kernel and launch). Kernels replayed from a CUDA graph have no labels around them: :func:`extract` sets them
aside for matching.py, which matches them in launch order to the kernels of one labelled run outside the graph.
Kernels whose launch record is missing are placed in a forward by time and marked ``unattributed``.

Costs: each plan step's FLOPs and bytes go to the kernels of its group (:func:`allocate_costs`); kernels the plan
does not cover get estimates from their recorded input shapes (:func:`shape_cost`)."""
from __future__ import annotations

import math
from bisect import bisect_right
from collections import defaultdict
from dataclasses import dataclass

from .analyze import STEP_CLASS, Event, classify
from .trace import Node, TraceIndex, context, cpu_kernels, load_trace

ATTENTION_OPS = ("attn", "map_attn")
EMBED_OPS = ("patch_embed", "token_embed")
# plan step -> eager groups that may hold its kernels, most specific first (open_clip and SigLIP's MAP head use
# nn.MultiheadAttention: the packed in-projection and the out-projection run inside the "attn" range)
ALIASES = {"qkv": ("attn",), "out": ("attn",), "map_kv": ("map_attn",), "map_out": ("map_attn",),
           "final_ln": ("pool_ln",), "pool_ln": ("final_ln",)}
# on CPU a fused stage's range is its launch and has no kernel name: the event is named after its kind
STAGE_OPS = {"linear": "GroupedLinear", "layernorm": "GroupedLayerNorm", "attention": "GroupedAttention",
             "embed": "Embeddings", "pool_index": "PoolIndices"}


@dataclass
class AttributionInfo:
    """What the attribution needs to know about the run."""

    mode: str  # full | split | fused | none
    device_type: str  # cuda | cpu
    plan: object = None  # dualfuse.plan.Plan of the profiled call
    stage_blocks: list | None = None  # fused: programs per stage launch
    elt: int = 2


_ELT = {"float": 4, "c10::Half": 2, "c10::BFloat16": 2, "double": 8, "long int": 8, "int": 4, "bool": 1,
        "unsigned char": 1, "signed char": 1, "short int": 2, "c10::Float8_e4m3fn": 1}


def shape_cost(name: str, dims, types) -> tuple[float, float] | None:
    """(flops, bytes) of one op estimated from its recorded input shapes; None if not estimable."""
    if not dims:
        return None
    tens = [(d, _ELT.get(t, 0)) for d, t in zip(dims, types or [""] * len(dims))
            if isinstance(d, list) and d and all(isinstance(x, int) for x in d) and _ELT.get(t, 0)]
    if not tens:
        return None
    numel = [math.prod(d) for d, _ in tens]
    elt = tens[0][1]
    n = name.lower()
    try:
        if n.endswith(("::mm", "::addmm", "::linear", "::matmul", "::_addmm_activation")):
            mats = [d for d, _ in tens if len(d) >= 2]
            if len(mats) >= 2:
                a, b = mats[0], mats[1]
                m, k = math.prod(a[:-1]), a[-1]
                nn_ = b[0] if n.endswith("::linear") else b[-1]
                return 2.0 * m * nn_ * k, elt * (m * k + k * nn_ + m * nn_)
        if n.endswith(("::bmm", "::baddbmm")):
            mats = [d for d, _ in tens if len(d) == 3]
            if len(mats) >= 2:
                (bb, m, k), (_, _, nn_) = mats[-2], mats[-1]
                return 2.0 * bb * m * nn_ * k, elt * bb * (m * k + k * nn_ + m * nn_)
        if "attention" in n and len(tens) >= 3 and len(tens[0][0]) == 4:
            (b, h, s, d), sk = tens[0][0], tens[1][0][-2]
            return 4.0 * b * h * s * sk * d, elt * (2 * b * h * s * d + 2 * b * h * sk * d)
        if "norm" in n:
            return 8.0 * numel[0], elt * 2.0 * numel[0]
    except (TypeError, ValueError, IndexError):
        return None
    return float(max(numel)), float(elt * (sum(numel) + max(numel)))


def _op_class(name: str, op: str | None, group_has_linear: bool) -> str:
    cls = classify(name)
    if op in EMBED_OPS:
        return "embed"
    if op in ATTENTION_OPS:
        low = name.lower()
        if "bmm" in low or (cls == "gemm" and not group_has_linear):
            return "attention"
    return cls


def _event_from(kernel_name, ts, dur, lab, fwd_it, info: AttributionInfo, launch_op: Node | None,
                default_tower: str) -> Event:
    e = Event(name=kernel_name, start_us=ts, dur_us=dur, iteration=fwd_it)
    if launch_op is not None:
        e.cpu_op = launch_op.name
        e.shapes = launch_op.args.get("Input Dims")
        e.dtypes = launch_op.args.get("Input type")
    if lab is None:
        e.tower = default_tower
        e.op_class = classify(kernel_name)
        if e.op_class == "other" and launch_op is not None:
            e.op_class = classify(launch_op.name)
        if default_tower == "host":
            e.op = launch_op.name.split("::")[-1] if launch_op is not None else kernel_name.split("::")[-1]
        elif default_tower in ("vision", "text"):
            e.op = "misc"
        return e
    if lab["kind"] == "stage":
        _apply_stage(e, lab["stage"], info)
        return e
    e.tower, e.layer, e.op = lab["tower"], lab["layer"], lab["op"] or "misc"
    return e


def _apply_stage(e: Event, k: int, info: AttributionInfo):
    plan = info.plan
    if plan is None or not 0 <= k < len(plan.stages):
        e.tower = "unattributed"
        return
    st = plan.stages[k]
    towers = {s.tower for s in st.steps}
    e.tower = "both" if len(towers) > 1 else st.steps[0].tower
    e.layer = st.steps[0].layer
    ops = [s.op for s in st.steps]
    e.op = ops[0] if len(set(ops)) == 1 else "+".join(ops)
    e.op_class = STEP_CLASS.get(st.kind, "other")
    e.flops, e.bytes, e.cost_source = float(st.flops), float(st.bytes), "plan"
    e.parts = [dict(tower=s.tower, layer=s.layer, op=s.op, flops=s.flops, bytes=s.bytes, label=s.label)
               for s in st.steps]
    if info.stage_blocks is not None and e.blocks is None and k < len(info.stage_blocks):
        e.blocks = info.stage_blocks[k]
    if not e.name:  # CPU: the stage's range is the launch
        e.name = STAGE_OPS.get(st.kind, st.kind)


@dataclass
class Extracted:
    events: list[Event]
    windows: list[tuple[float, float]]
    replay: dict  # iteration -> list of Event waiting for order attribution (graph replays)
    notes: list[str]


def extract(trace, info: AttributionInfo) -> Extracted:
    """Events of every profiled forward (and of a 'ref' forward, iteration -1), attributed where labels allow."""
    index = trace if isinstance(trace, TraceIndex) else TraceIndex(load_trace(trace))
    notes: list[str] = []
    fwd_nodes = index.forwards()
    fwd_by_it = {n.label["iteration"]: n for n in fwd_nodes}
    default = {"full": "host", "split": "host", "fused": "host"}.get(info.mode, "unattributed")

    events: list[Event] = []
    replay: dict[int, list[Event]] = defaultdict(list)

    if info.device_type == "cuda":
        if not index.device:
            notes.append("the profiler recorded no GPU activity (CUPTI unavailable?): nothing to attribute")
        orphans = []
        for d in index.device:
            args = d.get("args") or {}
            corr = args.get("correlation")
            rt = index.runtime_by_corr.get(int(corr)) if corr is not None else None
            ts, dur = float(d.get("ts", 0.0)), float(d.get("dur", 0.0))
            if not d.get("name"):
                d = dict(d, name=d.get("cat", "gpu event"))
            if rt is None:
                orphans.append((ts, dur, d))
                continue
            lab, fwd, op = context(rt)
            if fwd is None:
                continue
            it = fwd["iteration"]
            graph_launch = "graphlaunch" in rt.name.lower().replace("_", "")
            if lab is None and graph_launch:
                e = Event(name=d.get("name", ""), start_us=ts, dur_us=dur, iteration=it, tower="unattributed",
                          op_class=classify(d.get("name", "")))
            else:
                e = _event_from(d.get("name", ""), ts, dur, lab, it, info, op,
                                default)
            grid = args.get("grid")
            if isinstance(grid, list) and grid:
                e.blocks = int(math.prod(grid))
            e.stream = args.get("stream", d.get("tid"))
            (replay[it] if (lab is None and graph_launch) else events).append(e)
        if orphans:
            # kernels without a launch record: place them in a forward by time (the device is synchronized
            # after every forward), never guess the tower
            fw = sorted((n.ts, n.label["iteration"], n.end) for n in fwd_nodes)
            last_end = defaultdict(float)
            for e in events:
                last_end[e.iteration] = max(last_end[e.iteration], e.end_us)
            n_orph = 0
            for ts, dur, d in orphans:
                k = bisect_right([s for s, _, _ in fw], ts) - 1
                if k < 0:
                    continue
                limit = fw[k + 1][0] if k + 1 < len(fw) else max(fw[k][2], last_end[fw[k][1]])
                if ts >= limit:
                    continue
                n_orph += 1
                events.append(Event(name=d.get("name", ""), start_us=ts, dur_us=dur, iteration=fw[k][1],
                                    tower="unattributed", op_class=classify(d.get("name", ""))))
            if n_orph:
                notes.append(f"{n_orph} GPU events had no launch record in the trace: marked unattributed")
    else:
        for n in cpu_kernels(index):
            lab, fwd, _ = context(n)
            if n.label is not None and n.label["kind"] == "stage":
                lab = n.label
            if fwd is None:
                continue
            it = fwd["iteration"]
            name = n.name
            if lab is not None and lab["kind"] == "stage":
                name = ""
            e = _event_from(name, n.ts, n.dur, lab, it, info, n, default)
            events.append(e)

    contextual_classes(events)

    # windows: forward start .. max(forward end, last device event of the forward)
    windows = []
    last = defaultdict(float)
    for e in events:
        last[e.iteration] = max(last[e.iteration], e.end_us)
    for e_list in replay.values():
        for e in e_list:
            last[e.iteration] = max(last[e.iteration], e.end_us)
    its = sorted(i for i in fwd_by_it if i >= 0)
    for i in its:
        n = fwd_by_it[i]
        windows.append((n.ts, max(n.end, last.get(i, n.end))))
    return Extracted(events, windows, dict(replay), notes)


def contextual_classes(events: list[Event]) -> None:
    """Op classes in context: everything in an embedding range is 'embed'; GEMMs inside an attention range that
    holds no projections (theirs ran in ranges of their own) are attention's."""
    separate = {(e.tower, e.layer) for e in events if e.op in ("qkv", "out")}
    for e in events:
        if e.parts is None and e.tower in ("vision", "text"):
            e.op_class = _op_class(e.name, e.op, group_has_linear=(e.tower, e.layer) not in separate)


# ---------------------------------------------------------------------------------------------- costs

def allocate_costs(events: list[Event], plan, notes: list[str] | None = None) -> None:
    """Give labelled events FLOPs and bytes: each plan step's cost goes to the kernels of its group
    (tower, layer, op; aliases; the block's unlabelled work; the whole tower) whose op class matches the step,
    split by duration; the rest get estimates from their recorded shapes where possible."""
    by_it = defaultdict(list)
    for e in events:
        if e.cost_source is None and e.tower in ("vision", "text"):
            by_it[e.iteration].append(e)
    missing = 0
    if plan is not None:
        for it, evs in by_it.items():
            groups = defaultdict(list)
            for e in evs:
                groups[(e.tower, e.layer, e.op)].append(e)
            for st in plan.stages:
                for s in st.steps:
                    if not _allocate_step(s, groups, evs):
                        missing += 1
    for e in events:
        if e.cost_source is None and e.shapes:
            c = shape_cost(e.cpu_op or e.name, e.shapes, e.dtypes)
            if c is not None:
                e.flops, e.bytes, e.cost_source = c[0], c[1], "shapes"
    if missing and notes is not None and by_it:
        notes.append(f"{missing // max(len(by_it), 1)} plan step(s) per forward found no kernel of their op class "
                     "to carry their FLOPs/bytes (their work ran inside other kernels); those FLOPs/bytes are "
                     "left out of the roofline")


def _allocate_step(step, groups, evs) -> bool:
    cls = STEP_CLASS.get(step.kind, "other")
    t, l = step.tower, step.layer
    exact = [(t, l, step.op)] + [(t, l, a) for a in ALIASES.get(step.op, ())]
    for key in exact:
        ks = groups.get(key)
        if ks:
            return _spread(step, [k for k in ks if k.op_class == cls] or ks)
    broader = [[e for e in groups.get((t, l, "misc"), [])],
               [e for (gt, gl, _), es in groups.items() if gt == t and gl == l for e in es],
               [e for (gt, _, _), es in groups.items() if gt == t for e in es]]
    for ks in broader:
        match = [k for k in ks if k.op_class == cls]
        if match:
            return _spread(step, match)
    return False


def _spread(step, kernels) -> bool:
    total = sum(k.dur_us for k in kernels) or float(len(kernels))
    for k in kernels:
        w = (k.dur_us / total) if total else 1.0 / len(kernels)
        k.flops = (k.flops or 0.0) + step.flops * w
        k.bytes = (k.bytes or 0.0) + step.bytes * w
        k.cost_source = "plan"
    return True

"""Pure functions over flat event lists: busy time, gaps, tower overlap, per-tower/per-layer sums, top kernels,
per-op-class achieved FLOP/s and bytes/s against measured ceilings (roofline), and the verdict sentence.

Nothing here touches torch or the profiler: the capture turns a trace into :class:`Event` lists, and everything
the report says is computed from those lists by the functions below (tests feed them synthetic events).

Definitions (all times in microseconds):

- *busy*: the length of the union of the events' intervals (concurrent kernels count once).
- *wall*: one forward's window, from the start of the call on the host to the end of its last kernel.
- *idle* = wall - busy = *lead* (call start to first kernel) + *gaps* + *tail* (last kernel end to window end).
- *gaps*: idle intervals between consecutive busy intervals (lead and tail are not gaps).
- *overlap*: the length of (union of vision events) ∩ (union of text events), where a fused kernel serving both
  towers (tower ``"both"``) counts in both unions; reported as a fraction of the wall.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass, fields

TOWERS = ("vision", "text", "both", "host", "unattributed")
OP_CLASSES = ("gemm", "attention", "norm", "elementwise", "embed", "other")
STEP_CLASS = {"linear": "gemm", "attention": "attention", "layernorm": "norm", "embed": "embed",
              "pool_index": "other"}


@dataclass
class Event:
    """One kernel (GPU) or one top-level op (CPU) of one profiled forward."""

    name: str
    start_us: float
    dur_us: float
    tower: str = "unattributed"  # vision | text | both | host | unattributed
    layer: int | None = None  # block index; None for embeddings, heads and host work
    op: str | None = None  # plan step name (qkv, attn, fc1, ...) or an eager-only op (act, misc, ...)
    op_class: str = "other"  # one of OP_CLASSES
    blocks: int | None = None  # grid size (thread blocks / programs) when known
    flops: float | None = None
    bytes: float | None = None
    iteration: int = 0
    stream: int | None = None
    parts: list | None = None  # fused kernels: one dict per tower step (tower, layer, op, flops, bytes)
    cost_source: str | None = None  # "plan" | "shapes" | None (unknown)
    cpu_op: str | None = None  # the host op that launched it (GPU) or the op itself (CPU)
    shapes: list | None = None  # input shapes of that op, when recorded
    dtypes: list | None = None

    @property
    def end_us(self) -> float:
        return self.start_us + self.dur_us

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("shapes")
        d.pop("dtypes")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Event":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ------------------------------------------------------------------------------------------ intervals

def union(intervals) -> list[tuple[float, float]]:
    """Merge (start, end) intervals into a sorted list of disjoint ones (touching intervals merge)."""
    out: list[list[float]] = []
    for s, e in sorted((float(s), float(e)) for s, e in intervals if e > s):
        if out and s <= out[-1][1]:
            if e > out[-1][1]:
                out[-1][1] = e
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def length(intervals) -> float:
    return sum(e - s for s, e in intervals)


def intersect(a, b) -> list[tuple[float, float]]:
    """Intersection of two sorted disjoint interval lists."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        s, e = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if e > s:
            out.append((s, e))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def clip(intervals, lo: float, hi: float) -> list[tuple[float, float]]:
    return [(max(s, lo), min(e, hi)) for s, e in intervals if min(e, hi) > max(s, lo)]


def spans(events) -> list[tuple[float, float]]:
    return [(e.start_us, e.end_us) for e in events]


def busy_us(events) -> float:
    """Time with at least one event in flight."""
    return length(union(spans(events)))


def gaps(events, window: tuple[float, float] | None = None) -> dict:
    """Idle intervals between consecutive busy intervals (inside ``window`` if given): count, total, largest,
    plus the lead (window start to the first event) and tail (last event end to window end)."""
    busy = union(spans(events))
    if window is not None:
        busy = clip(busy, *window)
    holes = [(busy[k][1], busy[k + 1][0]) for k in range(len(busy) - 1)]
    lead = tail = 0.0
    if window is not None:
        lead = (busy[0][0] - window[0]) if busy else (window[1] - window[0])
        tail = (window[1] - busy[-1][1]) if busy else 0.0
    sizes = [e - s for s, e in holes]
    return dict(count=len(holes), total_us=sum(sizes), largest_us=max(sizes, default=0.0),
                mean_us=(sum(sizes) / len(sizes)) if sizes else 0.0, lead_us=lead, tail_us=tail,
                intervals=holes)


def tower_union(events, tower: str) -> list[tuple[float, float]]:
    """Union of the intervals of one tower's events; fused kernels (tower "both") count for both towers."""
    return union(spans(e for e in events if e.tower in (tower, "both")))


def overlap_us(events) -> float:
    """Time when both towers have a kernel in flight (a fused "both" kernel counts for both)."""
    return length(intersect(tower_union(events, "vision"), tower_union(events, "text")))


def concurrent_us(events) -> float:
    """Like overlap_us but counting only separate vision and text kernels running at once (no fused ones)."""
    a = union(spans(e for e in events if e.tower == "vision"))
    b = union(spans(e for e in events if e.tower == "text"))
    return length(intersect(a, b))


def window_stats(events, window: tuple[float, float]) -> dict:
    """Every timeline number of one forward: wall, busy, idle, gaps, lead/tail, overlap, kernel count.

    ``events`` are the forward's own (attributed to it); the count is theirs, while the times are clipped to the
    window, which spans them: a zero-length op at the window's edge (µs timestamps) counts without a length."""
    lo, hi = window
    wall = hi - lo
    inside = [e for e in events if e.end_us > lo and e.start_us < hi]
    busy = length(clip(union(spans(inside)), lo, hi))
    g = gaps(inside, window)
    ov = length(clip(intersect(tower_union(inside, "vision"), tower_union(inside, "text")), lo, hi))
    both = length(clip(union(spans(e for e in inside if e.tower == "both")), lo, hi))
    return dict(wall_us=wall, busy_us=busy, idle_us=wall - busy,
                busy_frac=busy / wall if wall > 0 else 0.0, idle_frac=(wall - busy) / wall if wall > 0 else 0.0,
                kernels=len(events), gaps=g["count"], gap_total_us=g["total_us"], gap_largest_us=g["largest_us"],
                gap_mean_us=g["mean_us"], lead_us=g["lead_us"], tail_us=g["tail_us"], overlap_us=ov,
                overlap_frac=ov / wall if wall > 0 else 0.0, concurrent_us=concurrent_us(inside),
                fused_us=both, kernel_sum_us=sum(e.dur_us for e in inside))


def _median(xs):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else 0.5 * (xs[m - 1] + xs[m])


def summarize_windows(per_iter: list[dict]) -> dict:
    """Median of every per-forward number over the profiled forwards."""
    if not per_iter:
        return {}
    return {k: _median([d[k] for d in per_iter]) for k in per_iter[0]}


# ------------------------------------------------------------------------------------------ tables

def _per(events, iters: int):
    return max(int(iters), 1)


def by_tower(events, iters: int = 1) -> list[dict]:
    """Kernel count and summed kernel time per tower, per forward (sums, not unions)."""
    n = _per(events, iters)
    acc = defaultdict(lambda: [0, 0.0, 0.0, 0.0])
    for e in events:
        a = acc[e.tower]
        a[0] += 1
        a[1] += e.dur_us
        a[2] += e.flops or 0.0
        a[3] += e.bytes or 0.0
    total = sum(a[1] for a in acc.values())
    rows = []
    for t in sorted(acc, key=lambda t: TOWERS.index(t) if t in TOWERS else len(TOWERS)):
        c, us, fl, by = acc[t]
        rows.append(dict(tower=t, kernels=c / n, time_us=us / n, share=us / total if total else 0.0,
                         gflops=fl / n / 1e9, mbytes=by / n / 1e6))
    return rows


def layer_label(e: Event) -> str:
    """Display label of an event's layer: the block index, "v3/t1" for a fused kernel pairing different blocks,
    "-" outside the blocks."""
    if e.parts:
        layers = {p.get("tower"): p.get("layer") for p in e.parts}
        if len(set(layers.values())) > 1:
            return "/".join(f"{t[0]}{'-' if l is None else l}" for t, l in layers.items())
    return "-" if e.layer is None else str(e.layer)


def _layer_sort_key(row):
    t = TOWERS.index(row["tower"]) if row["tower"] in TOWERS else len(TOWERS)
    lab = row["layer"]
    first = lab.split("/")[0].lstrip("vt")
    num = int(first) if first.isdigit() else -1
    return (t, num, lab)


def by_layer(events, iters: int = 1) -> list[dict]:
    """Kernel count and time per (tower, layer) per forward; "-" is everything outside the blocks."""
    n = _per(events, iters)
    acc = defaultdict(lambda: [0, 0.0])
    for e in events:
        a = acc[(e.tower, layer_label(e))]
        a[0] += 1
        a[1] += e.dur_us
    total = sum(a[1] for a in acc.values())
    rows = [dict(tower=t, layer=l, kernels=c / n, time_us=us / n, share=us / total if total else 0.0)
            for (t, l), (c, us) in acc.items()]
    return sorted(rows, key=_layer_sort_key)


def by_op(events, iters: int = 1) -> list[dict]:
    """Time per (tower, op) per forward, summed over layers (e.g. all the vision qkv GEMMs)."""
    n = _per(events, iters)
    acc = defaultdict(lambda: [0, 0.0])
    for e in events:
        a = acc[(e.tower, e.op or "-")]
        a[0] += 1
        a[1] += e.dur_us
    total = sum(a[1] for a in acc.values())
    rows = [dict(tower=t, op=o, kernels=c / n, time_us=us / n, share=us / total if total else 0.0)
            for (t, o), (c, us) in acc.items()]
    return sorted(rows, key=lambda r: -r["time_us"])


def top_kernels(events, k: int = 10, iters: int = 1) -> list[dict]:
    """The k kernel names with the most total time per forward, with calls, mean time, towers, classes, blocks."""
    n = _per(events, iters)
    acc: dict[str, dict] = {}
    for e in events:
        a = acc.setdefault(e.name, dict(name=e.name, calls=0, time_us=0.0, towers=set(), classes=set(),
                                        blocks=set(), ops=set()))
        a["calls"] += 1
        a["time_us"] += e.dur_us
        a["towers"].add(e.tower)
        a["classes"].add(e.op_class)
        if e.blocks is not None:
            a["blocks"].add(int(e.blocks))
        if e.op:
            a["ops"].add(e.op)
    total = sum(a["time_us"] for a in acc.values())
    rows = []
    for a in sorted(acc.values(), key=lambda a: -a["time_us"])[:k]:
        rows.append(dict(name=a["name"], calls=a["calls"] / n, time_us=a["time_us"] / n,
                         mean_us=a["time_us"] / a["calls"], share=a["time_us"] / total if total else 0.0,
                         towers=sorted(a["towers"]), op_class="/".join(sorted(a["classes"])),
                         ops=sorted(a["ops"])[:6],
                         blocks_min=min(a["blocks"]) if a["blocks"] else None,
                         blocks_max=max(a["blocks"]) if a["blocks"] else None))
    return rows


# ------------------------------------------------------------------------------------------ roofline

def roofline_tag(flops: float | None, nbytes: float | None, peak_flops: float | None,
                 peak_bw: float | None) -> str:
    """'compute-bound' when the arithmetic intensity (FLOP/byte) reaches the ridge point
    (peak FLOP/s / peak bytes/s), else 'memory-bound'; 'unknown' without bytes or ceilings."""
    if not nbytes or not peak_flops or not peak_bw:
        return "unknown"
    return "compute-bound" if (flops or 0.0) / nbytes >= peak_flops / peak_bw else "memory-bound"


def op_classes(events, ceilings: dict | None = None, iters: int = 1) -> list[dict]:
    """Per op class: time, FLOPs, bytes, achieved FLOP/s and bytes/s, their fractions of the ceilings,
    intensity, the roofline tag, and the fraction of the attainable rate at that intensity. FLOP/s and
    bytes/s count only kernels whose cost is known (``cost_time_us``); ``coverage`` is that share of the time."""
    n = _per(events, iters)
    peak_f = (ceilings or {}).get("peak_flops")
    peak_b = (ceilings or {}).get("peak_bw")
    acc = defaultdict(lambda: dict(kernels=0, time_us=0.0, cost_time_us=0.0, flops=0.0, bytes=0.0))
    for e in events:
        a = acc[e.op_class]
        a["kernels"] += 1
        a["time_us"] += e.dur_us
        if e.bytes:
            a["cost_time_us"] += e.dur_us
            a["flops"] += e.flops or 0.0
            a["bytes"] += e.bytes
    total = sum(a["time_us"] for a in acc.values())
    rows = []
    for cls in sorted(acc, key=lambda c: OP_CLASSES.index(c) if c in OP_CLASSES else len(OP_CLASSES)):
        a = acc[cls]
        t = a["cost_time_us"] * 1e-6
        fps = a["flops"] / t if t > 0 else None
        bps = a["bytes"] / t if t > 0 else None
        intensity = a["flops"] / a["bytes"] if a["bytes"] else None
        frac = None
        if intensity is not None and peak_f and peak_b:
            if intensity > 0:  # achieved FLOP/s over the roof at this intensity
                frac = (fps or 0.0) / min(peak_f, intensity * peak_b)
            else:  # no FLOPs (copies): the bandwidth roof
                frac = (bps or 0.0) / peak_b
        rows.append(dict(
            op_class=cls, kernels=a["kernels"] / n, time_us=a["time_us"] / n,
            share=a["time_us"] / total if total else 0.0, gflops=a["flops"] / n / 1e9, mbytes=a["bytes"] / n / 1e6,
            coverage=a["cost_time_us"] / a["time_us"] if a["time_us"] else 0.0,
            flops_per_s=fps, bytes_per_s=bps, intensity=intensity,
            flops_frac=(fps / peak_f) if (fps is not None and peak_f) else None,
            bw_frac=(bps / peak_b) if (bps is not None and peak_b) else None,
            bound=roofline_tag(a["flops"], a["bytes"], peak_f, peak_b),
            roof_frac=frac))
    return rows


def underfilled(events, sm_count: int | None, iters: int = 1) -> list[dict]:
    """Kernels launching fewer blocks than the GPU has SMs (grouped by name and block count)."""
    if not sm_count:
        return []
    n = _per(events, iters)
    acc = defaultdict(lambda: [0, 0.0, set()])
    for e in events:
        if e.blocks is not None and e.blocks < sm_count:
            a = acc[(e.name, int(e.blocks))]
            a[0] += 1
            a[1] += e.dur_us
            a[2].add(e.tower)
    rows = [dict(name=k[0], blocks=k[1], calls=c / n, time_us=us / n, towers=sorted(ts),
                 sm_fill=k[1] / sm_count) for k, (c, us, ts) in acc.items()]
    return sorted(rows, key=lambda r: -r["time_us"])


# ------------------------------------------------------------------------------------------ verdict

def _pct(x: float) -> str:
    return f"{100 * x:.0f}%" if x is not None and not math.isnan(x) else "?%"


NO_ROOFLINE = "busy (no GPU: roofline not applicable)"


def verdict(summary: dict, classes: list[dict], *, device_type: str = "cuda", launch_bound_idle: float = 0.5) -> str:
    """One paragraph: launch-bound when the device is idle more than half the wall time, else memory- or
    compute-bound by the op class with the most time (on CPU no roofline verdict: NO_ROOFLINE); with the kernel
    count, idle % and tower overlap %."""
    gpu = device_type == "cuda"
    unit, dev = ("kernels", "GPU") if gpu else ("ops", "CPU")
    kernels = summary.get("kernels", 0)
    idle = summary.get("idle_frac", float("nan"))
    ov = summary.get("overlap_frac", float("nan"))
    dominant = max(classes, key=lambda r: r["time_us"]) if classes else None
    # Without a GPU there is no roofline verdict: CPU ops (and Triton interpreter runs) are not near any ceiling
    roofline = gpu and dominant is not None and dominant["bound"] != "unknown"
    if idle > launch_bound_idle:
        tag = "launch-bound" if gpu else "dispatch-bound"
    elif roofline:
        tag = dominant["bound"]
    else:
        tag = "busy (roofline unknown)" if gpu else NO_ROOFLINE
    busy_word = "idle" if gpu else "idle between ops (Python/dispatch)"
    text = (f"{tag}: {kernels:.0f} {unit} per forward, {dev} {busy_word} {_pct(idle)} of the wall time; "
            f"the towers overlap {_pct(ov)}.")
    if dominant is not None:
        extra = f" {dominant['op_class']} takes {_pct(dominant['share'])} of the {dev} time"
        if roofline:
            extra += f" ({dominant['bound']}"
            if dominant.get("roof_frac") is not None:
                extra += f", at {_pct(dominant['roof_frac'])} of its roofline"
            extra += ")"
        text += extra + "."
    fused = summary.get("fused_us", 0.0)
    wall = summary.get("wall_us", 0.0)
    if fused and wall:
        text += f" Kernels serving both towers at once run {_pct(fused / wall)} of the wall time."
    if idle > launch_bound_idle and gpu:
        text += (f" The largest gap is {summary.get('gap_largest_us', 0):.1f} µs over "
                 f"{summary.get('gaps', 0):.0f} gaps: fewer, larger launches (CUDA graphs, fusion) help more "
                 "than faster kernels.")
    return text


# ------------------------------------------------------------------------------------------ all of it

def analyze(events: list[Event], windows: list[tuple[float, float]], *, ceilings: dict | None = None,
            sm_count: int | None = None, device_type: str = "cuda", top: int = 10) -> dict:
    """Everything the report shows, as plain data."""
    iters = len(windows)
    per_iter = [window_stats([e for e in events if e.iteration == i], w) for i, w in enumerate(windows)]
    summary = summarize_windows(per_iter)
    classes = op_classes(events, ceilings, iters)
    return dict(
        summary=summary, per_iteration=per_iter, towers=by_tower(events, iters), layers=by_layer(events, iters),
        ops=by_op(events, iters), top_kernels=top_kernels(events, top, iters), op_classes=classes,
        underfilled=underfilled(events, sm_count, iters),
        attribution=attribution_counts(events, iters),
        verdict=verdict(summary, classes, device_type=device_type),
    )


def attribution_counts(events, iters: int = 1) -> dict:
    n = _per(events, iters)
    c = defaultdict(int)
    for e in events:
        c[e.tower] += 1
    return {k: v / n for k, v in c.items()}


# ------------------------------------------------------------------------------------------ names

_GENERATED = ("cpp_fused", "triton_poi_", "triton_per_", "triton_red_")
# checked before the keyword lists: cuBLAS's nvjet GEMMs carry "bias" in their names
_GEMM_FIRST = ("nvjet", "gemm", "cutlass", "xmma")
_GEMM = ("gemm", "matmul", "nvjet", "cublaslt", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear",
         "aten::matmul", "aten::_addmm", "cutlass", "xmma", "cublas", "grouped_linear", "triton_tem_", "mkldnn_",
         "aten::conv", "convolution", "conv2d", "implicit_gemm", "groupedlinear", "_mm_", "dot_kernel")
_ATTN = ("flash", "fmha", "attention", "sdpa", "softmax", "efficient_attention", "mha")
_NORM = ("layer_norm", "layernorm", "groupnorm", "rms_norm", "rmsnorm", "batch_norm", "_norm")
_EMBED = ("embedding", "embed", "index_select", "indexselect")
_ELEM = ("elementwise", "vectorized", "copy", "add", "mul", "gelu", "cat", "fill", "where", "pow", "tanh",
         "sigmoid", "triton_poi", "unrolled", "clone", "div", "sub", "neg", "exp", "masked", "contiguous",
         "memcpy", "memset", "aten::to", "_to_copy", "erf", "relu", "silu", "scale", "bias", "cpp_fused")


def classify(name: str) -> str:
    """Op class of a kernel/op from its name (first match wins: attention, norm, gemm, embed, elementwise)."""
    n = name.lower()
    if any(k in n for k in _GENERATED):  # Inductor's own kernels never hold the matmuls (those are extern calls)
        if any(k in n for k in _NORM):
            return "norm"
        if "softmax" in n:
            return "attention"
        return "elementwise"
    if any(k in n for k in _ATTN):
        return "attention"
    if any(k in n for k in _GEMM_FIRST):
        return "gemm"
    if any(k in n for k in _NORM):
        return "norm"
    if any(k in n for k in _GEMM):
        return "gemm"
    if any(k in n for k in _EMBED):
        return "embed"
    if any(k in n for k in _ELEM):
        return "elementwise"
    return "other"

"""Capture: run an executor under torch.profiler with per-tower/layer/op labels and turn the trace into a flat
list of :class:`~dualfuse.profile.analyze.Event` — one per GPU kernel (CUDA) or per top-level CPU op (CPU).

Labels. Every profiled forward runs inside ``record_function("df:forward:<i>")``. Inside it:

- source-model executors (eager, streams, graph): the executor's tower functions (``image_fn``/``text_fn``) are
  wrapped in ``df:vision`` / ``df:text`` ranges, and forward pre/post hooks on the executor's *private* model
  copy open ``df:<tower>:L<i>`` ranges per block and ``df:<tower>:L<i>:<op>`` per sub-op (ln1, qkv, attn, out,
  ln2, fc1, act, fc2) and ``df:<tower>:-:<op>`` outside the blocks (patch_embed, pre_ln, pool_ln, proj, ...).
  The op names are the plan's step names (dualfuse.plan), so FLOPs and bytes come from the spec.
- compile: labels cannot go inside compiled code (TorchDynamo drops ``record_function`` there, and hooks that
  open ranges break graphs and recompile once the profiler is on). So compile is profiled as its two per-tower
  compiled graphs, ``encode_image`` then ``encode_text``, each inside a tower range: exactly the kernels
  Inductor generates for each tower (``encode`` compiles both towers into one graph on one stream, i.e. the
  same kernels back to back, one graph launch instead of two). Inductor fuses across layers, so compile
  kernels are attributed to towers, not layers. The unprofiled latency is measured on ``encode``.
- fused: each plan stage's launch runs in ``df:stage:<k>`` when the ops run outside a CUDA graph (CPU, or
  ``use_graph=False``).
- ``nvtx=True`` pushes the same names as NVTX ranges (for ``nsys profile``).

Attribution. A CUDA kernel belongs to the innermost label around the host call that launched it (the
profiler's correlation id links kernel and launch). Kernels replayed from a CUDA graph have no labels around
them: they are matched, in launch order, to the kernels of one labelled run outside the graph (the graph
executor: both towers run eagerly with labels; its replay is an interleaving of the two towers' sequences,
recovered by dynamic programming over kernel names and durations; fused: the k-th kernel is plan stage k).
When the sequences do not match, the kernels that could not be matched are marked ``unattributed`` and the
report says so. On CPU the "kernels" are the top-level compute ops under the labels (an op whose compute
children cover most of its time is split into them; pure view/metadata ops are not work).

Ceilings (device-to-device copy bandwidth, large matmul FLOP/s) are measured once per card and dtype and
cached in ``~/.cache/dualfuse/ceilings-<card>.json`` (``DUALFUSE_CACHE_DIR`` overrides the folder).

``python -m dualfuse.profile.capture --model M --executor E ...`` runs warmed-up forwards with the profiled
one inside an NVTX range ``dfncu``: the target process that ``--ncu`` hands to Nsight Compute.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from bisect import bisect_right
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from .analyze import STEP_CLASS, Event, classify, length, union

PREFIX = "df"
FORWARD = "df:forward:"
DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
RUNTIME_CATS = ("cuda_runtime", "cuda_driver", "runtime", "driver")
ATTENTION_OPS = ("attn", "map_attn")
EMBED_OPS = ("patch_embed", "token_embed")
# plan step -> eager groups that may hold its kernels, most specific first (open_clip and SigLIP's MAP head use
# nn.MultiheadAttention: the packed in-projection and the out-projection run inside the "attn" range)
ALIASES = {"qkv": ("attn",), "out": ("attn",), "map_kv": ("map_attn",), "map_out": ("map_attn",),
           "final_ln": ("pool_ln",), "pool_ln": ("final_ln",)}
# ops that only change tensor metadata (no data movement): not work on CPU
META_OPS = {
    "aten::view", "aten::_unsafe_view", "aten::reshape", "aten::as_strided", "aten::as_strided_", "aten::t",
    "aten::transpose", "aten::permute", "aten::expand", "aten::expand_as", "aten::unsqueeze", "aten::squeeze",
    "aten::slice", "aten::select", "aten::narrow", "aten::split", "aten::chunk", "aten::unbind", "aten::alias",
    "aten::detach", "aten::detach_", "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::resize_",
    "aten::resolve_conj", "aten::resolve_neg", "aten::lift_fresh", "aten::unflatten", "aten::flatten",
    "aten::to", "aten::contiguous", "aten::dropout", "aten::numpy_T", "aten::split_with_sizes", "aten::view_as",
    "aten::type_as", "aten::_reshape_alias", "aten::set_", "aten::lift", "detach", "aten::result_type",
    "aten::is_nonzero", "aten::_has_compatible_shallow_copy_type", "aten::record_stream",
}
STAGE_OPS = {"linear": "GroupedLinear", "layernorm": "GroupedLayerNorm", "attention": "GroupedAttention",
             "embed": "Embeddings", "pool_index": "PoolIndices"}
OVERHEAD_OPS = ("TorchDynamo Cache Lookup", "Pregraph bytecode", "AOTDispatcher Runtime Wrapper",
                "cudagraph_mark_step_begin", "CachingAutotuner", "Lazy Compilation")


# ============================================================================================== labels

def label(tower: str, layer: int | None = None, op: str | None = None) -> str:
    if layer is None and op is None:
        return f"{PREFIX}:{tower}"
    return f"{PREFIX}:{tower}:{'-' if layer is None else f'L{layer}'}" + (f":{op}" if op else "")


def parse_label(name: str) -> dict | None:
    """'df:vision:L3:qkv' -> {kind: 'op', tower, layer, op}; None for other names."""
    if not name.startswith(PREFIX + ":"):
        return None
    parts = name.split(":")[1:]
    if not parts:
        return None
    if parts[0] == "forward":
        it = parts[1] if len(parts) > 1 else "0"
        return dict(kind="forward", iteration=int(it) if it.lstrip("-").isdigit() else -1)
    if parts[0] == "stage":
        return dict(kind="stage", stage=int(parts[1]))
    if parts[0] not in ("vision", "text"):
        return None
    d = dict(kind="tower", tower=parts[0], layer=None, op=None)
    if len(parts) > 1:
        d["kind"] = "layer"
        d["layer"] = int(parts[1][1:]) if parts[1].startswith("L") and parts[1][1:].isdigit() else None
    if len(parts) > 2:
        d["kind"] = "op"
        d["op"] = parts[2]
    return d


class _Range:
    """record_function (+ NVTX when asked) as a context manager usable from hooks."""

    __slots__ = ("name", "nvtx", "_rf")

    def __init__(self, name: str, nvtx: bool = False):
        self.name, self.nvtx, self._rf = name, nvtx, None

    def __enter__(self):
        self._rf = torch.profiler.record_function(self.name)
        self._rf.__enter__()
        if self.nvtx:
            torch.cuda.nvtx.range_push(self.name)
        return self

    def __exit__(self, *exc):
        if self.nvtx:
            torch.cuda.nvtx.range_pop()
        self._rf.__exit__(*exc)
        return False


def module_labels(model, family: str, pooling_vision: str | None = None) -> tuple[list, list]:
    """(tower roots, detailed) lists of (module, tower, layer, op) for a source model.

    Tower roots are the modules that make up each tower (used alone for compile); the detailed list has the
    per-block and per-op modules. Works from parameter-free module names, so it covers HF CLIP/SigLIP and
    open_clip without depending on module classes."""
    roots, detail = [], []
    named = dict(model.named_modules())

    def tower_of(name: str) -> str | None:
        if family in ("hf_clip", "hf_siglip"):
            if name.startswith("vision_model") or name.startswith("visual_projection"):
                return "vision"
            if name.startswith("text_model") or name.startswith("text_projection"):
                return "text"
            return None
        if name.startswith("visual"):
            return "vision"
        return "text" if name else None

    if family in ("hf_clip", "hf_siglip"):
        root_names = ["vision_model", "visual_projection", "text_model", "text_projection"]
    else:
        root_names = ["visual", "token_embedding", "transformer", "ln_final"]
    for n in root_names:
        if n in named:
            roots.append((named[n], tower_of(n), None, None))

    layer_re = re.compile(r"^(.*\.)?(layers|resblocks)\.(\d+)$")
    in_layer = {"layer_norm1": "ln1", "ln_1": "ln1", "self_attn": "attn", "attn": "attn",
                "self_attn.q_proj": "qkv", "self_attn.k_proj": "qkv", "self_attn.v_proj": "qkv",
                "self_attn.out_proj": "out", "layer_norm2": "ln2", "ln_2": "ln2", "mlp": "mlp",
                "mlp.fc1": "fc1", "mlp.c_fc": "fc1", "mlp.activation_fn": "act", "mlp.gelu": "act",
                "mlp.fc2": "fc2", "mlp.c_proj": "fc2"}
    outside = {"embeddings": None, "conv1": "patch_embed", "token_embedding": "token_embed",
               "pre_layrnorm": "pre_ln", "ln_pre": "pre_ln", "post_layernorm": "post_ln", "ln_post": "pool_ln",
               "final_layer_norm": "pool_ln", "ln_final": "pool_ln", "visual_projection": "proj",
               "text_projection": "proj", "head": None, "head.attention": "map_attn", "head.layernorm": "map_ln",
               "head.mlp.fc1": "map_fc1", "head.mlp.fc2": "map_fc2", "head.mlp.activation_fn": "act",
               "head.mlp": "map_mlp"}
    layers: dict[str, tuple[str, int]] = {}
    for name, mod in named.items():
        m = layer_re.match(name)
        if m and tower_of(name):
            layers[name] = (tower_of(name), int(m.group(3)))
            detail.append((mod, tower_of(name), int(m.group(3)), None))
    for name, mod in named.items():
        tower = tower_of(name)
        if tower is None or name in layers:
            continue
        parent = next((p for p in layers if name.startswith(p + ".")), None)
        if parent is not None:
            rel = name[len(parent) + 1:]
            if rel in in_layer:
                detail.append((mod, tower, layers[parent][1], in_layer[rel]))
            continue
        # strip the tower prefix: vision_model.X / text_model.X / visual.X / X
        rel = name
        for pre in ("vision_model.", "text_model.", "visual."):
            if rel.startswith(pre):
                rel = rel[len(pre):]
                break
        if rel not in outside:
            continue
        op = outside[rel]
        if rel == "embeddings":
            op = "patch_embed" if tower == "vision" else "token_embed"
        elif rel == "post_layernorm":
            op = "final_ln" if pooling_vision == "map" else "pool_ln"
        elif rel == "head":
            op = "map_head" if tower == "vision" else "proj"
        detail.append((mod, tower, None, op))
    return roots, detail


class Labeller:
    """Installs the labels on an executor for the duration of a ``with`` block and removes them after.

    ``mode``: "full" (tower wrappers + per-layer/op hooks), "split" (compile: no hooks, the towers are called
    one by one inside tower ranges by :func:`capture`), "fused" (per-stage wrappers of a fused Runner's ops),
    "none" (an executor we do not know: no labels)."""

    def __init__(self, ex, mode: str, *, nvtx: bool = False, runner=None):
        self.ex, self.mode, self.nvtx, self.runner = ex, mode, nvtx, runner
        self._handles, self._stack, self._restore = [], [], []

    def _rng(self, name):
        return _Range(name, self.nvtx)

    def _hook(self, module, name: str):
        def pre(mod, args):
            r = self._rng(name)
            r.__enter__()
            self._stack.append(r)

        def post(mod, args, out):
            if self._stack:
                self._stack.pop().__exit__(None, None, None)

        self._handles.append(module.register_forward_pre_hook(pre))
        self._handles.append(module.register_forward_hook(post, always_call=True))

    def __enter__(self):
        ex = self.ex
        if self.mode == "full":
            pooling = getattr(getattr(ex.spec, "vision", None), "pooling", None)
            _, detail = module_labels(ex.model, ex.family, pooling)
            for attr, tower in (("image_fn", "vision"), ("text_fn", "text")):
                orig = getattr(ex, attr)
                self._restore.append((ex, attr, orig))
                setattr(ex, attr, self._wrap(orig, label(tower)))
            for mod, tower, layer, op in detail:
                self._hook(mod, label(tower, layer, op))
        elif self.mode == "fused" and self.runner is not None:
            ops = self.runner.ops
            self._restore.append((self.runner, "ops", ops))
            self.runner.ops = [self._wrap(op, f"{PREFIX}:stage:{k}") for k, op in enumerate(ops)]
        return self

    def _wrap(self, fn, name):
        rng = self._rng

        def wrapped(*args, **kwargs):
            with rng(name):
                return fn(*args, **kwargs)

        wrapped.__wrapped__ = fn
        return wrapped

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for obj, attr, orig in reversed(self._restore):
            setattr(obj, attr, orig)
        self._restore.clear()
        while self._stack:
            self._stack.pop().__exit__(None, None, None)
        return False


# ============================================================================================== trace

@dataclass
class _Node:
    name: str
    cat: str
    ts: float
    dur: float
    args: dict
    tid: tuple
    parent: "_Node | None" = None
    children: list = field(default_factory=list)
    label: dict | None = None
    has_df: bool = False

    @property
    def end(self) -> float:
        return self.ts + self.dur


def load_trace(path_or_dict) -> dict:
    if isinstance(path_or_dict, dict):
        return path_or_dict
    with open(path_or_dict) as f:
        return json.load(f)


class TraceIndex:
    """The host side of a trace as per-thread trees (annotations, ops, runtime calls), plus device events."""

    def __init__(self, trace: dict):
        self.nodes: list[_Node] = []
        self.device: list[dict] = []
        self.runtime_by_corr: dict[int, _Node] = {}
        threads = defaultdict(list)
        for e in trace.get("traceEvents", []):
            if e.get("ph") != "X":
                continue
            cat = e.get("cat") or ""
            if cat in DEVICE_CATS:
                self.device.append(e)
                continue
            if cat not in ("cpu_op", "user_annotation") and cat not in RUNTIME_CATS:
                continue
            n = _Node(e.get("name", ""), cat, float(e.get("ts", 0.0)), float(e.get("dur", 0.0)),
                      e.get("args") or {}, (e.get("pid"), e.get("tid")))
            if cat == "user_annotation":
                n.label = parse_label(n.name)
            threads[n.tid].append(n)
            self.nodes.append(n)
            if cat in RUNTIME_CATS:
                corr = n.args.get("correlation")
                if corr is not None:
                    self.runtime_by_corr[int(corr)] = n
        self.roots: list[_Node] = []
        for nodes in threads.values():
            nodes.sort(key=lambda n: (n.ts, -n.dur))
            stack: list[_Node] = []
            for n in nodes:
                while stack and stack[-1].end <= n.ts:
                    stack.pop()
                if stack:
                    n.parent = stack[-1]
                    stack[-1].children.append(n)
                else:
                    self.roots.append(n)
                stack.append(n)
        # has_df: the subtree holds a dualfuse label (such an op is a wrapper, not a kernel)
        for n in sorted(self.nodes, key=lambda n: -self._depth(n)):
            if n.label is not None or any(c.has_df for c in n.children):
                n.has_df = True

    @staticmethod
    def _depth(n: _Node) -> int:
        d = 0
        while n.parent is not None:
            n, d = n.parent, d + 1
        return d

    def forwards(self) -> list[_Node]:
        return sorted((n for n in self.nodes if n.label and n.label["kind"] == "forward"), key=lambda n: n.ts)


def context(node: _Node) -> tuple[dict | None, dict | None, _Node | None]:
    """(innermost non-forward dualfuse label, forward label, innermost enclosing cpu_op) of a node."""
    inner = fwd = op = None
    n = node.parent if node.cat in RUNTIME_CATS else node
    while n is not None:
        if n.label is not None:
            if n.label["kind"] == "forward":
                fwd = n.label
                break
            if inner is None:
                inner = n.label
        elif op is None and n.cat == "cpu_op" and n is not node:
            op = n
        n = n.parent
    return inner, fwd, op


def _is_meta(n: _Node) -> bool:
    return (n.name in META_OPS or n.name.startswith(OVERHEAD_OPS)) and all(_is_meta(c) for c in n.children
                                                                          if c.cat == "cpu_op")


def _work_children(n: _Node) -> list[_Node]:
    """Compute ops directly under n, looking through annotations that are not ours (e.g. Inductor's
    '## Call CompiledFxGraph ##')."""
    out = []
    for c in n.children:
        if c.cat == "cpu_op":
            if not _is_meta(c):
                out.append(c)
        elif c.cat == "user_annotation" and c.label is None:
            out += _work_children(c)
    return out


def cpu_kernels(index: TraceIndex) -> list[_Node]:
    """CPU mode: the top-level compute ops (and fused stage ranges) inside the profiled forwards."""
    out: list[_Node] = []

    def visit(n: _Node):
        if n.label is not None:
            if n.label["kind"] == "stage":
                out.append(n)
                return
            for c in n.children:
                visit(c)
            return
        if n.cat != "cpu_op":
            for c in n.children:
                visit(c)
            return
        if n.has_df:
            for c in n.children:
                visit(c)
            return
        if _is_meta(n) or n.name.startswith(OVERHEAD_OPS):
            return
        work = _work_children(n)
        if work and length(union((c.ts, c.end) for c in work)) >= 0.5 * n.dur:
            for c in work:
                visit(c)
        else:
            out.append(n)

    for r in index.roots:
        if r.has_df:
            visit(r)
    return out


# ============================================================================================== attribution

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


def _event_from(kernel_name, ts, dur, lab, fwd_it, info: AttributionInfo, launch_op: _Node | None,
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


# ---------------------------------------------------------------------------------------------- order matching

def match_order(replay: list[Event], refs: list[list[Event]]) -> tuple[int, str | None]:
    """Label replayed kernels from labelled reference sequences (one run outside the graph), in launch order.

    1. Exact: with one reference sequence the k-th replayed kernel is the k-th reference kernel; with two (the
       towers of a two-branch graph) the replay, sorted by start, is an interleaving of both, recovered by dynamic
       programming over names (durations break ties between same-named kernels).
    2. When names or counts differ (inside a graph cuBLAS/cuDNN may pick other kernels), each stream of the
       replay is aligned to the reference sequence it resembles most by edit distance over names: kernels
       matched by name or standing in the place of a differently named one take its labels; extra kernels take
       the labels of the kernel before them on their stream. The note says how many of each.
    3. Otherwise the kernels past the longest exact match stay 'unattributed'.
    Returns (kernels labelled, note or None)."""
    replay.sort(key=lambda e: e.start_us)
    refs = [r for r in refs if r]
    total_ref = sum(len(r) for r in refs)
    if not refs:
        return 0, "no labelled reference kernels to match the CUDA graph replay against"
    if len(refs) == 1:
        ref = refs[0]
        k = 0
        while k < min(len(ref), len(replay)) and replay[k].name == ref[k].name:
            _copy_labels(replay[k], ref[k])
            k += 1
    else:
        k = _interleave(replay, refs[0], refs[1])
    if k == len(replay) == total_ref:
        return k, None
    streams: dict = defaultdict(list)
    for e in replay:
        streams[e.stream].append(e)
    if len(streams) == len(refs):
        for e in replay:
            _clear_labels(e)
        groups = list(streams.values())
        if len(refs) == 2 and _similarity(groups[0], refs[1]) + _similarity(groups[1], refs[0]) > \
                _similarity(groups[0], refs[0]) + _similarity(groups[1], refs[1]):
            groups.reverse()
        same = subst = extra = 0
        for group, ref in zip(groups, refs):
            a, b, c = _align_stream(group, ref)
            same, subst, extra = same + a, subst + b, extra + c
        note = (f"CUDA graph replay has {len(replay)} kernels, the labelled run outside the graph {total_ref} "
                "(code can take other paths while a graph is captured: transformers builds an explicit causal mask, "
                f"attention may pick another backend): aligned per stream by name — {same} matched, {subst} in the "
                f"place of a differently named kernel, {extra} extra kernel(s) given the labels of the kernel "
                "before them on their stream")
        return len(replay), note
    return k, (f"CUDA graph replay has {len(replay)} kernels, the labelled run {total_ref}; {k} matched in order, "
               f"{len(replay) - k} left unattributed")


def _clear_labels(e: Event):
    e.tower, e.layer, e.op, e.parts, e.flops, e.bytes, e.cost_source = "unattributed", None, None, None, None, None, None


def _similarity(group: list[Event], ref: list[Event]) -> float:
    from collections import Counter

    a, b = Counter(e.name for e in group), Counter(e.name for e in ref)
    return sum((a & b).values()) - 0.5 * abs(len(group) - len(ref))


def _align_stream(group: list[Event], ref: list[Event]) -> tuple[int, int, int]:
    """Edit-distance alignment of one stream's replayed kernels with a reference sequence; labels copied."""
    n, m = len(group), len(ref)
    gcls, rcls = [classify(e.name) for e in group], [classify(e.name) for e in ref]
    INF = float("inf")
    cost = [[INF] * (m + 1) for _ in range(n + 1)]
    move = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n + 1):
        cost[i][0], move[i][0] = float(i), 1
    for j in range(m + 1):
        cost[0][j], move[0][j] = float(j), 2
    cost[0][0] = 0.0
    for i in range(1, n + 1):
        gi = group[i - 1]
        ci, cprev = cost[i], cost[i - 1]
        for j in range(1, m + 1):
            rj = ref[j - 1]
            if gi.name == rj.name:
                d = cprev[j - 1] + 0.01 * min(abs(math.log((gi.dur_us + 0.05) / (rj.dur_us + 0.05))), 1.0)
            else:  # a differently named kernel in its place: cheaper when it does the same kind of work
                d = cprev[j - 1] + (0.5 if gcls[i - 1] == rcls[j - 1] else 1.0)
            best, mv = d, 0
            if cprev[j] + 1.0 < best:  # extra replay kernel
                best, mv = cprev[j] + 1.0, 1
            if ci[j - 1] + 1.0 < best:  # reference kernel missing from the replay
                best, mv = ci[j - 1] + 1.0, 2
            ci[j], move[i][j] = best, mv
    pairs: list = [None] * n
    i, j = n, m
    while i > 0 or j > 0:
        mv = move[i][j]
        if i > 0 and j > 0 and mv == 0:
            pairs[i - 1] = j - 1
            i, j = i - 1, j - 1
        elif i > 0 and (mv == 1 or j == 0):
            i -= 1
        else:
            j -= 1
    same = subst = extra = 0
    for k, e in enumerate(group):
        r = pairs[k]
        if r is not None:
            src = ref[r]
            if src.name == e.name:
                _copy_labels(e, src)
                same += 1
            else:
                e.tower, e.layer, e.op, e.parts = src.tower, src.layer, src.op, src.parts
                subst += 1
    for k, e in enumerate(group):
        if pairs[k] is None:
            nb = next((group[x] for x in range(k - 1, -1, -1) if pairs[x] is not None), None) or \
                next((group[x] for x in range(k + 1, n) if pairs[x] is not None), None)
            if nb is not None:
                e.tower, e.layer, e.op = nb.tower, nb.layer, nb.op
                extra += 1
    return same, subst, extra


def _copy_labels(dst: Event, src: Event):
    for f in ("tower", "layer", "op", "op_class", "flops", "bytes", "parts", "cost_source", "cpu_op", "shapes",
              "dtypes"):
        setattr(dst, f, getattr(src, f))
    if dst.blocks is None:
        dst.blocks = src.blocks


def _interleave(replay: list[Event], a: list[Event], b: list[Event]) -> int:
    n, m = len(a), len(b)
    R = len(replay)
    INF = float("inf")

    def c(x: Event, y: Event) -> float:
        if x.name != y.name:
            return INF
        return abs(math.log((x.dur_us + 0.05) / (y.dur_us + 0.05)))

    # cost[i][j]: best cost of explaining replay[:i+j] with a[:i] and b[:j]
    cost = [[INF] * (m + 1) for _ in range(n + 1)]
    cost[0][0] = 0.0
    best = (0, 0, 0)  # (matched, i, j)
    for s in range(0, min(R, n + m) + 1):
        lo, hi = max(0, s - m), min(n, s)
        any_ok = False
        for i in range(lo, hi + 1):
            j = s - i
            cur = cost[i][j]
            if cur == INF:
                continue
            any_ok = True
            if s > best[0] or (s == best[0] and cur < cost[best[1]][best[2]]):
                best = (s, i, j)
            if s == R:
                continue
            r = replay[s]
            if i < n:
                v = cur + c(r, a[i])
                if v < cost[i + 1][j]:
                    cost[i + 1][j] = v
            if j < m:
                v = cur + c(r, b[j])
                if v < cost[i][j + 1]:
                    cost[i][j + 1] = v
        if not any_ok:
            break
    s, i, j = best
    # backtrack
    while s > 0:
        r = replay[s - 1]
        ca = cost[i - 1][j] + c(r, a[i - 1]) if i > 0 else INF
        cb = cost[i][j - 1] + c(r, b[j - 1]) if j > 0 else INF
        if ca <= cb and ca < INF:
            _copy_labels(r, a[i - 1])
            i -= 1
        elif cb < INF:
            _copy_labels(r, b[j - 1])
            j -= 1
        else:  # pragma: no cover - cost table is consistent
            break
        s -= 1
    return best[0]


# ============================================================================================== running

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


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _call(ex, px, ids, split: bool = False, nvtx: bool = False):
    if split:  # one tower after the other, each in its tower range (compile: see the module docstring)
        img = txt = None
        if px is not None:
            with _Range(label("vision"), nvtx):
                img = ex.encode_image(px)
        if ids is not None:
            with _Range(label("text"), nvtx):
                txt = ex.encode_text(ids)
        return img, txt
    if px is not None and ids is not None:
        return ex.encode(px, ids)
    if px is not None:
        return ex.encode_image(px), None
    return None, ex.encode_text(ids)


def _runner_key(ex, px, ids):
    bi = px.shape[0] if px is not None else 0
    bt = ids.shape[0] if ids is not None else 0
    L = ids.shape[1] if ids is not None else ex.spec.text.context_length
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
        if mode == "split" and not split:  # one tower of compile: label it
            with _Range(label("vision" if px is not None else "text"), nvtx):
                return _call(ex, px, ids)
        return _call(ex, px, ids, split=split, nvtx=nvtx)

    try:
        with Labeller(target, mode, nvtx=nvtx, runner=runner), torch.no_grad():
            for _ in range(warm):
                call()
            _sync(device)
            if graph_replay:
                refs = _reference(target, mode, runner, px, ids, info, acts, tmpdir, notes)
            with profile(activities=acts, record_shapes=True) as prof:
                for i in range(iters):
                    with _Range(f"{FORWARD}{i}", nvtx):
                        call()
                    _sync(device)
            prof.export_chrome_trace(path)
        runs = latency_runs if latency_runs is not None else (max(iters, 20) if cuda else max(iters, 2))
        if runs > 0:
            with torch.no_grad():
                _call(ex, px, ids)  # compile: encode's own graph compiles here, outside the timing
                _sync(device)
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
            _sync(target.device)
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
    from ..bench import stats, time_calls

    if runs <= 0:
        return {}
    samples = time_calls(lambda i: _call(ex, px, ids), runs, ex.device)
    s = stats(samples)
    return dict(median_ms=s["median_ms"], p90_ms=s["p90_ms"], runs=s["runs"],
                timer="cuda events" if ex.device.type == "cuda" else "perf_counter")


# ============================================================================================== ceilings

def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", s).strip("-").lower() or "unknown"


def cache_dir() -> str:
    return os.environ.get("DUALFUSE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dualfuse")


def card_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return "CPU " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return "CPU " + (platform.processor() or platform.machine())


def ceilings(device, dtype, *, measure: bool = True, refresh: bool = False, directory: str | None = None) -> dict:
    """Peak bandwidth (bytes/s, device-to-device copy counting read + write) and matmul FLOP/s of ``dtype``
    on this card: from the cache, else measured (a second or two on a GPU, well under one on a CPU) and cached.
    ``measure=False`` and nothing cached: the values are None ('unknown')."""
    device = torch.device(device)
    card = card_name(device)
    dname = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype, str(dtype))
    folder = directory or cache_dir()
    path = os.path.join(folder, f"ceilings-{_slug(card)}.json")
    data = {}
    if os.path.exists(path) and not refresh:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            data = {}
    out = dict(card=card, dtype=dname, peak_bw=data.get("peak_bw"), peak_flops=(data.get("matmul") or {}).get(dname),
               source="cache", path=path)
    if out["peak_bw"] is not None and out["peak_flops"] is not None:
        return out
    if not measure:
        out.update(source="unknown")
        return out
    try:
        if out["peak_bw"] is None:
            data["peak_bw"] = out["peak_bw"] = _measure_bw(device)
        data.setdefault("matmul", {})[dname] = out["peak_flops"] = _measure_matmul(device, dtype)
        data.update(card=card, measured=time.strftime("%Y-%m-%dT%H:%M:%S"), torch=torch.__version__,
                    method="bandwidth: copy_ of a large buffer, bytes read + written / time; matmul: square "
                           "torch.mm, 2n^3 / time; best of several runs")
        out["source"] = "measured"
        try:
            os.makedirs(folder, exist_ok=True)
            tmp = path + f".{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(data, f, indent=1)
            os.replace(tmp, path)
        except OSError as e:
            out["cache_error"] = str(e)
    except Exception as e:  # noqa: BLE001 - ceilings are optional
        out.update(source=f"unknown (measurement failed: {type(e).__name__}: {e})")
    return out


def _time_best(fn, device, reps: int) -> float:
    best = float("inf")
    if device.type == "cuda":
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            best = min(best, a.elapsed_time(b) / 1e3)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
    return best


def _measure_bw(device) -> float:
    nbytes = (1 << 30) if device.type == "cuda" else (32 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    t = _time_best(lambda: dst.copy_(src), device, 10 if device.type == "cuda" else 5)
    return 2.0 * nbytes / t


def _measure_matmul(device, dtype) -> float:
    if device.type == "cuda":
        n = 8192 if dtype in (torch.float16, torch.bfloat16) else 4096
        reps = 10
    else:
        n, reps = 512, 5
        if dtype != torch.float32:
            n = 256
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.mm(a, b)
    _sync(device)
    t = _time_best(lambda: torch.mm(a, b, out=c), device, reps)
    return 2.0 * n ** 3 / t


# ============================================================================================== ncu

NCU_METRICS = {
    "sm__warps_active.avg.pct_of_peak_sustained_active": "achieved_occupancy_pct",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed": "sm_throughput_pct",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": "dram_throughput_pct",
}


def run_ncu(target_argv: list[str], kernel_names: list[str], *, timeout: int = 900) -> dict:
    """Nsight Compute on the named kernels of one forward of ``python -m dualfuse.profile.capture <argv>``.
    Returns {status: ok|missing|denied|failed, message, kernels: [{name, metrics...}]}."""
    exe = shutil.which("ncu")
    if exe is None:
        return dict(status="missing", kernels=[],
                    message="Nsight Compute (ncu) is not installed or not on PATH: occupancy and SM/DRAM "
                            "throughput were not measured (install Nsight Compute, or add it to PATH)")
    if not kernel_names:
        return dict(status="failed", kernels=[], message="no kernels to hand to ncu")
    regex = "|".join(re.escape(_ncu_base(n))[:200] for n in kernel_names)
    cmd = [exe, "--clock-control", "none", "--metrics", ",".join(NCU_METRICS), "--nvtx", "--nvtx-include",
           "dfncu/", "--kernel-name", f"regex:{regex}", "--csv", "--page", "raw",
           sys.executable, "-m", "dualfuse.profile.capture", *target_argv]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(status="failed", kernels=[], message=f"ncu timed out after {timeout} s", command=cmd)
    text = proc.stdout + "\n" + proc.stderr
    if "ERR_NVGPUCTRPERM" in text or "permission" in text.lower() and "counters" in text.lower():
        return dict(status="denied", kernels=[], command=cmd,
                    message="ncu is installed but may not read the GPU performance counters here "
                            "(ERR_NVGPUCTRPERM): run as root or enable non-admin profiling "
                            "(NVreg_RestrictProfilingToAdminUsers=0)")
    rows = parse_ncu_csv(proc.stdout)
    if proc.returncode != 0 and not rows:
        tail = "\n".join(text.strip().splitlines()[-6:])
        return dict(status="failed", kernels=[], command=cmd, message=f"ncu exited with {proc.returncode}: {tail}")
    if not rows:
        return dict(status="failed", kernels=[], command=cmd,
                    message="ncu ran but profiled no matching kernel (names differ between ncu and the profiler?)")
    return dict(status="ok", kernels=rows, command=cmd, message=f"ncu profiled {len(rows)} kernel launches")


def _ncu_base(name: str) -> str:
    """The function name ncu matches by default: no return type, namespaces kept, no template/arguments."""
    s = name.replace("(anonymous namespace)::", "")
    if s.startswith("void "):
        s = s[5:]
    depth, out = 0, []
    for ch in s:
        if ch in "<(":
            if depth == 0 and ch == "(":
                break
            depth += 1
            continue
        if ch in ">)":
            depth -= 1
            continue
        if depth == 0:
            out.append(ch)
    base = "".join(out).strip()
    return base.split("::")[-1] or name


def parse_ncu_csv(text: str) -> list[dict]:
    """Rows of ``ncu --csv --page raw``: kernel name + the NCU_METRICS columns (unit row skipped)."""
    lines = [ln for ln in text.splitlines() if ln.startswith('"')]
    if not lines:
        return []
    reader = csv.reader(io.StringIO("\n".join(lines)))
    rows = list(reader)
    header = rows[0]
    try:
        name_col = header.index("Kernel Name")
    except ValueError:
        return []
    cols = {m: header.index(m) for m in NCU_METRICS if m in header}
    out = []
    for r in rows[1:]:
        if len(r) != len(header) or r[name_col] in ("", "Kernel Name"):
            continue
        d = dict(name=r[name_col])
        ok = False
        for m, c in cols.items():
            try:
                d[NCU_METRICS[m]] = float(r[c].replace(",", ""))
                ok = True
            except ValueError:
                d[NCU_METRICS[m]] = None
        if ok:
            out.append(d)
    return out


def _ncu_main(argv=None) -> int:
    """Target process for ncu: warm up, then one forward inside the NVTX range 'dfncu'."""
    import argparse

    from .. import executors, presets
    from ..bench import random_inputs

    p = argparse.ArgumentParser(prog="python -m dualfuse.profile.capture")
    p.add_argument("--model", required=True)
    p.add_argument("--arch")
    p.add_argument("--executor", required=True)
    p.add_argument("--dtype")
    p.add_argument("--device")
    p.add_argument("--image-batch", type=int, default=1)
    p.add_argument("--text-batch", type=int, default=1)
    p.add_argument("--text-length", type=int)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    model = presets.load(a.model, seed=a.seed, arch=a.arch)
    ex = executors.get(a.executor, model, dtype=a.dtype, device=a.device)
    (px, ids), = random_inputs(ex.spec, a.image_batch, a.text_batch, a.text_length, sets=1, seed=a.seed,
                               device=ex.device, dtype=ex.dtype)
    with torch.no_grad():
        for _ in range(max(a.warmup, 1)):
            _call(ex, px, ids)
        _sync(ex.device)
        torch.cuda.nvtx.range_push("dfncu")
        _call(ex, px, ids)
        _sync(ex.device)
        torch.cuda.nvtx.range_pop()
    return 0


if __name__ == "__main__":  # pragma: no cover - the ncu target process
    sys.exit(_ncu_main())

"""The profiler's Chrome trace as trees: host events (annotations, ops, runtime calls) per thread, parents by
time containment, and the device events beside them. On CPU the "kernels" are the top-level compute ops under the
labels (:func:`cpu_kernels`: an op whose compute children cover most of its time, over all its calls, is split into them; pure
view/metadata ops are not work)."""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field

from .analyze import length, union
from .labels import parse_label

DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
RUNTIME_CATS = ("cuda_runtime", "cuda_driver", "runtime", "driver")
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
OVERHEAD_OPS = ("TorchDynamo Cache Lookup", "Pregraph bytecode", "AOTDispatcher Runtime Wrapper",
                "cudagraph_mark_step_begin", "CachingAutotuner", "Lazy Compilation")


@dataclass
class Node:
    name: str
    cat: str
    ts: float
    dur: float
    args: dict
    tid: tuple
    parent: "Node | None" = None
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
        self.nodes: list[Node] = []
        self.device: list[dict] = []
        self.runtime_by_corr: dict[int, Node] = {}
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
            n = Node(e.get("name", ""), cat, float(e.get("ts", 0.0)), float(e.get("dur", 0.0)),
                      e.get("args") or {}, (e.get("pid"), e.get("tid")))
            if cat == "user_annotation":
                n.label = parse_label(n.name)
            threads[n.tid].append(n)
            self.nodes.append(n)
            if cat in RUNTIME_CATS:
                corr = n.args.get("correlation")
                if corr is not None:
                    self.runtime_by_corr[int(corr)] = n
        self.roots: list[Node] = []
        for nodes in threads.values():
            nodes.sort(key=lambda n: (n.ts, -n.dur))
            stack: list[Node] = []
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
    def _depth(n: Node) -> int:
        d = 0
        while n.parent is not None:
            n, d = n.parent, d + 1
        return d

    def forwards(self) -> list[Node]:
        return sorted((n for n in self.nodes if n.label and n.label["kind"] == "forward"), key=lambda n: n.ts)


def context(node: Node) -> tuple[dict | None, dict | None, Node | None]:
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


def _is_meta(n: Node) -> bool:
    return (n.name in META_OPS or n.name.startswith(OVERHEAD_OPS)) and all(_is_meta(c) for c in n.children
                                                                          if c.cat == "cpu_op")


def _work_children(n: Node) -> list[Node]:
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


def _split_by_name(index: TraceIndex) -> dict[str, bool]:
    """Per op name: do its compute children cover at least half its time, summed over every call in the trace?
    Decided per name, not per call, so that every forward counts the same ops (a per-call decision flips with
    timing noise, e.g. aten::linear counted once and aten::addmm the next time)."""
    total: dict[str, list[float]] = {}

    def walk(n: Node):
        if n.cat == "cpu_op" and not n.has_df:
            work = _work_children(n)
            t = total.setdefault(n.name, [0.0, 0.0])
            t[0] += n.dur
            t[1] += length(union((c.ts, c.end) for c in work)) if work else 0.0
        for c in n.children:
            walk(c)

    for r in index.roots:
        if r.has_df:
            walk(r)
    return {name: covered >= 0.5 * dur for name, (dur, covered) in total.items()}


def cpu_kernels(index: TraceIndex) -> list[Node]:
    """CPU mode: the top-level compute ops (and fused stage ranges) inside the profiled forwards."""
    out: list[Node] = []
    split = _split_by_name(index)

    def visit(n: Node):
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
        if work and split.get(n.name, False):
            for c in work:
                visit(c)
        else:
            out.append(n)

    for r in index.roots:
        if r.has_df:
            visit(r)
    return out

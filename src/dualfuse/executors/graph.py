"""graph: both towers captured in ONE CUDA graph with two branches.

Inside the capture the text tower is forked onto a side stream (which first waits on the capture stream) while
the image tower runs on the capture stream; the capture stream then waits on the side stream, so the graph has
two independent branches that the GPU can run concurrently, joined at the end.

Inputs are copied into static buffers; one graph per input shape — key ``(image batch, text batch, text length)``
for ``encode`` and per-tower keys for ``encode_image``/``encode_text`` — kept in a bounded LRU cache
(``max_graphs``, default 8; the least recently used graph and its memory pool are released). Before capture the
forward runs ``warmup`` times on a side stream (as torch.cuda.graphs recommends: lazy inits, cuBLAS workspaces).
Outputs are cloned out of the graph's static buffers, so results stay valid after the next replay.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from . import register
from .base import SourceExecutor


class _Captured:
    __slots__ = ("graph", "inputs", "outputs")

    def __init__(self, graph, inputs, outputs):
        self.graph, self.inputs, self.outputs = graph, inputs, outputs


@register("graph")
class GraphExecutor(SourceExecutor):
    needs_cuda = True

    def __init__(self, model, dtype=None, device=None, *, max_graphs: int = 8, warmup: int = 2, **kwargs):
        super().__init__(model, dtype, device, **kwargs)
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.max_graphs = max_graphs
        self.warmup = warmup
        self.graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self.captures = 0  # how many graphs were captured (re-captures after eviction count again)
        self.side_stream = torch.cuda.Stream(self.device)
        self.notes = "one CUDA graph, two branches"

    # -- capture -------------------------------------------------------------------------------------
    def _forward(self, px, ids):
        """The captured work: image on the current stream, text forked onto the side stream, then joined."""
        cur = torch.cuda.current_stream(self.device)
        if px is None:
            return (None, self.text_fn(ids))
        if ids is None:
            return (self.image_fn(px), None)
        self.side_stream.wait_stream(cur)
        with torch.cuda.stream(self.side_stream):
            txt = self.text_fn(ids)
        img = self.image_fn(px)
        cur.wait_stream(self.side_stream)
        return img, txt

    def _capture(self, px, ids) -> _Captured:
        static_px = torch.empty_like(px) if px is not None else None
        static_ids = torch.empty_like(ids) if ids is not None else None
        if static_px is not None:
            static_px.copy_(px)
        if static_ids is not None:
            static_ids.copy_(ids)
        cur = torch.cuda.current_stream(self.device)
        warm = torch.cuda.Stream(self.device)
        warm.wait_stream(cur)
        with torch.cuda.stream(warm):
            for _ in range(max(self.warmup, 1)):
                self._forward(static_px, static_ids)
        cur.wait_stream(warm)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self._forward(static_px, static_ids)
        self.captures += 1
        return _Captured(graph, (static_px, static_ids), outputs)

    def _run(self, key, px, ids):
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(px, ids)
            self.graphs[key] = entry
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)  # the graph and its private memory pool go with it
        else:
            self.graphs.move_to_end(key)
            static_px, static_ids = entry.inputs
            if static_px is not None:
                static_px.copy_(px)
            if static_ids is not None:
                static_ids.copy_(ids)
        entry.graph.replay()
        return tuple(o.clone() if o is not None else None for o in entry.outputs)

    # -- interface -----------------------------------------------------------------------------------
    def _encode(self, px, ids):
        return self._run((px.shape[0], ids.shape[0], ids.shape[1]), px, ids)

    def _encode_image(self, px):
        return self._run((px.shape[0], None, None), px, None)[0]

    def _encode_text(self, ids):
        return self._run((None, ids.shape[0], ids.shape[1]), None, ids)[1]

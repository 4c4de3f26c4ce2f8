"""graph: both towers captured in ONE CUDA graph with two branches.

Inside the capture the text tower is forked onto a side stream (which first waits on the capture stream) while
the image tower runs on the capture stream; the capture stream then waits on the side stream, so the graph has
two independent branches that the GPU can run concurrently, joined at the end.

Inputs are copied into static buffers; one graph per input shape — key ``(image batch, text batch, text length)``
for ``encode`` and per-tower keys for ``encode_image``/``encode_text`` — kept in a bounded LRU cache
(``max_graphs``, default 8; the least recently used graph and its memory pool are released). Before capture the
forward runs ``warmup`` times on a side stream (as torch.cuda.graphs recommends: lazy inits, cuBLAS workspaces).
Outputs are cloned out of the graph's static buffers, so results stay valid after the next replay.

Threads and streams: one lock per executor covers the cache (capture, LRU) and each call's copy, replay and clone,
so calls from several threads give what serial calls give. Copies, replay and clone run on the caller's current
stream; a call on another stream than the graph's previous one first waits (on the device) for that one. A capture
that fails or is interrupted caches nothing and restores the caller's stream; an out-of-memory error names the key.

SigLIP2 NaFlex images (:class:`~dualfuse.spec.PatchSequence`): the position grid is resized to each image's
``spatial_shapes``, which sizes tensors, so a graph is captured per (batch, patches, every image's grid). How HF
consumes ``spatial_shapes`` differs between transformers versions (some read them back to the host, which a capture
cannot do; others compute on the device and only check them with a read-back). :func:`naflex_capture_mode` finds
out once per model, by running the vision embeddings with synchronizing CUDA calls turned into errors; when no mode
is free of read-backs the image tower runs outside the graph, with a warning.
"""
from __future__ import annotations

import contextlib
import os
import threading
import traceback
import warnings
from collections import OrderedDict

import torch

from ..spec import PatchSequence
from . import register
from .base import Locked, SourceExecutor

# HF's checks on spatial_shapes (torch_compilable_check) read a flag back from the device; with this set they are
# skipped. Only during a capture: the warm-up runs just before it checked the same inputs.
_HF_CHECKS_OFF = "TRANSFORMERS_DISABLE_TORCH_CHECK"


@contextlib.contextmanager
def _hf_checks_off(on: bool):
    if not on:
        yield
        return
    old = os.environ.get(_HF_CHECKS_OFF)
    os.environ[_HF_CHECKS_OFF] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(_HF_CHECKS_OFF, None)
        else:
            os.environ[_HF_CHECKS_OFF] = old


def naflex_capture_mode(embeddings, seq: PatchSequence) -> str | None:
    """How a CUDA graph can capture a SigLIP2 vision embedding (``model.vision_model.embeddings``) called on
    ``seq``: ``"device"`` (spatial_shapes on the GPU, HF's checks skipped during the capture), ``"host"``
    (spatial_shapes on the CPU: HF reads them there), or None (every way reads back from the GPU or copies from
    pageable host memory, neither of which a capture can hold)."""
    for mode in ("device", "host"):
        shapes = seq.spatial_shapes if mode == "device" else seq.spatial_shapes.cpu()
        previous = torch.cuda.get_sync_debug_mode()
        try:
            with _hf_checks_off(mode == "device"):
                torch.cuda.set_sync_debug_mode("error")
                embeddings(seq.pixel_values, shapes)
        except RuntimeError:
            continue
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        return mode
    return None


def _static(x, shapes_on_host: bool):
    """A replay buffer holding a copy of ``x`` (a tensor or a PatchSequence)."""
    if isinstance(x, PatchSequence):
        shapes = x.spatial_shapes.cpu() if shapes_on_host else x.spatial_shapes.clone()
        return PatchSequence(x.pixel_values.clone(), shapes.clone(), x.pixel_attention_mask.clone())
    return x.clone()


def _fill(static, x):
    """Copy a call's inputs into a graph's buffers (NaFlex grids are part of the graph's key: not copied)."""
    if isinstance(static, PatchSequence):
        static.pixel_values.copy_(x.pixel_values)
        static.pixel_attention_mask.copy_(x.pixel_attention_mask)
    else:
        static.copy_(x)


class _Captured:
    __slots__ = ("graph", "inputs", "outputs", "home", "last_stream")

    def __init__(self, graph, inputs, outputs, home):
        self.graph, self.inputs, self.outputs = graph, inputs, outputs
        # home: the stream the static buffers were allocated on; last_stream: the stream of the last replay
        self.home, self.last_stream = home, None

    def release(self):
        """Leaving the cache: the allocator reuses the buffers on their home stream; it waits for the last replay."""
        if self.last_stream is not None and self.last_stream != self.home:
            self.home.wait_stream(self.last_stream)


@register("graph")
class GraphExecutor(Locked, SourceExecutor):
    needs_cuda = True

    def __init__(self, model, dtype=None, device=None, *, max_graphs: int = 8, warmup: int = 2, **kwargs):
        super().__init__(model, dtype, device, **kwargs)
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.max_graphs = max_graphs
        self.warmup = warmup
        self.graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self._lock = threading.RLock()  # cache and each call's copy / replay / clone (module docstring)
        self.captures = 0  # how many graphs were captured (re-captures after eviction count again)
        self.side_stream = torch.cuda.Stream(self.device)
        self.notes = "one CUDA graph, two branches"
        # SigLIP2 NaFlex: "device" / "host" (see naflex_capture_mode), "eager" (the image tower runs outside the
        # graph), or None until the first image call decides
        self.naflex_mode: str | None = None

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
        cur = torch.cuda.current_stream(self.device)
        try:
            static_px = _static(px, self.naflex_mode == "host") if px is not None else None
            static_ids = ids.clone() if ids is not None else None
            warm = torch.cuda.Stream(self.device)
            warm.wait_stream(cur)
            with torch.cuda.stream(warm):
                for _ in range(max(self.warmup, 1)):
                    self._forward(static_px, static_ids)
            cur.wait_stream(warm)
            graph = torch.cuda.CUDAGraph()
            # thread_local: other threads' CUDA calls stay legal during the capture
            with _hf_checks_off(self.naflex_mode == "device"), \
                    torch.cuda.graph(graph, capture_error_mode="thread_local"):
                outputs = self._forward(static_px, static_ids)
        except BaseException as e:
            if torch.cuda.current_stream(self.device) != cur:  # a broken capture can leave its stream current
                torch.cuda.set_stream(cur)
            if isinstance(e, torch.OutOfMemoryError):
                traceback.clear_frames(e.__traceback__)  # let the half-built buffers go before reading free memory
                torch.cuda.empty_cache()
                free, total = torch.cuda.mem_get_info(self.device)
                shape = {"images": None if px is None else tuple(getattr(px, "shape", ())),
                         "input_ids": None if ids is None else tuple(ids.shape)}
                raise torch.OutOfMemoryError(
                    f"graph: out of memory capturing the CUDA graph of a call with {shape} (warm-up, static inputs "
                    f"and the graph's private memory pool); {free / 2**20:.0f} MiB of {total / 2**20:.0f} MiB free on "
                    f"{self.device} now. Nothing was cached: free memory, call with a smaller batch or lower "
                    f"max_graphs (now {self.max_graphs}). ({e})") from e
            raise
        self.captures += 1
        return _Captured(graph, (static_px, static_ids), outputs, cur)

    def _run(self, key, px, ids):
        with self._lock:
            cur = torch.cuda.current_stream(self.device)
            entry = self.graphs.get(key)
            if entry is None:
                entry = self._capture(px, ids)  # cached only once captured
                self.graphs[key] = entry
                while len(self.graphs) > self.max_graphs:
                    # the graph and its private memory pool go with it
                    self.graphs.popitem(last=False)[1].release()
            else:
                self.graphs.move_to_end(key)
                if entry.last_stream is not None and entry.last_stream != cur:
                    # the last replay ran on another stream and may still use the static buffers
                    cur.wait_stream(entry.last_stream)
                static_px, static_ids = entry.inputs
                if static_px is not None:
                    _fill(static_px, px)
                if static_ids is not None:
                    static_ids.copy_(ids)
            entry.last_stream = cur
            entry.graph.replay()
            return tuple(o.clone() if o is not None else None for o in entry.outputs)

    # -- interface -----------------------------------------------------------------------------------
    def _image_key(self, px):
        if not isinstance(px, PatchSequence):
            return px.shape[0]
        with self._lock:
            if self.naflex_mode is None:
                self._decide_naflex_mode(px)
        b, n = px.pixel_values.shape[:2]
        return (b, n, tuple(map(tuple, px.spatial_shapes.tolist())))  # one small read-back: the grids

    def _decide_naflex_mode(self, px):
        if self.naflex_mode is None:
            self.naflex_mode = naflex_capture_mode(self.model.vision_model.embeddings, px) or "eager"
            if self.naflex_mode == "eager":
                warnings.warn("dualfuse graph: this transformers version's SigLIP2 vision embeddings read "
                              "spatial_shapes back from the GPU, which a CUDA graph cannot capture; the image tower "
                              "runs outside the graph (eagerly), the text tower in it", stacklevel=5)
                self.notes = "text tower in a CUDA graph; SigLIP2 NaFlex image tower eager (see the warning)"

    def _encode(self, px, ids):
        key = self._image_key(px)
        if self.naflex_mode == "eager":
            return self.image_fn(px), self._encode_text(ids)
        return self._run((key, ids.shape[0], ids.shape[1]), px, ids)

    def _encode_image(self, px):
        key = self._image_key(px)
        if self.naflex_mode == "eager":
            return self.image_fn(px)
        return self._run((key, None, None), px, None)[0]

    def _encode_text(self, ids):
        return self._run((None, ids.shape[0], ids.shape[1]), None, ids)[1]

"""compile: torch.compile of the source model's tower forwards.

On CUDA ``mode="reduce-overhead"`` (Inductor kernels replayed through CUDA graphs); on CPU the default mode
(reduce-overhead needs CUDA graphs). Static shapes (``dynamic=False``): each new input shape compiles once.
The first call of each shape is slow (compilation); warm up before timing.
"""
from __future__ import annotations

import torch

from . import register
from .base import SourceExecutor


@register("compile")
class CompileExecutor(SourceExecutor):
    def __init__(self, model, dtype=None, device=None, *, mode: str | None = None, backend: str = "inductor",
                 **kwargs):
        super().__init__(model, dtype, device, **kwargs)
        cuda = self.device.type == "cuda"
        self.mode = mode or ("reduce-overhead" if cuda else "default")
        self.backend = backend
        self.notes = f"mode={self.mode}" + ("" if cuda else " (reduce-overhead needs CUDA)")
        if backend != "inductor":
            self.notes += f", backend={backend}"
        image_fn, text_fn = self.image_fn, self.text_fn

        def both(px, ids):
            return image_fn(px), text_fn(ids)

        # torch.compile accepts a mode only with the Inductor backend
        opts = dict(mode=self.mode, dynamic=False) if backend == "inductor" else dict(backend=backend, dynamic=False)
        self._both = torch.compile(both, **opts)
        self._image = torch.compile(image_fn, **opts)
        self._text = torch.compile(text_fn, **opts)
        # CUDA-graph outputs are overwritten by the next replay: hand the caller its own copy.
        self._cudagraphs = cuda and backend == "inductor" and self.mode in ("reduce-overhead", "max-autotune")

    def _run(self, fn, *args):
        if self._cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
            out = fn(*args)
            return tuple(o.clone() for o in out) if isinstance(out, tuple) else out.clone()
        return fn(*args)

    def _encode(self, px, ids):
        return self._run(self._both, px, ids)

    def _encode_image(self, px):
        return self._run(self._image, px)

    def _encode_text(self, ids):
        return self._run(self._text, ids)

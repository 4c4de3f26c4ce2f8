"""compile and compile-max: torch.compile of the source model's tower forwards.

``compile``: on CUDA ``mode="reduce-overhead"`` (Inductor kernels replayed through CUDA graphs); on CPU the default
mode (reduce-overhead needs CUDA graphs). ``compile-max``: ``mode="max-autotune"`` (Inductor benchmarks Triton and
cuBLAS GEMM choices at compile time, and replays CUDA graphs on CUDA); compiling takes minutes on large models, so
``dualfuse bench`` runs it only when asked for (``--executors compile-max``). Static shapes (``dynamic=False``):
each new input shape compiles once. The first call of each shape is slow (compilation); warm up before timing.
``compile_s`` keeps each first call's seconds (compilation included), per call shape.
"""
from __future__ import annotations

import torch

from . import register
from .base import SourceExecutor


@register("compile")
class CompileExecutor(SourceExecutor):
    compiles_on_first_call = True  # dualfuse bench reports the first call's time as the compile time

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
        self.compile_s: dict[tuple, float] = {}  # (function, input shapes) -> first call's seconds

    def _run(self, fn, *args):
        key = (fn, *(tuple(getattr(a, "shape", ())) for a in args))
        if key not in self.compile_s:  # the first call of a shape compiles it
            import time

            t0 = time.perf_counter()
            out = self._call(fn, *args)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.compile_s[key] = time.perf_counter() - t0
            return out
        return self._call(fn, *args)

    def _call(self, fn, *args):
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


@register("compile-max")
class CompileMaxExecutor(CompileExecutor):
    """torch.compile with ``mode="max-autotune"`` (GEMM autotuning at compile time; CUDA graphs on CUDA)."""

    opt_in = True  # minutes of compilation per shape on large models: not in `dualfuse bench`'s default set

    def __init__(self, model, dtype=None, device=None, **kwargs):
        kwargs.setdefault("mode", "max-autotune")
        super().__init__(model, dtype, device, **kwargs)

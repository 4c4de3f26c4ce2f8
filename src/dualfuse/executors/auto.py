"""auto: the fused executor where it wins, the CUDA graph executor where it does not, per call-shape family.

Decided once, when the executor is built (``executor="auto"`` in ``dualfuse.fuse`` / ``dualfuse bench``), from
this card's calibration (dualfuse.calibration, ``calls``: the calibrated medians of both executors for this model,
dtype and fused weight format; a calibration given as a path or object is checked and copied by
:func:`dualfuse.calibration.resolve`): for each calibrated call family (towers present x batch bucket,
:func:`dualfuse.calibration.call_family`) the faster one. A call goes to the graph executor when its family
chose graph; everything else (uncalibrated families, uint8 camera frames, SigLIP2 NaFlex patch sequences) runs
fused, as ``executor="fused"`` would. The reasons are printed once (stderr, ``verbose=True``) and kept in
``decisions`` and ``notes``. The fused side also takes its per-stage library choices from the same calibration
(``gemm_impl="auto"``).

The graph executor is built only when some family chose it; it keeps a private copy of the source model (so
memory is the fused executor's plus the graph executor's then). A model given as a DualEncoderSpec (no source
model to run) stays fused everywhere. Not ``fuse()``'s default.
"""
from __future__ import annotations

import sys

import torch

from .. import calibration as C
from ..config import FusedConfig
from . import register
from .fused import FusedExecutor


@register("auto")
class AutoExecutor(FusedExecutor):
    stock = False
    opt_in = True  # not in `dualfuse bench`'s default set (without a calibration it is the fused row again)

    def __init__(self, model, dtype=None, device=None, *, calibration=None, verbose: bool = True, **kwargs):
        from ..spec import DualEncoderSpec

        source = model
        # calibration: that of the executor choice, and (gemm_impl="auto") of the fused side's library choices,
        # which reads it itself; given here or as the fused config's field
        base = kwargs.get("config")
        if calibration is None and isinstance(base, FusedConfig):
            calibration = base.calibration
        impl = kwargs.get("gemm_impl", base.gemm_impl if isinstance(base, FusedConfig) else "auto")
        reads = impl == "auto"
        super().__init__(model, dtype, device, **(dict(calibration=calibration) if reads else {}), **kwargs)
        cal = self.calibration if reads else C.resolve(calibration, self.device)
        self.decisions: dict[str, tuple[str, str]] = {}
        if cal is not None:
            mkey = C.model_key(self.spec, self.dtype, self.weight_format)
            for fam in sorted(cal.calls.get(mkey, {})):
                self.decisions[fam] = cal.choose_executor(mkey, fam)
        self.graph = None
        wants_graph = [f for f, (choice, _) in self.decisions.items() if choice == "graph"]
        why_not = None
        if wants_graph:
            if self.fallback is not None:
                why_not = f"the fused kernels do not cover this model here: every call runs on {self.fallback.name}"
            elif isinstance(source, DualEncoderSpec):
                why_not = "given a DualEncoderSpec: no source model for the graph executor"
            elif self.device.type != "cuda":
                why_not = "the graph executor needs CUDA"
            else:
                from .graph import GraphExecutor

                if isinstance(source, str):
                    from ..presets import load

                    source = load(source)
                self.graph = GraphExecutor(source, self.dtype, self.device, spec=self.spec)
        if why_not:
            self.decisions = {f: (("fused", f"{why} (graph wanted; {why_not})") if c == "graph" else (c, why))
                              for f, (c, why) in self.decisions.items()}
        graph_fams = [f for f, (c, _) in self.decisions.items() if c == "graph"] if self.graph else []
        base = self.notes
        if cal is None:
            summary = "auto: no calibration for this card, fused everywhere"
        else:
            summary = f"auto: graph for {', '.join(graph_fams)}" if graph_fams else "auto: fused everywhere"
        self.notes = f"{summary}; {base}"
        if verbose:
            lines = [f"  {why} -> {c}" for _, (c, why) in sorted(self.decisions.items())] or \
                ["  (no calibrated call families for this model: fused everywhere)"]
            print("dualfuse auto: " + summary + "\n" + "\n".join(lines), file=sys.stderr)

    def route(self, image_batch: int, text_batch: int) -> str:
        """"fused" or "graph": where a call of these batch sizes runs."""
        if self.graph is None:
            return "fused"
        return self.decisions.get(C.call_family(image_batch, text_batch), ("fused", ""))[0]

    def _graph_for(self, px, ids):
        if self.graph is None:
            return None
        if px is not None and (not isinstance(px, torch.Tensor) or px.dtype == torch.uint8):
            return None  # NaFlex patch sequences and camera frames: fused
        bi = px.shape[0] if px is not None else 0
        bt = ids.shape[0] if isinstance(ids, torch.Tensor) else 0
        return self.graph if self.route(bi, bt) == "graph" else None

    def encode(self, pixel_values, input_ids):
        g = self._graph_for(pixel_values, input_ids)
        return g.encode(pixel_values, input_ids) if g is not None else super().encode(pixel_values, input_ids)

    def encode_image(self, pixel_values):
        g = self._graph_for(pixel_values, None)
        return g.encode_image(pixel_values) if g is not None else super().encode_image(pixel_values)

    def encode_text(self, input_ids):
        g = self._graph_for(None, input_ids)
        return g.encode_text(input_ids) if g is not None else super().encode_text(input_ids)

"""Export the source model's towers to ONNX (shared by the onnxruntime and tensorrt executors).

Each tower is exported on its own from a private copy of the source model (cast to the executor's dtype, on its
device) with the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``), which handles HF CLIP /
SigLIP and open_clip's towers robustly. The batch axis is dynamic; the text length is not (tracing bakes
length-dependent branches of the attention-mask code into the graph), so the text tower is exported once per
text length, when that length is first used. Files go to a temporary folder that lives as long as the owner
(or to ``cache_dir`` when one is given, where they are kept).
"""
from __future__ import annotations

import os
import tempfile
import warnings
import weakref

import torch

from .base import ExecutorUnavailable, copy_source_model, dtype_name, source_forward

OPSET = 17
INPUT_IMAGE, INPUT_TEXT, OUTPUT = "pixel_values", "input_ids", "embeds"


class _Tower(torch.nn.Module):
    def __init__(self, model, fn):
        super().__init__()
        self.model = model  # registered so the exporter sees the weights as parameters
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class TowerExporter:
    """Owns a private model copy and the folder of exported ``.onnx`` files."""

    def __init__(self, source_model, family: str, spec, dtype: torch.dtype, device: torch.device,
                 cache_dir: str | None = None):
        if dtype == torch.bfloat16:
            raise ExecutorUnavailable("bf16 is not supported by the ONNX path here (no bf16 numpy type for I/O, "
                                      "few bf16 kernels in ONNX Runtime): use --dtype fp16")
        if family == "hf_siglip2":
            raise ExecutorUnavailable("SigLIP2 NaFlex patch sequences (pixel_values with spatial_shapes and "
                                      "pixel_attention_mask) are not exported to ONNX here")
        self.spec, self.dtype, self.device, self.family = spec, dtype, device, family
        # The copy stays on the CPU (tracing there needs no GPU memory next to the runtime's); the exported graph
        # carries no device.
        self.model = copy_source_model(source_model, torch.device("cpu"), dtype)
        self.image_fn, self.text_fn = source_forward(self.model, family)
        if cache_dir:
            os.makedirs(cache_dir, exist_ok=True)
            self.dir = cache_dir
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="dualfuse-onnx-")
            self.dir = self._tmp.name
            weakref.finalize(self, self._tmp.cleanup)
        self.tag = f"{spec.name or family}-{dtype_name(dtype)}".replace("/", "_").replace(":", "_")

    def _export(self, fn, example: torch.Tensor, input_name: str, path: str) -> str:
        if os.path.isfile(path):
            return path
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings from HF's shape checks are expected
            # Gradients on while tracing: nn.MultiheadAttention (open_clip) otherwise takes its fused fast path
            # (aten::_native_multi_head_attention), which has no ONNX export.
            self.model.requires_grad_(True)
            try:
                with torch.enable_grad():  # (the lazy text export runs inside encode's no_grad)
                    torch.onnx.export(_Tower(self.model, fn), (example,), path, input_names=[input_name],
                                      output_names=[OUTPUT],
                                      dynamic_axes={input_name: {0: "batch"}, OUTPUT: {0: "batch"}},
                                      opset_version=OPSET, do_constant_folding=True, dynamo=False)
            finally:
                self.model.requires_grad_(False)
        return path

    def image(self) -> str:
        """Path of the image tower's ONNX file (input ``pixel_values`` [batch, C, S, S])."""
        e = self.spec.vision.embed
        x = torch.randn(2, e.channels, e.image_size, e.image_size, dtype=self.dtype)
        return self._export(self.image_fn, x, INPUT_IMAGE, os.path.join(self.dir, f"{self.tag}-image.onnx"))

    def text(self, length: int) -> str:
        """Path of the text tower's ONNX file for sequences of ``length`` tokens (input ``input_ids``)."""
        from ..bench import random_inputs

        _, ids = random_inputs(self.spec, 0, 2, length, sets=1)[0]
        return self._export(self.text_fn, ids, INPUT_TEXT, os.path.join(self.dir, f"{self.tag}-text-{length}.onnx"))


NUMPY_DTYPES = {torch.float16: "float16", torch.float32: "float32", torch.int64: "int64"}

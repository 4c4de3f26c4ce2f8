"""onnxruntime: the source model's towers exported to ONNX, run by ONNX Runtime with the best provider here.

Providers, first available wins: TensorRT EP (fp16 when the executor is fp16; engines cached next to the ONNX
files), CUDA EP, and on a CPU device the CPU EP. A CUDA device with only the CPU package of ONNX Runtime installed
is reported as unavailable ("pip install onnxruntime-gpu") rather than timed on the CPU. Inputs and outputs are
bound in place (IOBinding on the torch tensors' memory, no copies); on CUDA, ONNX Runtime runs on the torch stream
that was current when the executor was built. The towers run one after the other (two sessions).

A stock executor: what a user gets from ``torch.onnx.export`` + ONNX Runtime. Missing ``onnxruntime`` gives an
"not installed" row in ``dualfuse bench``, never an error.
"""
from __future__ import annotations

import torch

from . import register
from ._onnx_export import INPUT_IMAGE, INPUT_TEXT, NUMPY_DTYPES, OUTPUT, TowerExporter
from .base import Executor, ExecutorUnavailable

INSTALL_HINT = "pip install onnxruntime-gpu (CUDA) or onnxruntime (CPU)"


def _import_ort():
    try:
        import onnxruntime
    except ImportError as e:
        raise ExecutorUnavailable(f"not installed: {INSTALL_HINT}") from e
    return onnxruntime


def choose_providers(available: list[str], device: torch.device, dtype: torch.dtype, cache_dir: str,
                     stream: int | None = None) -> list:
    """ONNX Runtime provider list (with options) for ``device``: TensorRT > CUDA > CPU by availability."""
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    idx = device.index or 0
    chosen: list = []
    common = {"device_id": idx}
    if stream is not None:
        common.update(user_compute_stream=str(stream))
    if "TensorrtExecutionProvider" in available:
        chosen.append(("TensorrtExecutionProvider", dict(common, trt_fp16_enable=dtype == torch.float16,
                                                         trt_engine_cache_enable=True,
                                                         trt_engine_cache_path=cache_dir)))
    if "CUDAExecutionProvider" in available:
        chosen.append(("CUDAExecutionProvider", dict(common)))
    if not chosen:
        cpu_only = ", ".join(short_provider(p) for p in available)
        raise ExecutorUnavailable(f"not installed: pip install onnxruntime-gpu (providers here: {cpu_only})")
    return chosen + ["CPUExecutionProvider"]


def short_provider(name: str) -> str:
    return name.replace("ExecutionProvider", "")


@register("onnxruntime")
class OnnxRuntimeExecutor(Executor):
    runs_uncovered = False  # the ONNX export reads the towers' shapes from the spec
    stock = True

    def __init__(self, model, dtype=None, device=None, *, cache_dir: str | None = None,
                 providers: list | None = None, **kwargs):
        self.ort = _import_ort()
        super().__init__(model, dtype, device, **kwargs)
        self.exporter = TowerExporter(self._source, self.family, self.spec, self.dtype, self.device, cache_dir)
        del self._source
        self.stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        self.providers = providers or choose_providers(
            self.ort.get_available_providers(), self.device, self.dtype, self.exporter.dir,
            self.stream.cuda_stream if self.stream is not None else None)
        self.image_session = self._session(self.exporter.image())
        self.text_sessions: dict[int, object] = {}
        active = self.image_session.get_providers()
        self.active_provider = active[0] if active else "?"
        self.notes = f"ONNX Runtime {self.ort.__version__} · {short_provider(self.active_provider)}"

    def _session(self, path: str):
        so = self.ort.SessionOptions()
        so.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        return self.ort.InferenceSession(path, sess_options=so, providers=self.providers)

    def _text_session(self, length: int):
        s = self.text_sessions.get(length)
        if s is None:
            s = self.text_sessions[length] = self._session(self.exporter.text(length))
        return s

    def _run(self, session, input_name: str, x: torch.Tensor) -> torch.Tensor:
        if self.stream is not None and torch.cuda.current_stream(self.device) != self.stream:
            torch.cuda.current_stream(self.device).synchronize()  # inputs were made on another stream
        x = x.contiguous()
        out = torch.empty(x.shape[0], self.spec.embed_dim, dtype=self.dtype, device=self.device)
        kind = "cuda" if self.device.type == "cuda" else "cpu"
        idx = self.device.index or 0
        b = session.io_binding()
        b.bind_input(input_name, kind, idx, NUMPY_DTYPES[x.dtype], tuple(x.shape), x.data_ptr())
        b.bind_output(OUTPUT, kind, idx, NUMPY_DTYPES[out.dtype], tuple(out.shape), out.data_ptr())
        session.run_with_iobinding(b)
        return out

    def _encode_image(self, px):
        return self._run(self.image_session, INPUT_IMAGE, px)

    def _encode_text(self, ids):
        return self._run(self._text_session(ids.shape[1]), INPUT_TEXT, ids)

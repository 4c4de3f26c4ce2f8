"""onnxruntime: the source model's towers exported to ONNX, run by ONNX Runtime with the best provider here.

Providers, first available wins: TensorRT EP (only where TensorRT's libraries load; fp16 when the executor is
fp16; engines cached next to the ONNX files), CUDA EP, and on a CPU device the CPU EP. A CUDA device with only the
CPU package of ONNX Runtime installed is reported as unavailable ("CUDA execution provider missing ... pip install
onnxruntime-gpu") rather than timed on the CPU; so is a CUDA EP that is listed but fails to load (ONNX Runtime
would otherwise fall back to the CPU silently). Before the first CUDA session, the CUDA and cuDNN libraries of the
installed ``nvidia-*`` wheels (the ones torch's CUDA wheels bring: libcudart / libcublas / libcublasLt .so.13,
cuDNN 9) are preloaded (``onnxruntime.preload_dlls()`` where this ONNX Runtime has it, then every such library
found under ``site-packages/nvidia/*/lib``), so a CUDA 13 build of onnxruntime-gpu finds them without
LD_LIBRARY_PATH.

CUDA EP with its CUDA graph (``cuda_graph=True``, the default on CUDA): ONNX Runtime captures each session's
kernels into a CUDA graph and replays it; that needs fixed input and output addresses, so each (tower, input shape)
gets its own session with static input/output buffers (a call copies its inputs in and clones the output). Where
the graph cannot be used (a node not placed on the CUDA EP, capture refused), the executor falls back to the
plain CUDA EP and says so in its notes. Without the graph, inputs and outputs are bound in place (IOBinding on the
torch tensors' memory, no copies) and ONNX Runtime runs on the torch stream that was current when the executor was
built. The towers run one after the other (two sessions).

A stock executor: what a user gets from ``torch.onnx.export`` + ONNX Runtime. Missing ``onnxruntime`` gives an
"not installed" row in ``dualfuse bench``, never an error.
"""
from __future__ import annotations

import ctypes
import glob
import os
import sys

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


# sonames a CUDA 13 build of onnxruntime-gpu's CUDA EP opens (cuDNN 9 loads its sub-libraries itself)
CUDA_LIBRARIES = ("libcudart.so.13", "libcublasLt.so.13", "libcublas.so.13", "libcufft.so.12", "libcurand.so.10",
                  "libnvrtc.so.13", "libcudnn.so.9", "libcudnn_graph.so.9", "libcudnn_ops.so.9",
                  "libcudnn_cnn.so.9", "libcudnn_adv.so.9", "libcudnn_heuristic.so.9",
                  "libcudnn_engines_precompiled.so.9", "libcudnn_engines_runtime_compiled.so.9")
_preloaded: list[str] | None = None


def nvidia_library_dirs() -> list[str]:
    """``lib`` folders of the installed ``nvidia-*`` wheels (``site-packages/nvidia/*/lib``)."""
    dirs = []
    for root in sys.path:
        if root and os.path.isdir(os.path.join(root, "nvidia")):
            dirs += sorted(d for d in glob.glob(os.path.join(root, "nvidia", "*", "lib")) if os.path.isdir(d))
    return list(dict.fromkeys(dirs))


def preload_cuda_libraries(ort) -> list[str]:
    """Load the CUDA / cuDNN libraries the CUDA EP needs from the nvidia wheels (once per process); returns the
    files loaded by this function (``ort.preload_dlls()`` runs first where it exists). Missing ones are skipped:
    the CUDA EP's own load then says what is missing."""
    global _preloaded
    if _preloaded is not None:
        return _preloaded
    _preloaded = []
    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls(directory="")  # "": nvidia site packages, then the default search path
        except Exception:  # noqa: BLE001 - best effort; the ctypes pass below and the EP's load say the rest
            pass
    if not sys.platform.startswith("linux"):
        return _preloaded
    dirs = nvidia_library_dirs()
    for name in CUDA_LIBRARIES:
        for d in dirs:
            path = os.path.join(d, name)
            if os.path.isfile(path):
                try:
                    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                    _preloaded.append(path)
                except OSError:
                    pass
                break
    return _preloaded


def tensorrt_libraries_present() -> bool:
    """Whether TensorRT's runtime library loads here (ONNX Runtime's GPU wheel lists its TensorRT EP everywhere)."""
    for name in ("libnvinfer.so.10", "libnvinfer.so"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def choose_providers(available: list[str], device: torch.device, dtype: torch.dtype, cache_dir: str,
                     stream: int | None = None, *, tensorrt: bool | None = None, cuda_graph: bool = False) -> list:
    """ONNX Runtime provider list (with options) for ``device``: TensorRT > CUDA > CPU by availability.
    ``tensorrt``: use the TensorRT EP when listed (None: only where TensorRT's libraries load).
    ``cuda_graph``: the CUDA EP's ``enable_cuda_graph`` (then no user stream: ONNX Runtime captures on its own)."""
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    idx = device.index or 0
    chosen: list = []
    common = {"device_id": idx}
    if stream is not None and not cuda_graph:
        common.update(user_compute_stream=str(stream))
    if tensorrt is None:
        tensorrt = "TensorrtExecutionProvider" in available and tensorrt_libraries_present()
    if tensorrt and "TensorrtExecutionProvider" in available:
        chosen.append(("TensorrtExecutionProvider", dict(common, trt_fp16_enable=dtype == torch.float16,
                                                         trt_engine_cache_enable=True,
                                                         trt_engine_cache_path=cache_dir)))
    if "CUDAExecutionProvider" in available:
        chosen.append(("CUDAExecutionProvider", dict(common, **({"enable_cuda_graph": "1"} if cuda_graph else {}))))
    if not chosen:
        here = ", ".join(short_provider(p) for p in available)
        raise ExecutorUnavailable(f"CUDA execution provider missing: this ONNX Runtime has only {here}; "
                                  "not installed: pip install onnxruntime-gpu")
    return chosen + ["CPUExecutionProvider"]


def short_provider(name: str) -> str:
    return name.replace("ExecutionProvider", "")


@register("onnxruntime")
class OnnxRuntimeExecutor(Executor):
    runs_uncovered = False  # the ONNX export reads the towers' shapes from the spec
    stock = True

    def __init__(self, model, dtype=None, device=None, *, cache_dir: str | None = None,
                 providers: list | None = None, cuda_graph: bool | None = None, **kwargs):
        self.ort = _import_ort()
        super().__init__(model, dtype, device, **kwargs)
        cuda = self.device.type == "cuda"
        available = self.ort.get_available_providers()
        if cuda and "CUDAExecutionProvider" in available:
            preload_cuda_libraries(self.ort)
        if cuda_graph is not None and not isinstance(cuda_graph, bool):
            raise ValueError(f"cuda_graph must be None (auto), True or False, got {cuda_graph!r}")
        self.exporter = TowerExporter(self._source, self.family, self.spec, self.dtype, self.device, cache_dir)
        del self._source
        self.stream = torch.cuda.current_stream(self.device) if cuda else None
        stream = self.stream.cuda_stream if self.stream is not None else None
        self.providers = providers or choose_providers(available, self.device, self.dtype, self.exporter.dir, stream)
        self.text_sessions: dict[int, object] = {}
        self.graph_sessions: dict[tuple, _GraphSession] = {}  # (tower, input shape) -> CUDA-graph session
        # a single text tower has no image session: its first text session (the context length) names the provider
        self.image_session = self._session(self.exporter.image()) if self.spec.vision is not None else None
        first = self.image_session or self._text_session(self.spec.text.context_length)
        active = first.get_providers()
        self.active_provider = active[0] if active else "?"
        if cuda and self.active_provider == "CPUExecutionProvider":
            raise ExecutorUnavailable(
                f"CUDA execution provider missing: ONNX Runtime {self.ort.__version__} lists "
                f"{', '.join(short_provider(p) for p in available)} but could not load its CUDA EP (libcudart / "
                f"libcublas .so.13 and cuDNN 9 for CUDA 13 not found?) and would run on the CPU")
        # the CUDA graph: on by default with the CUDA EP (a TensorRT EP session keeps its own engines)
        want_graph = cuda_graph if cuda_graph is not None else True
        self.graph_providers = None
        self.graph_note = ""
        if cuda and self.active_provider == "CUDAExecutionProvider" and want_graph and providers is None:
            self.graph_providers = choose_providers(available, self.device, self.dtype, self.exporter.dir,
                                                    tensorrt=False, cuda_graph=True)
        elif cuda and want_graph and cuda_graph:
            self.graph_note = " · CUDA graph off (needs the CUDA EP and the default providers)"
        precision = "fp16" if self.dtype == torch.float16 else "fp32"
        self.notes = f"ONNX Runtime {self.ort.__version__} · {short_provider(self.active_provider)} {precision}" + \
            (" · CUDA graph" if self.graph_providers else self.graph_note)

    def _session(self, path: str, providers=None):
        so = self.ort.SessionOptions()
        so.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        return self.ort.InferenceSession(path, sess_options=so, providers=providers or self.providers)

    def _graph_run(self, tower: str, path_fn, input_name: str, x: torch.Tensor) -> torch.Tensor | None:
        """One call through the CUDA-graph session of this (tower, shape); None where the graph does not work
        here (then the executor drops it for good and says why in its notes)."""
        key = (tower, tuple(x.shape))
        g = self.graph_sessions.get(key)
        try:
            if g is None:
                g = _GraphSession(self, path_fn(), input_name, x)
                self.graph_sessions[key] = g
            return g(x)
        except Exception as e:  # noqa: BLE001 - ONNX Runtime refuses the graph: plain CUDA EP from here on
            self.graph_sessions.clear()
            self.graph_providers = None
            msg = f"{type(e).__name__}: {e}".replace("\n", " ")[:160]
            self.notes = self.notes.replace(" · CUDA graph", "") + f" · CUDA graph off ({msg})"
            torch.cuda.synchronize(self.device)
            return None

    def _text_session(self, length: int):
        s = self.text_sessions.get(length)
        if s is None:
            s = self.text_sessions[length] = self._session(self.exporter.text(length))
        return s

    def _run(self, session, input_name: str, x: torch.Tensor) -> torch.Tensor:
        if self.stream is not None and torch.cuda.current_stream(self.device) != self.stream:
            torch.cuda.current_stream(self.device).synchronize()  # inputs were made on another stream
        x = x.contiguous()
        shape = output_shape(session, x.shape[0], self.spec.embed_dim)
        out = torch.empty(shape, dtype=self.dtype, device=self.device)
        kind = "cuda" if self.device.type == "cuda" else "cpu"
        idx = self.device.index or 0
        b = session.io_binding()
        b.bind_input(input_name, kind, idx, NUMPY_DTYPES[x.dtype], tuple(x.shape), x.data_ptr())
        b.bind_output(OUTPUT, kind, idx, NUMPY_DTYPES[out.dtype], tuple(out.shape), out.data_ptr())
        session.run_with_iobinding(b)
        return out

    def _encode_image(self, px):
        if self.graph_providers is not None:
            out = self._graph_run("image", self.exporter.image, INPUT_IMAGE, px)
            if out is not None:
                return out
        return self._run(self.image_session, INPUT_IMAGE, px)

    def _encode_text(self, ids):
        if self.graph_providers is not None:
            out = self._graph_run("text", lambda: self.exporter.text(ids.shape[1]), INPUT_TEXT, ids)
            if out is not None:
                return out
        return self._run(self._text_session(ids.shape[1]), INPUT_TEXT, ids)


def output_shape(session, batch: int, embed_dim: int) -> tuple:
    """The shape of a session's output for ``batch`` inputs: [batch, embed_dim], or [batch, tokens, width] for a
    tower without a pooling head (SigLIP as VLMs build it); only the batch axis is dynamic (other dims left
    symbolic by the export: [batch, embed_dim])."""
    dims = tuple(session.get_outputs()[0].shape[1:])
    return (batch, *dims) if all(isinstance(d, int) for d in dims) else (batch, embed_dim)


class _GraphSession:
    """A CUDA-EP session with ``enable_cuda_graph`` for one input shape: static input/output buffers bound once
    (ONNX Runtime replays its graph on those addresses). ONNX Runtime runs on its own stream: a call copies the
    input in on the caller's stream, waits for it, runs (ONNX Runtime synchronizes its stream at the end of a run)
    and clones the output."""

    def __init__(self, ex: OnnxRuntimeExecutor, path: str, input_name: str, like: torch.Tensor):
        self.ex = ex
        self.session = ex._session(path, ex.graph_providers)
        if "CUDAExecutionProvider" not in self.session.get_providers()[:1]:
            raise RuntimeError("the CUDA-graph session did not get the CUDA EP")
        self.input = torch.empty_like(like, memory_format=torch.contiguous_format)
        shape = output_shape(self.session, like.shape[0], ex.spec.embed_dim)
        self.output = torch.empty(shape, dtype=ex.dtype, device=ex.device)
        idx = ex.device.index or 0
        b = self.binding = self.session.io_binding()
        b.bind_input(input_name, "cuda", idx, NUMPY_DTYPES[self.input.dtype], tuple(self.input.shape),
                     self.input.data_ptr())
        b.bind_output(OUTPUT, "cuda", idx, NUMPY_DTYPES[self.output.dtype], tuple(self.output.shape),
                      self.output.data_ptr())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.input.copy_(x)
        torch.cuda.current_stream(self.ex.device).synchronize()
        self.session.run_with_iobinding(self.binding)
        return self.output.clone()

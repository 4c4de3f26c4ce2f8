"""tensorrt: TensorRT engines built from the towers' ONNX export, run on the torch stream.

The towers are exported like the onnxruntime executor does (``_onnx_export``), parsed with TensorRT's ONNX parser
and built into one engine per tower and input shape (an optimization profile with min = opt = max = the shape:
the fastest engine for exactly that batch; built on first use of a shape, which ``dualfuse bench`` does before
timing). fp16 executors set the FP16 builder flag (the ONNX graph is already fp16). Bindings point at torch
tensors (no copies); ``execute_async_v3`` runs on the current torch stream. The towers run one after the other.

Needs CUDA and the ``tensorrt`` Python package (TensorRT 10 API). Without the package the bench row says
"not installed".
"""
from __future__ import annotations

import torch

from . import register
from ._onnx_export import INPUT_IMAGE, INPUT_TEXT, OUTPUT, TowerExporter
from .base import Executor, ExecutorUnavailable

INSTALL_HINT = "pip install tensorrt"


def _import_trt():
    try:
        import tensorrt
    except ImportError as e:
        raise ExecutorUnavailable(f"not installed: {INSTALL_HINT}") from e
    return tensorrt


class _Engine:
    __slots__ = ("engine", "context", "input_name")

    def __init__(self, engine, context, input_name):
        self.engine, self.context, self.input_name = engine, context, input_name


@register("tensorrt")
class TensorRTExecutor(Executor):
    runs_uncovered = False  # the ONNX export reads the towers' shapes from the spec
    needs_cuda = True
    stock = True

    def __init__(self, model, dtype=None, device=None, *, cache_dir: str | None = None,
                 workspace_gib: float = 4.0, max_engines: int = 16, **kwargs):
        self.trt = _import_trt()  # before the CUDA check: a missing package says "not installed" everywhere
        super().__init__(model, dtype, device, **kwargs)
        self.exporter = TowerExporter(self._source, self.family, self.spec, self.dtype, self.device, cache_dir)
        del self._source
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.runtime = self.trt.Runtime(self.logger)
        self.workspace = int(workspace_gib * 2**30)
        self.max_engines = max_engines
        self.engines: dict[tuple, _Engine] = {}
        self.builds = 0
        self.notes = f"TensorRT {self.trt.__version__}, one engine per tower and shape"

    def _build(self, onnx_path: str, input_name: str, shape: tuple) -> _Engine:
        trt = self.trt
        builder = trt.Builder(self.logger)
        network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(onnx_path):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace)
        if self.dtype == torch.float16:
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        profile.set_shape(input_name, shape, shape, shape)
        config.add_optimization_profile(profile)
        blob = builder.build_serialized_network(network, config)
        if blob is None:
            raise RuntimeError(f"TensorRT failed to build an engine for {onnx_path} at shape {list(shape)}")
        engine = self.runtime.deserialize_cuda_engine(blob)
        context = engine.create_execution_context()
        context.set_input_shape(input_name, shape)
        self.builds += 1
        return _Engine(engine, context, input_name)

    def _engine(self, tower: str, shape: tuple) -> _Engine:
        key = (tower, shape)
        e = self.engines.get(key)
        if e is None:
            if len(self.engines) >= self.max_engines:
                self.engines.pop(next(iter(self.engines)))
            if tower == "image":
                e = self._build(self.exporter.image(), INPUT_IMAGE, shape)
            else:
                e = self._build(self.exporter.text(shape[1]), INPUT_TEXT, shape)
            self.engines[key] = e
        return e

    def _run(self, tower: str, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        e = self._engine(tower, tuple(x.shape))
        out = torch.empty(x.shape[0], self.spec.embed_dim, dtype=self.dtype, device=self.device)
        ctx = e.context
        ctx.set_tensor_address(e.input_name, x.data_ptr())
        ctx.set_tensor_address(OUTPUT, out.data_ptr())
        if not ctx.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError(f"TensorRT execution failed ({tower} tower, shape {list(x.shape)})")
        return out

    def _encode_image(self, px):
        return self._run("image", px)

    def _encode_text(self, ids):
        return self._run("text", ids)

"""Weights in host memory that the GPU reads directly (zero-copy): the edge-regime stand-in's weight store.

Every byte a kernel reads from such a tensor crosses PCIe (~50 GB/s on an H100 host), the order of magnitude of a
Jetson Orin's LPDDR5 (68-205 GB/s), so a batch-1 forward becomes bound by weight bytes, as on the device.

How. Torch's pinned allocator (``torch.empty(..., pin_memory=True)``) takes its memory from ``cudaHostAlloc``. Under
unified virtual addressing (every 64-bit CUDA platform) such memory is mapped into the device's address space and its
host pointer is valid in kernels (CUDA Runtime API, ``cudaHostAlloc``: "cudaHostAllocMapped" is implied with UVA, and
``cudaHostGetDevicePointer`` returns the host pointer). So no ctypes call into libcudart is needed: a small owner
object holding the pinned tensor exposes its pointer through ``__cuda_array_interface__`` and
``torch.as_tensor(owner, device="cuda")`` gives a CUDA tensor over the same bytes, to cuBLAS, Triton pointer loads
and CUDA graphs alike. Torch keeps a reference to the owner for as long as the CUDA tensor (and its views) live, so
the pinned memory outlives every user. Tensor-descriptor (TMA) loads from host memory are not relied on: the stand-in
turns the GEMM's ``tma`` option off (:data:`NO_TMA`).

Placements (:func:`get_placement`): ``"host"`` (the above; needs CUDA), ``"device"`` (nothing moves) and ``"copy"``
(a plain copy into separately allocated buffers on the tensor's own device: the CPU tests' stand-in for ``"host"``,
behind the same interface). :func:`place_spec`, :func:`place_module_params` and :func:`place_fused_executor` move a
model's weights; :func:`measure_weight_bandwidth` measures what the GPU reads from host-mapped memory.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

PLACEMENTS = ("host", "device", "copy")
# GEMM config overrides for weights in host memory: pointer loads only (tensor descriptors may not read host memory)
NO_TMA = {"tma": False}


class MappedHostBuffer:
    """Owner of one pinned host tensor, seen by CUDA consumers through ``__cuda_array_interface__`` (raw bytes)."""

    def __init__(self, host: torch.Tensor):
        if host.device.type != "cpu" or not host.is_pinned():
            raise ValueError("MappedHostBuffer: expected a pinned CPU tensor")
        self.host = host  # keeps the pinned memory alive while any CUDA view of it exists
        nbytes = host.untyped_storage().nbytes()
        self.__cuda_array_interface__ = dict(shape=(nbytes,), typestr="|u1", data=(host.data_ptr(), False),
                                             strides=None, version=3)


def _host_buffer_like(t: torch.Tensor, pin: bool) -> torch.Tensor:
    """A CPU tensor with t's shape, dtype and (dense) strides, pinned if ``pin``."""
    dense = t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)
    if dense:
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu", pin_memory=pin)
    return torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)


def host_mapped_like(t: torch.Tensor, device=None) -> torch.Tensor:
    """A CUDA tensor equal to ``t`` (same shape, dtype, strides where dense) whose bytes live in pinned host memory
    mapped into ``device``'s address space (default: t's device if CUDA, else the current CUDA device)."""
    if not torch.cuda.is_available():
        raise ValueError("host-mapped memory needs a CUDA device; this machine has none")
    device = torch.device(device) if device is not None else (
        t.device if t.device.type == "cuda" else torch.device("cuda", torch.cuda.current_device()))
    host = _host_buffer_like(t, pin=True)
    host.copy_(t.detach())
    if host.numel() == 0:
        return torch.empty_strided(host.shape, host.stride(), dtype=host.dtype, device=device)
    owner = MappedHostBuffer(host)
    raw = torch.as_tensor(owner, device=device)
    if raw.data_ptr() != host.data_ptr():  # torch copied instead of viewing: not zero-copy
        raise RuntimeError("host_mapped_like: torch did not view the pinned host memory in place")
    return raw.view(host.dtype).as_strided(host.shape, host.stride())


def is_host_mapped(t: torch.Tensor) -> bool:
    """Whether a CUDA tensor's bytes are in host memory (cudaPointerGetAttributes type: host)."""
    if not isinstance(t, torch.Tensor) or t.device.type != "cuda" or t.numel() == 0:
        return False
    import ctypes

    try:  # torch's own binding of the runtime: cudaPointerGetAttributes is not exposed, so ask through ctypes
        lib = ctypes.CDLL(_cudart_path())
    except OSError:
        return False

    class Attr(ctypes.Structure):
        _fields_ = [("type", ctypes.c_int), ("device", ctypes.c_int), ("devicePointer", ctypes.c_void_p),
                    ("hostPointer", ctypes.c_void_p), ("reserved", ctypes.c_long * 16)]

    a = Attr()
    if lib.cudaPointerGetAttributes(ctypes.byref(a), ctypes.c_void_p(t.data_ptr())) != 0:
        return False
    return a.type == 1  # cudaMemoryTypeHost


def _cudart_path() -> str:
    """The libcudart this process already loaded (torch's), from /proc/self/maps."""
    with open("/proc/self/maps") as f:
        for line in f:
            if "libcudart" in line:
                return line.split()[-1]
    return "libcudart.so"


# --------------------------------------------------------------------------------------------- placements

@dataclass
class Placement:
    """Where weights go. ``kind``: "host" (pinned host memory mapped into the GPU), "device" (left where they are)
    or "copy" (separate buffers on the tensor's own device: the CPU tests' double of "host"). ``placed_bytes``
    counts what :meth:`place` moved; tensors seen twice (tied weights) are moved once."""

    kind: str = "host"
    device: object = None
    placed_bytes: int = 0
    _memo: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.kind not in PLACEMENTS:
            raise ValueError(f"unknown placement {self.kind!r}; expected one of {', '.join(PLACEMENTS)}")
        if self.kind == "host" and not torch.cuda.is_available():
            raise ValueError("placement 'host' (weights in host memory mapped into the GPU) needs a CUDA device; "
                             "this machine has none")

    @property
    def moves(self) -> bool:
        return self.kind != "device"

    def place(self, t):
        """The placed copy of tensor ``t`` (anything else is returned as is)."""
        if not isinstance(t, torch.Tensor) or not self.moves:
            return t
        flatten = getattr(t, "__tensor_flatten__", None)
        if flatten is not None and type(t) not in (torch.Tensor, torch.nn.Parameter):
            # a tensor subclass (torchao's quantized weights): its inner tensors placed (and shared through the memo),
            # the subclass rebuilt. Not memoized itself: a wrapper subclass has no storage of its own, so its
            # data_ptr() is the same for every weight of one shape.
            names, ctx = flatten()
            inner = {n: self.place(getattr(t, n)) for n in names}
            return type(t).__tensor_unflatten__(inner, ctx, t.size(), t.stride())
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device)
        if t.numel() and key in self._memo:
            return self._memo[key]
        if self.kind == "host":
            out = host_mapped_like(t, self.device)
        else:
            out = _host_buffer_like(t, pin=False).to(t.device) if t.device.type != "cpu" else _host_buffer_like(t, False)
            out.copy_(t.detach())
        self.placed_bytes += t.numel() * t.element_size()
        if t.numel():
            self._memo[key] = out
        return out

    def describe(self) -> str:
        return {"host": "pinned host memory mapped into the GPU (zero-copy: every read crosses PCIe)",
                "device": "device memory", "copy": "separate buffers on the same device (test placement)"}[self.kind]


def get_placement(placement, device=None) -> Placement:
    """A Placement from a Placement or its kind ("host", "device", "copy")."""
    if isinstance(placement, Placement):
        return placement
    return Placement(str(placement), device)


def place_spec(spec, placement):
    """A new DualEncoderSpec whose tensors (packed fp16 GEMM weights, int8 / fp8 weights, scales, norms, embeddings)
    are placed by ``placement``; the given spec is left as is."""
    p = get_placement(placement)
    return spec.map_tensors(p.place)


def place_module_params(module: torch.nn.Module, placement) -> int:
    """Move every parameter and buffer of ``module`` in place (``.data`` swapped: the module's forward, torch.compile
    and CUDA graphs read the placed bytes). Returns the bytes moved."""
    p = get_placement(placement)
    before = p.placed_bytes
    with torch.no_grad():
        for sub in module.modules():
            for name, prm in list(sub._parameters.items()):
                if prm is None:
                    continue
                if type(prm) is torch.nn.Parameter and type(prm.data) is torch.Tensor:
                    prm.data = p.place(prm.data)
                else:  # a tensor-subclass weight (torchao): a new Parameter around the placed subclass
                    sub._parameters[name] = torch.nn.Parameter(p.place(prm), requires_grad=False)
            for name, buf in list(sub._buffers.items()):
                if buf is not None:
                    sub._buffers[name] = p.place(buf)
    return p.placed_bytes - before


def _place_tree(obj, p: Placement):
    """Tensors inside tuples, lists and dataclasses (a folded LayerNorm's column sums) placed; the rest kept."""
    if isinstance(obj, torch.Tensor):
        return p.place(obj)
    if isinstance(obj, tuple):
        return tuple(_place_tree(x, p) for x in obj)
    if isinstance(obj, list):
        return [_place_tree(x, p) for x in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: _place_tree(getattr(obj, f.name), p) for f in dataclasses.fields(obj)
                   if isinstance(getattr(obj, f.name), (torch.Tensor, tuple, list))}
        return dataclasses.replace(obj, **changes) if changes else obj
    return obj


FUSED_WEIGHT_ATTRS = ("frame_patch", "map_query", "map_kv")


def place_fused_executor(ex, placement) -> int:
    """Move a fused executor's weights (``ex.weights`` — packed fp16 or int8 / fp8 GEMM weights, their scales in the
    spec's ``Linear.scale`` —, the folded LayerNorm GEMMs, the frame patch embedding, SigLIP's probe) by
    ``placement``. Call before its first call: runners built earlier keep the old addresses and are dropped. Moving
    turns the GEMMs' tensor-descriptor loads off (``tma=False`` in ``ex.config.gemm``). Returns the bytes moved. A
    fused executor that fell back to a stock one gets that one's parameters moved instead."""
    p = get_placement(placement)
    before = p.placed_bytes
    fallback = getattr(ex, "fallback", None)
    if fallback is not None:
        return place_executor(fallback, p)
    ex.runners.clear()
    ex.weights = place_spec(ex.weights, p)
    ex.folded = {k: _place_tree(v, p) for k, v in ex.folded.items()}
    for name in FUSED_WEIGHT_ATTRS:
        if getattr(ex, name, None) is not None:
            setattr(ex, name, _place_tree(getattr(ex, name), p))
    if p.moves:
        ex.config = ex.config.with_overrides(gemm=dataclasses.replace(ex.config.gemm, **NO_TMA))
        ex.gemm_config = ex.config.gemm.to_dict()
    return p.placed_bytes - before


def place_executor(ex, placement) -> int:
    """Move an executor's weights: the fused executor's own (:func:`place_fused_executor`), or the parameters and
    buffers of the source-model copy a stock executor runs (eager, streams, graph, compile). Before the first call.
    Raises ValueError for an executor whose weights live elsewhere (ONNX Runtime, TensorRT)."""
    if hasattr(ex, "runners") and hasattr(ex, "folded") or getattr(ex, "name", "") == "fused":
        return place_fused_executor(ex, placement)
    model = getattr(ex, "model", None)
    if isinstance(model, torch.nn.Module):
        return place_module_params(model, placement)
    raise ValueError(f"executor {getattr(ex, 'name', type(ex).__name__)!r} keeps its weights outside torch "
                     "(its own runtime's memory): they cannot be placed in host memory")


def place_inputs(inputs, placement):
    """Input sets ``[(pixels, ids), ...]`` with every tensor placed (the stand-in's activations-in-host option)."""
    p = get_placement(placement)
    return [tuple(_place_tree(x, p) for x in pair) for pair in inputs]


# --------------------------------------------------------------------------------------------- bandwidth

@dataclass
class Bandwidth:
    """Stream-read bandwidth of one buffer by one reader (GB/s = 1e9 bytes/s), with the check that the host-mapped
    read gave what the same read of device memory gives."""

    reader: str  # "triton" | "cublas m=N"
    memory: str  # "host" | "device"
    nbytes: int
    median_ms: float
    gbps: float
    identical: bool | None = None  # vs the same op on device memory

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def measure_weight_bandwidth(nbytes: int = 256 * 2 ** 20, *, readers=("triton",), cublas_m=(1, 16, 64),
                             iters: int = 10, device_too: bool = False, device=None,
                             reread=(2, 4)) -> list[Bandwidth]:
    """What this GPU (in the current green context, if any) reads from host-mapped memory: a Triton stream-read
    kernel (kernels.stream_read) and / or cuBLAS (``torch.mm`` of an [M, K] fp16 activation by an [K, N] fp16
    weight whose bytes are host-mapped), over ``nbytes``. Each host-mapped result is compared bit for bit with the
    same op on a device copy; ``device_too`` also times the device copy. Median of ``iters`` after one warm-up.
    Reader ``"reread"``: the stream read with each block read by R programs at once (R in ``reread``; reader name
    ``triton reread xR``), its GB/s counted over the buffer's bytes once: about the plain read's where re-reads of
    a block that run together are served once (L2, merged requests), about 1/R of it where each crosses the link."""
    if not torch.cuda.is_available():
        raise ValueError("measuring host-mapped bandwidth needs a CUDA device; this machine has none")
    from .kernels.stream_read import stream_read

    device = torch.device(device or "cuda")
    g = torch.Generator(device="cpu").manual_seed(0)
    out: list[Bandwidth] = []

    def timed(fn) -> float:
        fn()
        torch.cuda.synchronize(device)
        ms = []
        for _ in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ms.append(a.elapsed_time(b))
        return sorted(ms)[len(ms) // 2]

    # the Triton stream read (readers 1) and the re-read probe (readers R): one buffer, host-mapped and on the device
    counts = ((1,) if "triton" in readers else ()) + (tuple(reread) if "reread" in readers else ())
    if counts:
        words = torch.randint(-2 ** 31, 2 ** 31 - 1, (nbytes // 4,), dtype=torch.int32, generator=g)
        dev = words.to(device)
        host = host_mapped_like(words, device)
        for r in counts:
            name = "triton" if r == 1 else f"triton reread x{r}"
            same = bool(torch.equal(stream_read(dev, readers=r), stream_read(host, readers=r)))
            ms = timed(lambda: stream_read(host, readers=r))
            out.append(Bandwidth(name, "host", nbytes, ms, nbytes / ms / 1e6, same))
            if device_too:
                ms = timed(lambda: stream_read(dev, readers=r))
                out.append(Bandwidth(name, "device", nbytes, ms, nbytes / ms / 1e6, True))
        del dev, host
    if "cublas" in readers:
        k = 4096
        n = nbytes // (2 * k)
        w = (torch.randn(k, n, generator=g) * 0.02).to(torch.float16)
        dev = w.to(device)
        host = host_mapped_like(w, device)
        for m in cublas_m:
            x = torch.randn(m, k, generator=g).to(device=device, dtype=torch.float16)
            same = bool(torch.equal(torch.mm(x, dev), torch.mm(x, host)))
            ms = timed(lambda: torch.mm(x, host))
            out.append(Bandwidth(f"cublas m={m}", "host", k * n * 2, ms, k * n * 2 / ms / 1e6, same))
            if device_too:
                ms = timed(lambda: torch.mm(x, dev))
                out.append(Bandwidth(f"cublas m={m}", "device", k * n * 2, ms, k * n * 2 / ms / 1e6, True))
        del dev, host
    return out

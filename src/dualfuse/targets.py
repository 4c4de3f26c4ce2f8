"""Device targets: the figures a floor needs (bandwidth, tensor peaks) and the limits a kernel config must fit
(SM count, compute capability, shared memory, L2), for the Jetson Orin modules and the data-centre cards the
benchmarks run on. Every number carries its source in :attr:`Target.sources`; numbers NVIDIA does not publish
directly are marked "derived" with the formula.

Orin tensor peaks. NVIDIA publishes Orin's GPU AI performance only as sparse (2:4) INT8 TOPS. The dense INT8
figure here is half of it. The dense fp16 figure is derived from SM count x GPU clock x per-SM rate: an Ampere
(GA10B) SM with 4 third-generation tensor cores does 2048 dense fp16 FLOP/clk (1024 FMA) and 4096 dense INT8
OP/clk -- the A100 per-SM rates, which reproduce NVIDIA's sparse TOPS: Orin Nano 8 SMs x 0.625 GHz x 8192 sparse
OP/clk = 41 TOPS ("40"), Super 8 x 1.02 x 8192 = 67 TOPS ("67"), AGX Orin 16 x 1.3 x 8192 = 170 TOPS ("170").
fp16 with fp32 accumulation is assumed to run at the same rate (as on A100); on GeForce GA10x it runs at half
rate, so if Orin behaves like GA10x the fp16 floors' compute term doubles.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# sources, by document
_CUDA_GUIDE = ("CUDA C++ Programming Guide, 'Technical Specifications per Compute Capability' table "
               "(https://docs.nvidia.com/cuda/cuda-c-programming-guide/#features-and-technical-specifications)")
_NANO_DS = ("NVIDIA Jetson Orin Nano Series data sheet (DS-11105) / Jetson Orin Nano Super Developer Kit data sheet "
            "(https://developer.nvidia.com/embedded/jetson-modules)")
_NX_DS = "NVIDIA Jetson Orin NX Series data sheet (DS-10712) (https://developer.nvidia.com/embedded/jetson-modules)"
_AGX_BRIEF = ("NVIDIA Jetson AGX Orin Series Technical Brief v1.2 (nvidia-jetson-agx-orin-technical-brief.pdf) and "
              "Jetson AGX Orin Series data sheet (DS-10662)")
_H100 = ("NVIDIA H100 Tensor Core GPU data sheet (https://www.nvidia.com/en-us/data-center/h100/), SXM column; "
         "NVIDIA H100 Tensor Core GPU Architecture whitepaper (132 SMs on H100 SXM5, 50 MB L2)")
_H200 = ("NVIDIA H200 Tensor Core GPU data sheet (https://www.nvidia.com/en-us/data-center/h200/), SXM column "
         "(compute figures equal H100 SXM's: same GH100 die, 132 SMs)")

_SM87_SMEM = {
    "smem_per_block": f"{_CUDA_GUIDE}: compute capability 8.7, max shared memory per block 163 KB (opt-in, "
                      f"166912 bytes = cudaDevAttrMaxSharedMemoryPerBlockOptin)",
    "smem_per_sm": f"{_CUDA_GUIDE}: compute capability 8.7, max shared memory per SM 164 KB",
    "capability": f"{_CUDA_GUIDE} / CUDA GPUs list (https://developer.nvidia.com/cuda-gpus): Jetson Orin = 8.7",
}
_SM90_SMEM = {
    "smem_per_block": f"{_CUDA_GUIDE}: compute capability 9.0, max shared memory per block 227 KB (232448 bytes)",
    "smem_per_sm": f"{_CUDA_GUIDE}: compute capability 9.0, max shared memory per SM 228 KB",
    "capability": f"{_CUDA_GUIDE} / CUDA GPUs list (https://developer.nvidia.com/cuda-gpus): H100/H200 = 9.0",
}
# per-SM dense rates of an Ampere SM (4 third-generation tensor cores): A100 whitepaper, 1024 dense fp16 FMA/clk/SM
_PER_SM_FP16 = 2048  # FLOP / clk / SM
_PER_SM_INT8 = 4096  # OP / clk / SM


def _orin_peaks(sms: int, ghz: float, sparse_tops_published: float, doc: str) -> tuple[float, float, dict]:
    fp16 = sms * ghz * 1e9 * _PER_SM_FP16
    int8 = sparse_tops_published * 1e12 / 2
    return fp16, int8, {
        "fp16_dense": (f"derived: {sms} SMs x {ghz} GHz x {_PER_SM_FP16} dense fp16 FLOP/clk/SM (Ampere SM, 4 tensor "
                       f"cores, A100 per-SM rate) = {fp16 / 1e12:.2f} TFLOP/s; SM count and clock from {doc}; "
                       f"assumes fp32 accumulation at full rate"),
        "int8_dense": (f"derived: half of the published {sparse_tops_published:g} sparse (2:4) INT8 TOPS of the GPU "
                       f"({doc}); cross-check {sms} x {ghz} GHz x {_PER_SM_INT8} OP/clk/SM = "
                       f"{sms * ghz * _PER_SM_INT8 / 1e3:.1f} TOPS"),
    }


@dataclass(frozen=True)
class Target:
    """One device. Units: bytes, bytes/s, FLOP/s (OP/s for int8)."""

    name: str
    description: str
    num_sms: int
    capability: tuple[int, int]
    dram_bandwidth: float  # bytes/s
    fp16_dense: float  # FLOP/s, tensor cores, dense
    int8_dense: float  # OP/s, tensor cores, dense
    smem_per_block: int  # bytes, opt-in maximum of one block
    smem_per_sm: int  # bytes
    l2_bytes: int
    memory_bytes: int
    registers_per_thread: int = 255
    threads_per_block: int = 1024
    sources: dict = field(default_factory=dict, compare=False)

    @property
    def arch(self) -> str:
        return f"sm_{self.capability[0]}{self.capability[1]}"

    @property
    def pdl(self) -> bool:
        """Programmatic dependent launch exists (sm_90+)."""
        return self.capability[0] >= 9

    @property
    def tma(self) -> bool:
        """Tensor memory accelerator (tensor descriptors) exists (sm_90+)."""
        return self.capability[0] >= 9

    def props(self, num_sms: int | None = None):
        """The kernels' view of this target (kernels._utils.DeviceProps): what their config heuristics read."""
        from .kernels._utils import DeviceProps

        return DeviceProps(name=self.name, num_sms=num_sms or self.num_sms, capability=self.capability,
                           smem_per_block=self.smem_per_block, l2_bytes=self.l2_bytes)

    def summary(self) -> dict:
        return dict(name=self.name, description=self.description, arch=self.arch, num_sms=self.num_sms,
                    capability=list(self.capability), dram_bandwidth=self.dram_bandwidth, fp16_dense=self.fp16_dense,
                    int8_dense=self.int8_dense, smem_per_block=self.smem_per_block, smem_per_sm=self.smem_per_sm,
                    l2_bytes=self.l2_bytes, memory_bytes=self.memory_bytes,
                    registers_per_thread=self.registers_per_thread, threads_per_block=self.threads_per_block,
                    sources=dict(self.sources))


GB = 10 ** 9
KB, MB, GiB = 1024, 1024 ** 2, 1024 ** 3

_nano16, _nano8, _nano_src = _orin_peaks(8, 0.625, 40, _NANO_DS)
_super16, _super8, _super_src = _orin_peaks(8, 1.02, 67, _NANO_DS + " (MAXN SUPER mode, JetPack 6.2)")
_nx16, _nx8, _nx_src = _orin_peaks(8, 0.918, 2 * 8 * 0.918 * _PER_SM_INT8 / 1e3, _NX_DS)
_nx_src["int8_dense"] = (f"derived: 8 SMs x 0.918 GHz x {_PER_SM_INT8} dense INT8 OP/clk/SM = "
                         f"{_nx8 / 1e12:.1f} TOPS (NVIDIA's 100 sparse TOPS for Orin NX 16GB include the two DLAs; "
                         f"the GPU's share is not stated separately in {_NX_DS})")
_agx16, _agx8, _agx_src = _orin_peaks(16, 1.3, 170, _AGX_BRIEF)

_ORIN_L2_NOTE = ("derived: the Orin GPU has 4 MB of L2 with 2 GPCs / 16 SMs (" + _AGX_BRIEF + "); the 8-SM modules "
                 "(one GPC) are taken as 2 MB, which NVIDIA's data sheets do not state; not used by any floor")

TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("orin-nano", "Jetson Orin Nano 8GB (15 W, GPU 625 MHz)", 8, (8, 7), 68 * GB, _nano16, _nano8,
           166912, 164 * KB, 2 * MB, 8 * GiB, sources={
               "num_sms": f"{_NANO_DS}: 1024 CUDA cores, 32 tensor cores = 8 SMs of 128 cores",
               "dram_bandwidth": f"{_NANO_DS}: 128-bit LPDDR5, 68 GB/s", **_nano_src, **_SM87_SMEM,
               "l2_bytes": _ORIN_L2_NOTE, "memory_bytes": f"{_NANO_DS}: 8 GB LPDDR5"}),
    Target("orin-nano-super", "Jetson Orin Nano 8GB in MAXN SUPER mode (25 W, GPU 1020 MHz)", 8, (8, 7), 102 * GB,
           _super16, _super8, 166912, 164 * KB, 2 * MB, 8 * GiB, sources={
               "num_sms": f"{_NANO_DS}: 1024 CUDA cores, 32 tensor cores = 8 SMs",
               "dram_bandwidth": f"{_NANO_DS}: 102 GB/s in MAXN SUPER mode", **_super_src, **_SM87_SMEM,
               "l2_bytes": _ORIN_L2_NOTE, "memory_bytes": f"{_NANO_DS}: 8 GB LPDDR5"}),
    Target("orin-nx", "Jetson Orin NX 16GB (25 W, GPU 918 MHz)", 8, (8, 7), 102.4 * GB, _nx16, _nx8,
           166912, 164 * KB, 2 * MB, 16 * GiB, sources={
               "num_sms": f"{_NX_DS}: 1024 CUDA cores, 32 tensor cores = 8 SMs",
               "dram_bandwidth": f"{_NX_DS}: 128-bit LPDDR5, 102.4 GB/s", **_nx_src, **_SM87_SMEM,
               "l2_bytes": _ORIN_L2_NOTE, "memory_bytes": f"{_NX_DS}: 16 GB LPDDR5"}),
    Target("agx-orin", "Jetson AGX Orin 64GB (MAXN, GPU 1.3 GHz)", 16, (8, 7), 204.8 * GB, _agx16, _agx8,
           166912, 164 * KB, 4 * MB, 64 * GiB, sources={
               "num_sms": f"{_AGX_BRIEF}: 2 GPCs, 16 SMs, 2048 CUDA cores, 64 tensor cores",
               "dram_bandwidth": f"{_AGX_BRIEF}: 256-bit LPDDR5, 204.8 GB/s", **_agx_src, **_SM87_SMEM,
               "l2_bytes": f"{_AGX_BRIEF}: 4 MB L2", "memory_bytes": f"{_AGX_BRIEF}: 64 GB LPDDR5"}),
    Target("h100", "NVIDIA H100 SXM5 80GB", 132, (9, 0), 3.35e12, 989.4e12, 1978.9e12, 232448, 228 * KB, 50 * MB,
           80 * GiB, sources={
               "num_sms": f"{_H100}: 132 SMs", "dram_bandwidth": f"{_H100}: HBM3, 3.35 TB/s",
               "fp16_dense": f"{_H100}: FP16 Tensor Core 1979 TFLOPS with sparsity; dense = half, 989.4 TFLOPS",
               "int8_dense": f"{_H100}: INT8 Tensor Core 3958 TOPS with sparsity; dense = half, 1979 TOPS",
               **_SM90_SMEM, "l2_bytes": f"{_H100}: 50 MB L2", "memory_bytes": f"{_H100}: 80 GB"}),
    Target("h200", "NVIDIA H200 SXM 141GB", 132, (9, 0), 4.8e12, 989.4e12, 1978.9e12, 232448, 228 * KB, 50 * MB,
           141 * GB, sources={
               "num_sms": f"{_H200}: 132 SMs", "dram_bandwidth": f"{_H200}: HBM3e, 4.8 TB/s",
               "fp16_dense": f"{_H200}: FP16 Tensor Core 1979 TFLOPS with sparsity; dense = half, 989.4 TFLOPS",
               "int8_dense": f"{_H200}: INT8 Tensor Core 3958 TOPS with sparsity; dense = half, 1979 TOPS",
               **_SM90_SMEM, "l2_bytes": f"{_H200}: 50 MB L2 (GH100)", "memory_bytes": f"{_H200}: 141 GB HBM3e"}),
)}
for _t in TARGETS.values():
    _t.sources.setdefault("registers_per_thread", f"{_CUDA_GUIDE}: max 255 32-bit registers per thread")
    _t.sources.setdefault("threads_per_block", f"{_CUDA_GUIDE}: max 1024 threads per block")


def get_target(name: str) -> Target:
    """The target of this name; unknown name -> ValueError listing the known ones."""
    if isinstance(name, Target):
        return name
    t = TARGETS.get(str(name).strip().lower())
    if t is None:
        raise ValueError(f"unknown target {name!r}; expected one of: {', '.join(TARGETS)}")
    return t


def target_for_card(card: str) -> Target | None:
    """The target a card name (torch.cuda.get_device_name, 'NVIDIA H200', 'Orin') denotes, or None."""
    s = (card or "").lower()
    if "h200" in s:
        return TARGETS["h200"]
    if "h100" in s:
        return TARGETS["h100"]
    if "orin" in s:
        if "agx" in s:
            return TARGETS["agx-orin"]
        if "nx" in s:
            return TARGETS["orin-nx"]
        if "nano" in s:
            return TARGETS["orin-nano-super" if "super" in s else "orin-nano"]
    return get_target(s) if s in TARGETS else None

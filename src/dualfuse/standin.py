"""The edge-regime stand-in: a Jetson Orin's weight stream put on a big card.

``--stand-in orin-nano`` (``StandInConfig("orin-nano")``) runs in a CUDA green context of the target's SM count
(dualfuse.green) with every executor's weights in pinned host memory mapped into the GPU (dualfuse.hostmem): the
fused executor's packed fp16 / int8 / fp8 weights and scales, and the parameters of the source-model copy that
eager, graph and compile run. Every weight byte then crosses PCIe, which the GPU reads at about the rate of an Orin's
LPDDR5 (measured at the start of every run: :func:`measure`), so a batch-1 forward becomes bound by weight bytes as on
the device. Optionally the inputs move too (``activations="host"``).

What it is not (:data:`IS_NOT`, printed with every result): PCIe latency is higher than LPDDR5's; activations (and
every intermediate tensor) stay in the card's HBM unless moved; the SM count is limited by a green context, while
clocks, L2 size and shared memory stay those of the big card.

The fused executor runs the target's path (:func:`fused_config`): pointer loads instead of tensor descriptors (no
TMA: host memory, and an Orin has none), launches without PDL (sm_87 has none) and so LayerNorms folded into the
GEMMs they feed, and GEMM configs picked for the byte-bound regime.

Each row's share of the stand-in floor is ``weight bytes / measured bandwidth`` over its median time.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from . import green
from .config import FusedConfig
from .targets import TARGETS, Target, get_target

STAND_INS = ("orin-nano", "orin-nano-super", "orin-nx", "agx-orin")
ACTIVATIONS = ("device", "host")
IS_NOT = ("stand-in, not the device: weights in pinned host memory read over PCIe (every byte crosses the link) in a "
          "green context of the target's SMs; PCIe latency is higher than LPDDR5's, activations stay in HBM unless "
          "moved, and clocks, L2 and shared memory are those of the big card")
FAKE_CARD_ENV = "DUALFUSE_FAKE_CARD"  # tests: "SMS,MAJOR" of a pretend card (no CUDA needed to check SM counts)


class StandInError(ValueError):
    """The stand-in cannot run here (no CUDA, unknown target, an SM count the card cannot give)."""


@dataclass(frozen=True)
class StandInConfig:
    """Which Jetson to stand in for and whether the activations (the inputs) move to host memory too."""

    target: str
    activations: str = "device"
    probe_bytes: int = 256 * 2 ** 20  # the bandwidth probe's buffer

    def __post_init__(self):
        name = str(self.target).strip().lower()
        if name not in STAND_INS:
            known = ", ".join(STAND_INS)
            what = (f"{self.target!r} is not a Jetson target" if name in TARGETS
                    else f"unknown target {self.target!r}")
            raise StandInError(f"--stand-in: {what}; expected one of {known}")
        object.__setattr__(self, "target", name)
        if self.activations not in ACTIVATIONS:
            raise StandInError(f"--stand-in-activations {self.activations!r}: expected one of {', '.join(ACTIVATIONS)}")
        if not isinstance(self.probe_bytes, int) or self.probe_bytes < 2 ** 20:
            raise StandInError(f"stand-in probe_bytes must be an int >= 1 MiB, got {self.probe_bytes!r}")

    @property
    def spec(self) -> Target:
        return get_target(self.target)

    @property
    def sms(self) -> int:
        return self.spec.num_sms

    def to_dict(self) -> dict:
        return dict(target=self.target, activations=self.activations, sms=self.sms,
                    target_bandwidth_gbps=self.spec.dram_bandwidth / 1e9)


def resolve(stand_in) -> StandInConfig | None:
    """A StandInConfig from None, a config, or a target name."""
    if stand_in is None or isinstance(stand_in, StandInConfig):
        return stand_in
    return StandInConfig(str(stand_in))


def card() -> tuple[int, int]:
    """(SM count, compute capability major) of the card here; StandInError without CUDA."""
    fake = os.environ.get(FAKE_CARD_ENV)
    if fake:
        sms, major = (int(x) for x in fake.split(","))
        return sms, major
    import torch

    if not torch.cuda.is_available():
        raise StandInError("--stand-in needs a CUDA GPU (weights in host memory mapped into it, a green context of "
                           "the target's SMs); this machine has none")
    return green.device_sms(torch.cuda.current_device())


def check(cfg: StandInConfig) -> None:
    """That this card can give the target's SM count in a green context (raises StandInError saying why not)."""
    total, major = card()
    try:
        green.check_sms(cfg.sms, total, major)
    except ValueError as e:
        raise StandInError(f"--stand-in {cfg.target} needs a green context of {cfg.sms} SMs, which this card "
                           f"cannot give: {e}") from None


def enter(cfg: StandInConfig) -> dict:
    """Check, then enter the green context of the target's SMs (before anything else touches CUDA)."""
    check(cfg)
    return green.enter(cfg.sms)


@dataclass
class StandInInfo:
    """What a stand-in run measured of itself: the weight bandwidth its rows are judged against."""

    config: StandInConfig
    bandwidth: float  # bytes/s, the Triton stream-read of host-mapped memory (the probe's reading)
    probe: list = field(default_factory=list)  # hostmem.Bandwidth.to_dict() of every reading
    green_context: dict | None = None

    @property
    def gbps(self) -> float:
        return self.bandwidth / 1e9

    def floor_ms(self, weight_bytes: float) -> float:
        return weight_bytes / self.bandwidth * 1e3

    def share(self, weight_bytes: float, median_ms: float) -> float:
        """The share of the stand-in floor a row reached: floor / measured (1.0 = at the floor)."""
        return self.floor_ms(weight_bytes) / median_ms

    def lines(self) -> list[str]:
        c = self.config
        readings = ", ".join(f"{p['reader']} {p['gbps']:.1f}" for p in self.probe if p["memory"] == "host")
        return [f"stand-in for {c.spec.description}: {c.sms} SMs, weights host-mapped; measured weight bandwidth "
                f"{self.gbps:.1f} GB/s here ({readings}) vs the target's {c.spec.dram_bandwidth / 1e9:.0f} GB/s; "
                f"activations in {'host memory (inputs)' if c.activations == 'host' else 'HBM'}",
                IS_NOT]

    def to_dict(self) -> dict:
        return dict(self.config.to_dict(), measured_bandwidth_gbps=self.gbps, probe=list(self.probe),
                    green_context=self.green_context, is_not=IS_NOT)


def measure(cfg: StandInConfig, green_context: dict | None = None, cublas: bool = False) -> StandInInfo:
    """Measure this process's host-mapped read bandwidth (Triton stream read; cuBLAS too if asked)."""
    from .hostmem import measure_weight_bandwidth

    readers = ("triton", "cublas") if cublas else ("triton",)
    probe = measure_weight_bandwidth(cfg.probe_bytes, readers=readers, cublas_m=(1,))
    bad = [p for p in probe if p.identical is False]
    if bad:
        raise RuntimeError(f"stand-in probe: a read of host-mapped memory differed from the same read of device "
                           f"memory ({bad[0].reader}); host-mapped weights are not usable on this machine")
    triton_read = next(p for p in probe if p.reader == "triton")
    return StandInInfo(cfg, triton_read.gbps * 1e9, [p.to_dict() for p in probe], green_context)


def placeable(cls) -> bool:
    """Whether an executor class keeps its weights in torch tensors the stand-in can move to host memory: the fused
    executor and the executors that run a copy of the source model (eager, streams, graph, compile)."""
    from .executors.base import SourceExecutor

    return issubclass(cls, SourceExecutor) or getattr(cls, "name", "") == "fused"


def gemm_overrides(cfg: StandInConfig, info: StandInInfo | None = None) -> dict:
    """The stand-in's GEMM config (dualfuse.config.GemmConfig fields): pointer loads (host memory is not read
    through tensor descriptors), the target's SM count, and configs picked by the byte-bound model at the measured
    bandwidth (kernels/gemm/regime.py)."""
    from .hostmem import NO_TMA
    from .kernels.gemm.regime import regime_for_target

    reg = regime_for_target(cfg.target, bandwidth=info.bandwidth if info else None)
    return {**NO_TMA, "regime": reg, "num_sms": cfg.sms}


def launch_overrides(cfg: StandInConfig) -> dict:
    """FusedConfig fields the target's launches lack: PDL on a target without it (every Jetson Orin: sm_87). The
    fused executor then folds LayerNorms into the GEMMs they feed, its default where launches run without PDL, so
    the stand-in runs the target's own path."""
    return {} if cfg.spec.pdl else {"pdl": False}


def fused_config(cfg: StandInConfig, info: StandInInfo | None = None,
                 base: FusedConfig | None = None) -> FusedConfig:
    """``base`` (default FusedConfig()) run as on the target: the stand-in's GEMM overrides (:func:`gemm_overrides`)
    over its own, and no PDL where the target has none (:func:`launch_overrides`)."""
    base = base or FusedConfig()
    return base.with_overrides(gemm=dataclasses.replace(base.gemm, **gemm_overrides(cfg, info)),
                               **launch_overrides(cfg))


def executor_kwargs(name: str, cfg: StandInConfig, info: StandInInfo | None = None,
                    config: FusedConfig | None = None) -> dict:
    """Extra build options of executor ``name`` in the stand-in: for the fused executor its config (``config``,
    default FusedConfig()) with the stand-in's GEMM overrides (:func:`fused_config`); nothing for the others."""
    if name != "fused":
        return {}
    return {"config": fused_config(cfg, info, config)}


def row_weight_bytes(model_or_spec, name: str, weights: str | None, dtype, towers) -> int:
    """The weight bytes a row streams per call (dualfuse.quantize.weight_bytes): the fused executor's format for
    ``fused``, the model dtype for the stock rows."""
    from .quantize import weight_bytes

    fmt = weights if name == "fused" and weights not in (None, "fp16") else "fp16"
    return int(weight_bytes(model_or_spec, fmt, dtype, towers)["total"])

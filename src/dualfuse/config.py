"""Typed options of the fused executor: :class:`FusedConfig` (and its :class:`GemmConfig`), validated once.

    from dualfuse import FusedConfig, GemmConfig, fuse
    fused = fuse(model, config=FusedConfig(weights="int8", gemm=GemmConfig(tma=False)))
    fused = fuse(model, weights="int8")              # the same: keywords override the config's fields

``FusedConfig.with_overrides(**kw)`` applies keyword overrides with :func:`dataclasses.replace` (validated the same
way); ``gemm_config={...}`` is the older spelling of ``gemm=GemmConfig(...)``. ``to_dict()`` is what the JSON
results record, ``describe()`` the one-line form of the fields that differ from the defaults (command headers).

A new option is one field here (with its check in ``__post_init__`` where it needs one).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import torch

from .calibration import Calibration

if TYPE_CHECKING:
    from .kernels.gemm.regime import Regime

WEIGHT_FORMATS = ("fp16", "int8", "fp8")  # "fp16": the executor's dtype (fp16 / bf16 / fp32), unquantized
SCALE_DTYPE = torch.float32  # the per-channel scales of quantized weights (dualfuse.quantize, Linear.scale)
SCALE_BYTES = torch.finfo(SCALE_DTYPE).bits // 8
_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
GEMM_IMPLS = ("auto", "triton", "library")  # FusedConfig.gemm_impl


@dataclass(frozen=True)
class GemmConfig:
    """Overrides of the grouped GEMM's heuristic launch config (``kernels.gemm.GroupedLinear(config=...)``), for
    every GEMM launch of the fused executor. ``None``: the heuristic's choice."""

    BLOCK_M: int | None = None
    BLOCK_N: int | None = None
    BLOCK_K: int | None = None
    GROUP_M: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    num_sms: int | None = None  # SMs the split-K heuristic aims to fill (e.g. a green context's count)
    programs_per_sm: int | None = None  # split-K aims for num_sms * this many programs
    min_k_iters: int | None = None  # a split gets at least this many BLOCK_K iterations
    input_precision: str | None = None  # tl.dot input_precision for fp32 inputs ("ieee" default, "tf32", "tf32x3")
    max_split: int | None = None  # split-K: at most this many splits per problem
    early_epilogue: bool | None = None  # load bias/residual before the K loop (default: small tiles, few M tiles)
    # L2 prefetch of each program's first n BLOCK_K steps of weights: False (0) or n; default 2 for skinny M, off
    # for many rows
    prefetch: bool | int | None = None
    pdl: bool | None = None  # programmatic dependent launch (default True; used where supported: sm_90+)
    tma: bool | None = None  # x / w tiles by tensor descriptors (default: kernels.gemm.heuristics)
    # int8 weights with fp16 activations: "bits" (default; integer ops and an fp16 subtract) or "convert" (the
    # int-to-float conversion instruction)
    widen: str | None = None
    # "latency" (the full card's model), "byte-bound" or a kernels.gemm.regime.Regime: weights stream over a slow
    # link (Jetson LPDDR5, the stand-in's PCIe) and the byte-bound model (kernels/gemm/regime.py) picks the config
    regime: str | Regime | None = None

    def __post_init__(self):
        for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
            v = getattr(self, k)
            if v is not None and (not isinstance(v, int) or v < 16 or v & (v - 1)):
                raise ValueError(f"config {k} must be a power of two >= 16, got {v!r}")
        v = self.prefetch
        if v is not None and v is not False and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ValueError(f"config prefetch must be False or an int >= 0 (BLOCK_K steps), got {v!r}")
        if self.widen is not None and self.widen not in ("bits", "convert"):
            raise ValueError(f"config widen must be 'bits' or 'convert', got {self.widen!r}")
        if self.regime is not None:
            # imported here: kernels.gemm's package imports its heuristics, which import this module
            from .kernels.gemm.regime import as_regime

            as_regime(self.regime)  # ValueError naming the accepted values

    @classmethod
    def keys(cls) -> set[str]:
        """The option names (``GroupedLinear(config=...)``'s dict keys)."""
        return {f.name for f in fields(cls)}

    @classmethod
    def from_dict(cls, d: dict | None) -> "GemmConfig":
        """A dict of config keys (the older ``gemm_config=``) -> GemmConfig; ValueError naming the known keys."""
        if d is None:
            return cls()
        if not isinstance(d, dict) or not set(d) <= cls.keys():
            raise ValueError(f"gemm_config must be a dict of GroupedLinear config keys ({sorted(cls.keys())}), "
                             f"got {d!r}")
        return cls(**d)

    def to_dict(self) -> dict:
        """The overridden keys only (``GroupedLinear(config=...)``)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def weight_format(weights) -> str:
    """The weight format of ``weights=`` (None -> "fp16"); ValueError for an unknown value."""
    if weights is None:
        return "fp16"
    if not isinstance(weights, str) or weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be None or one of {list(WEIGHT_FORMATS)} (fp16: unquantized, the executor's "
                         f"dtype; int8 / fp8: weight-only, one scale per output channel), got {weights!r}")
    return weights


def _bool(name: str, v, none_ok: bool = False) -> None:
    if not isinstance(v, bool) and not (none_ok and v is None):
        raise ValueError(f"{name} must be {'None (auto), ' if none_ok else ''}True or False, got {v!r}")


def _text_buckets(buckets):
    """'auto', None (off: also False and an empty sequence) or a tuple of positive int text lengths."""
    if buckets is None or buckets is False:
        return None
    if isinstance(buckets, str):
        if buckets == "auto":
            return buckets
        raise ValueError(f"text_buckets must be 'auto', None or a sequence of text lengths, got {buckets!r}")
    try:
        values = tuple(buckets)
    except TypeError:
        raise ValueError(f"text_buckets must be 'auto', None or a sequence of text lengths, got {buckets!r}") \
            from None
    if not values:
        return None
    if not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in values):
        raise ValueError(f"text_buckets: expected positive int text lengths, got {buckets!r}")
    return values


def _warmup_shapes(shapes):
    """None or a tuple of shape tuples (one shape given as a tuple of ints is a list of one)."""
    if shapes is None:
        return None
    if isinstance(shapes, tuple) and shapes and isinstance(shapes[0], int):
        shapes = [shapes]
    try:
        return tuple(tuple(s) for s in shapes)
    except TypeError:
        raise ValueError(f"warmup: expected a list of (images, texts, text_len) shapes, got {shapes!r}") from None


def _hidden_states(v):
    """None or a tuple of int hidden-state indices (one int is a tuple of one); checked against the tower's layer
    count by the executor (FusedExecutor.hidden_index)."""
    if v is None:
        return None
    if isinstance(v, int) and not isinstance(v, bool):
        return (v,)
    try:
        values = tuple(v)
    except TypeError:
        values = None
    if isinstance(v, str) or values is None or not all(isinstance(i, int) and not isinstance(i, bool)
                                                       for i in values):
        raise ValueError(f"hidden_states: expected a tuple of layer indices (e.g. (-2,)), got {v!r}")
    return values


def _per_channel(v):
    """image mean / std: None, one number, or a tuple of numbers (a tensor becomes a tuple); checked against the
    channel count by the executor (adapters.image_normalization)."""
    if isinstance(v, torch.Tensor):
        return tuple(v.detach().cpu().reshape(-1).tolist())
    if isinstance(v, list):
        return tuple(v)
    return v


@dataclass(frozen=True)
class FusedConfig:
    """The fused executor's options (``FusedExecutor(model, config=...)``, ``dualfuse.fuse(model, config=...)``)."""

    max_graphs: int = 8  # runners (call shapes) kept, each with its buffers and CUDA graph
    use_graph: bool = True  # capture each runner's launches into one CUDA graph (CUDA only)
    fallback: bool = True  # a model the kernels don't cover runs on a stock executor (False: ValueError)
    fold_ln: bool | None = None  # LayerNorms folded into the GEMMs they feed; None: auto (FusedExecutor)
    pdl: bool = True  # programmatic dependent launch where the card supports it (sm_90+)
    residual_dtype: torch.dtype | None = None  # residual stream dtype; None: fp32 for bf16 models, else the dtype
    defer_split_reduce: bool = True  # a split-K out-proj / FC2 leaves its partial sums to the next LayerNorm
    text_buckets: str | tuple[int, ...] | None = "auto"  # text lengths padded up to these where that is exact
    warmup: tuple | None = None  # call shapes whose runners are built at construction (FusedExecutor.warmup)
    image_mean: float | tuple[float, ...] | None = None  # uint8 frames: per-channel mean (None: the family's)
    image_std: float | tuple[float, ...] | None = None  # uint8 frames: per-channel std (None: the family's)
    weights: str = "fp16"  # "fp16" (the dtype, unquantized), "int8" or "fp8" (weight-only: dualfuse.quantize)
    gemm: GemmConfig = field(default_factory=GemmConfig)  # grouped GEMM launch config overrides
    # per stage and tower, the grouped Triton launch or a library kernel (cuBLAS GEMM / SDPA,
    # executors/fused/library.py): "auto" (the calibrated cost model, dualfuse.calibration; no calibration for the
    # card: all Triton), "triton" (always Triton) or "library" (the library wherever a step allows it)
    gemm_impl: str = "auto"
    # gemm_impl="auto" only: a dualfuse.calibration.Calibration, a path to its JSON, or None (the card's cache
    # file); the executor loads it
    calibration: str | Calibration | None = None
    # single-tower models only (FusedTower, docs/towers.md): the hidden states callers read, as transformers counts
    # them (0: the embeddings, i: block i-1's output, negative from the end; e.g. (-2,) for LLaVA-1.5): only those
    # are written and the blocks after the last one never run. None: any. One int is a tuple of one.
    hidden_states: tuple[int, ...] | None = None
    # single-tower models only: whether the pooled output is computed (None: unless hidden_states is given)
    pooled: bool | None = None

    def __post_init__(self):
        set_ = object.__setattr__.__get__(self)  # frozen: normalized values set once, here
        mg = self.max_graphs
        if isinstance(mg, bool) or not isinstance(mg, int) or mg < 1:
            raise ValueError(f"max_graphs must be >= 1, got {mg}")
        _bool("use_graph", self.use_graph)
        _bool("fallback", self.fallback)
        _bool("fold_ln", self.fold_ln, none_ok=True)
        _bool("pdl", self.pdl)
        _bool("defer_split_reduce", self.defer_split_reduce)
        if self.residual_dtype is not None and self.residual_dtype not in _DTYPES:
            raise ValueError(f"residual_dtype must be torch.float16, torch.bfloat16 or torch.float32, got "
                             f"{self.residual_dtype!r}")
        set_("text_buckets", _text_buckets(self.text_buckets))
        set_("warmup", _warmup_shapes(self.warmup))
        set_("image_mean", _per_channel(self.image_mean))
        set_("image_std", _per_channel(self.image_std))
        set_("weights", weight_format(self.weights))
        if isinstance(self.gemm, dict) or self.gemm is None:
            set_("gemm", GemmConfig.from_dict(self.gemm))
        elif not isinstance(self.gemm, GemmConfig):
            raise ValueError(f"gemm must be a GemmConfig (or a dict of its keys), got {self.gemm!r}")
        if self.gemm_impl not in GEMM_IMPLS:
            raise ValueError(f"gemm_impl must be 'auto', 'triton' or 'library', got {self.gemm_impl!r}")
        cal = self.calibration
        if isinstance(cal, os.PathLike):
            set_("calibration", cal := os.fspath(cal))
        if not (cal is None or isinstance(cal, (str, Calibration))):
            raise ValueError(f"calibration must be None, a path or a dualfuse.calibration.Calibration, got "
                             f"{type(cal).__name__}")
        if cal is not None and self.gemm_impl != "auto":
            raise ValueError(f"calibration is read only with gemm_impl='auto' (got gemm_impl={self.gemm_impl!r})")
        set_("hidden_states", _hidden_states(self.hidden_states))
        if not (self.pooled is None or isinstance(self.pooled, bool)):
            raise ValueError(f"pooled must be None (auto), True or False, got {self.pooled!r}")

    @classmethod
    def names(cls) -> set[str]:
        """The option names (``fuse()`` / ``FusedExecutor()`` keywords), with the older ``gemm_config``."""
        return {f.name for f in fields(cls)} | {"gemm_config"}

    def with_overrides(self, **overrides) -> "FusedConfig":
        """This config with keyword overrides applied (``dataclasses.replace``, validated again); ``gemm_config``
        (a dict) is the older spelling of ``gemm``. TypeError for an unknown name."""
        if "gemm_config" in overrides:
            if "gemm" in overrides:
                raise ValueError("give gemm or gemm_config, not both")
            overrides["gemm"] = GemmConfig.from_dict(overrides.pop("gemm_config"))
        unknown = set(overrides) - self.names()
        if unknown:
            raise TypeError(f"unknown fused executor option(s) {sorted(unknown)}; known: {sorted(self.names())}")
        return dataclasses.replace(self, **overrides) if overrides else self

    def to_dict(self) -> dict:
        """Every field, JSON-ready (dtypes by name, the GEMM config as its overridden keys)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, GemmConfig):
                v = v.to_dict()
                if dataclasses.is_dataclass(v.get("regime")):  # a kernels.gemm.regime.Regime
                    v["regime"] = dataclasses.asdict(v["regime"])
            elif isinstance(v, Calibration):  # given as an object: its file, if it has one
                v = v.path or "in memory"
            elif isinstance(v, torch.dtype):
                v = _DTYPES[v]
            elif isinstance(v, tuple):
                v = [list(s) if isinstance(s, tuple) else s for s in v]
            out[f.name] = v
        return out

    def describe(self) -> str:
        """One line: the fields that differ from the defaults (``"defaults"`` when none do)."""
        base, mine = FusedConfig().to_dict(), self.to_dict()
        parts = []
        for k, v in mine.items():
            if v == base[k]:
                continue
            if isinstance(v, dict):
                v = "{" + ", ".join(f"{a}={b}" for a, b in v.items()) + "}"
            parts.append(f"{k}={v}")
        return " ".join(parts) if parts else "defaults"


def config_of(executor) -> FusedConfig | None:
    """The :class:`FusedConfig` an executor runs with (None for executors without one: the stock ones)."""
    cfg = getattr(executor, "config", None)
    return cfg if isinstance(cfg, FusedConfig) else None


__all__ = ["FusedConfig", "GemmConfig", "GEMM_IMPLS", "WEIGHT_FORMATS", "config_of", "weight_format"]

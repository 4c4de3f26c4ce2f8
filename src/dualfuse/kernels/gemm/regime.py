"""The byte-bound regime: GEMM configs where every weight byte crosses a slow link.

On a Jetson Orin (LPDDR5, 68-205 GB/s) and in the stand-in (weights in host memory read over PCIe, ~50 GB/s) a
batch-1 grouped GEMM is bound by its weight bytes: the launch takes ``weight bytes / bandwidth`` once enough bytes
are in flight to cover the link's latency (Little's law: ``bytes in flight >= bandwidth x latency``). What a config
must do there differs from the full card's latency-bound picks (heuristics._estimate_us): many bytes in flight per
SM (deep pipelines, wide weight tiles), split-K so that every SM streams, and nothing else matters much.

Cost model, one launch (µs)::

    resident   = min(programs, sms x ctas_per_sm)                    programs streaming at once
    in_flight  = resident x (num_stages - 1) x BLOCK_K x BLOCK_N x w_elt   weight bytes requested, not yet arrived
    rate       = min(bandwidth, in_flight / latency)                  bytes/s the link delivers
    t          = T_LAUNCH + max(weight bytes / rate, FLOPs / (sms x SM_FLOP)) + split tail

where the weight bytes count once per M tile, and a last wave of fewer than ``resident`` programs streams at its
own, lower rate.

The regime comes from the target (:func:`regime_for_target`): byte-bound for the Jetson modules (their DRAM
bandwidth), latency-bound (the unchanged full-card model) for data-centre cards; the stand-in passes its own measured
bandwidth. Tuned picks measured in the stand-in (benchmarks/standin.py --tune) override the model per GEMM shape
(:func:`tuned_config`, from ``standin_gemm.json`` beside this file).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import triton

REGIMES = ("latency", "byte-bound")
T_LAUNCH_US = 3.0  # launch + first-byte latency of a program (µs)
T_SPLIT_US, T_SPLIT_EACH_US = 2.5, 0.5  # split-K tail: partial store, arrival atomic, partial loads (µs)
SM_FLOP_PER_US = 3e6  # dense fp16 tensor FLOP per µs per SM at batch 1 (heuristics' figure)
STANDIN_LATENCY_US = 2.0  # a load's round trip over PCIe to pinned host memory (µs; order of magnitude)
LPDDR5_LATENCY_US = 0.6  # a load's round trip to Orin's LPDDR5 (µs; order of magnitude)
TABLE_PATH = os.path.join(os.path.dirname(__file__), "standin_gemm.json")


@dataclass(frozen=True)
class Regime:
    """How a device feeds its GEMMs: ``name`` "latency" (the full card: the heuristics' skinny model) or
    "byte-bound" (``bandwidth`` bytes/s at ``latency_us`` per load)."""

    name: str = "byte-bound"
    bandwidth: float = 50e9
    latency_us: float = STANDIN_LATENCY_US

    def __post_init__(self):
        if self.name not in REGIMES:
            raise ValueError(f"unknown regime {self.name!r}; expected one of {', '.join(REGIMES)}")
        if not self.bandwidth > 0 or not self.latency_us > 0:
            raise ValueError(f"regime: bandwidth and latency must be > 0, got {self.bandwidth}, {self.latency_us}")

    @property
    def byte_bound(self) -> bool:
        return self.name == "byte-bound"

    @property
    def bytes_in_flight(self) -> float:
        """Bytes that must be requested and not yet arrived to keep the link busy (Little's law)."""
        return self.bandwidth * self.latency_us * 1e-6


BYTE_BOUND_BANDWIDTH = 500e9  # below this DRAM bandwidth (bytes/s) a target's batch-1 GEMMs are byte-bound


def regime_for_target(target, bandwidth: float | None = None, latency_us: float | None = None) -> Regime:
    """The regime of a dualfuse.targets.Target (or name): byte-bound at its DRAM bandwidth (or ``bandwidth``, e.g.
    the stand-in's measured one) where that is below BYTE_BOUND_BANDWIDTH, else latency-bound."""
    from ...targets import get_target

    t = get_target(target)
    bw = bandwidth or t.dram_bandwidth
    if bw >= BYTE_BOUND_BANDWIDTH:
        return Regime("latency", bw, latency_us or 0.5)
    return Regime("byte-bound", bw, latency_us or (LPDDR5_LATENCY_US if bandwidth is None else STANDIN_LATENCY_US))


def as_regime(value) -> Regime | None:
    """A Regime from a config value: a Regime, "byte-bound" (the stand-in's defaults), "latency" or None."""
    if value is None or isinstance(value, Regime):
        return value
    if value in REGIMES:
        return Regime(value)
    raise ValueError(f"config regime must be a Regime, {' or '.join(map(repr, REGIMES))}, got {value!r}")


# (BLOCK_N, BLOCK_K, warps, stages): wide weight tiles and deep pipelines put many bytes in flight per program
BYTE_BOUND_TILES = ((64, 128, 4, 4), (64, 128, 4, 6), (128, 64, 4, 5), (128, 128, 8, 4), (32, 256, 4, 4),
                    (64, 256, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3))
# (programs_per_sm, min_k_iters, max_split): split-K to one, two or four programs per SM
BYTE_BOUND_SPLITS = ((0, 1, 1), (1, 2, 16), (2, 2, 32), (4, 1, 64))


# (BLOCK_N, BLOCK_K, warps, stages) of tall tiles (BLOCK_M 128 or 256) for more than 64 rows: a weight byte crosses
# the link once per M tile, so 64-row tiles read SigLIP B/16's 196 patches' weights 4 times, a 256-row tile once
TALL_TILES = ((64, 64, 8, 3), (32, 128, 8, 3), (64, 32, 8, 4), (32, 64, 8, 4))  # 8 warps: 256 x 64 fp32 accumulators
TALL_MAX_M = 256  # taller tiles no longer fit Orin's 163 KB of shared memory per block with a useful pipeline


def byte_bound_candidates(max_m: int, sms: int) -> list[dict]:
    """Configs the byte-bound model ranks: BLOCK_M the rows rounded up to a power of two, 16..64, with every tile of
    BYTE_BOUND_TILES; above 64 rows also tall tiles (TALL_TILES) of the rows rounded up, at most TALL_MAX_M. The
    model weighs the weight bytes the 64-row tiles read again against the tall tiles' fewer bytes in flight."""
    rows = 1 << max(0, (int(max_m) - 1).bit_length())
    bm = max(16, min(64, rows))
    tiles = [(bm, *t) for t in BYTE_BOUND_TILES]
    if rows > 64:
        tiles += [(min(rows, TALL_MAX_M), *t) for t in TALL_TILES]
    out = []
    for bm, bn, bk, warps, stages in tiles:
        for pps, mki, cap in BYTE_BOUND_SPLITS:
            out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages,
                            programs_per_sm=pps, min_k_iters=mki, max_split=cap, num_sms=sms, prefetch=0,
                            tma=False))
    return out


def estimate_byte_bound_us(dims, cfg: dict, splits, w_elt: int, sms: int, ctas: int, regime: Regime) -> float:
    """Modelled µs of one launch in the byte-bound regime (module docstring). dims: [(M, N, K)] per problem,
    splits: K splits per problem, ctas: programs one SM holds at once (shared memory, registers)."""
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    programs, weight_bytes, flops, max_s = 0, 0, 0, 1
    for (m, n, k), s in zip(dims, splits):
        iters = max(1, triton.cdiv(k, bk))
        ips = triton.cdiv(iters, max(1, s))
        s_eff = triton.cdiv(iters, ips)
        max_s = max(max_s, s_eff)
        programs += triton.cdiv(m, bm) * triton.cdiv(n, bn) * s_eff
        weight_bytes += triton.cdiv(m, bm) * n * k * w_elt  # every M tile re-reads its weights
        flops += 2 * triton.cdiv(m, bm) * bm * n * k
    resident = min(programs, sms * max(1, ctas))
    per_program_in_flight = max(1, cfg["num_stages"] - 1) * bk * bn * w_elt

    def rate(n):  # bytes/s the link delivers while n programs stream
        return min(regime.bandwidth, n * per_program_in_flight / (regime.latency_us * 1e-6))

    # full waves of `resident` programs, then a tail wave of the rest with fewer bytes in flight (programs taken as
    # equal in bytes: the launch's mean)
    waves, tail = divmod(programs, resident)
    per_program = weight_bytes / programs
    stream_s = waves * resident * per_program / rate(resident) + (tail * per_program / rate(tail) if tail else 0.0)
    t = T_LAUNCH_US + max(stream_s * 1e6, flops / (sms * SM_FLOP_PER_US))
    if max_s > 1:
        t += T_SPLIT_US + T_SPLIT_EACH_US * (max_s - 1)
    return t


# ---- tuned picks (benchmarks/standin.py --tune writes the table)

def shape_key(dims, w_elt: int, sms: int) -> str:
    """The table key of one launch: SM count, weight bytes per element, then M x N x K of every problem."""
    return f"{sms}|w{w_elt}|" + ",".join(f"{m}x{n}x{k}" for m, n, k in dims)


_TABLE: dict | None = None


def load_table(path: str | None = None) -> dict:
    """The tuned table ({shape_key: config}); {} when there is none. Cached for the default path."""
    global _TABLE
    if path is None and _TABLE is not None:
        return _TABLE
    p = path or TABLE_PATH
    table = {}
    if os.path.isfile(p):
        with open(p) as f:
            doc = json.load(f)
        table = dict(doc.get("configs", {}))
    if path is None:
        _TABLE = table
    return table


def tuned_config(dims, w_elt: int, sms: int, table: dict | None = None) -> dict | None:
    """The measured best config for this launch shape in the byte-bound regime, or None."""
    table = load_table() if table is None else table
    cfg = table.get(shape_key(dims, w_elt, sms))
    return dict(cfg) if cfg else None

"""Measured shares of bandwidth per step kind: what `plan --target` predictions use instead of an assumed 100%.

The edge-regime stand-in (dualfuse.standin; benchmarks/standin.py) times the fused executor's launches one stage at a
time with its weights host-mapped, and divides each stage's bytes (the plan's cost model: weights + activations) at
the stand-in's measured bandwidth by its measured time. Summed per step kind — ``gemm`` (block GEMMs), ``attention``,
``layernorm``, ``embed`` (patch / token embedding), ``head`` (projections, SigLIP's pooling head, pooled-row pick) —
that gives the share of the bandwidth each kind reaches. ``standin_shares.json`` beside this module holds the latest
measurement (card, date, commit, SM count, bandwidth); :func:`predict` turns shares into a latency on a target:
``(sum over kinds of bytes / (target bandwidth x share) + launches x launch gap) x scale``, where the scale is the
stand-in's whole fused forwards measured against the same formula at its own bandwidth (stages timed one by one
lose the overlap a graph has, so the shares alone overestimate). Still a prediction: the stand-in's
activations stay in HBM (attention's and LayerNorm's shares are optimistic) and its link is PCIe, not LPDDR5.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

KINDS = ("gemm", "attention", "layernorm", "embed", "head")
DEFAULT_PATH = os.path.join(os.path.dirname(__file__), "standin_shares.json")
HEAD_OPS = ("proj", "pool_index")


def stage_kind(stage) -> str:
    """The share kind of a plan stage (see the module docstring)."""
    ops = [s.op for s in stage.steps]
    if stage.kind == "embed":
        return "embed"
    if stage.kind == "pool_index" or all(op in HEAD_OPS or op.startswith("map") or op == "final_ln_map_kv"
                                         for op in ops):
        return "head"
    if stage.kind == "linear":
        return "gemm"
    if stage.kind == "layernorm":
        return "layernorm"
    if stage.kind == "attention":
        return "attention"
    return "head"


@dataclass
class BandwidthShares:
    """Share of bandwidth reached per step kind (0 < share <= 1; absent kinds: 1.0) and where it was measured."""

    shares: dict
    source: dict = field(default_factory=dict)  # card, date, commit, sms, bandwidth_gbps, model(s), weights
    # whole forward measured / the shares' prediction of it on the stand-in (:func:`forward_scale`): the stages are
    # timed one by one, without the graph's overlap, so the shares alone overestimate a forward. 1.0: not measured.
    scale: float = 1.0

    def __post_init__(self):
        bad = {k: v for k, v in self.shares.items() if k not in KINDS or not isinstance(v, (int, float)) or v <= 0}
        if bad:
            raise ValueError(f"bandwidth shares: expected kinds from {KINDS} with shares > 0, got {bad}")
        if not isinstance(self.scale, (int, float)) or not 0 < self.scale <= 10:
            raise ValueError(f"bandwidth shares: expected a forward scale in (0, 10], got {self.scale!r}")

    def share(self, kind: str) -> float:
        return min(1.0, float(self.shares.get(kind, 1.0)))

    def to_dict(self) -> dict:
        return dict(schema="dualfuse.bandwidth-shares/1", shares=dict(self.shares), scale=self.scale,
                    source=dict(self.source))

    @classmethod
    def from_dict(cls, d: dict) -> "BandwidthShares":
        if not isinstance(d, dict) or "shares" not in d:
            raise ValueError("bandwidth shares file: expected a JSON object with 'shares' (dualfuse.bandwidth-shares/1)")
        return cls(dict(d["shares"]), dict(d.get("source", {})), d.get("scale", 1.0))


def load(path: str | None = None) -> BandwidthShares | None:
    """The shares in ``path`` (default the package's standin_shares.json); None where the default is absent."""
    p = path or DEFAULT_PATH
    if not os.path.isfile(p):
        if path is not None:
            raise ValueError(f"{path}: no such bandwidth-shares file")
        return None
    with open(p) as f:
        return BandwidthShares.from_dict(json.load(f))


def stage_bytes(spec, stage, weights: str = "fp16", elt: int = 2) -> float:
    """A plan stage's bytes (plan cost model: weights + activations); int8 / fp8 weights: the GEMM weights at 1 byte
    each (their per-channel scales, < 1% of the bytes, not counted)."""
    from .floors import step_weight_elems

    total = 0.0
    for s in stage.steps:
        b = s.bytes
        if weights != "fp16" and s.kind == "linear":
            b -= step_weight_elems(getattr(spec, s.tower), s) * (elt - 1)
        total += b
    return total


def kind_bytes(spec, image_batch: int, text_batch: int, text_len: int | None = None, *, weights: str = "fp16",
               fold_ln: bool = True, elt: int = 2) -> tuple[dict, int]:
    """Bytes per call by share kind (:func:`stage_bytes`) and the launch count."""
    from .plan import make_plan

    plan = make_plan(spec, image_batch, text_batch, text_len, elt=elt, fold_ln=fold_ln)
    out = {k: 0.0 for k in KINDS}
    for stage in plan.stages:
        out[stage_kind(stage)] += stage_bytes(spec, stage, weights, elt)
    return out, plan.num_launches


def kind_ms(by_kind: dict, bandwidth: float, shares: BandwidthShares) -> dict:
    """Per kind ``bytes / (bandwidth x share)`` in ms (bandwidth in bytes/s), before the scale."""
    return {k: b / (bandwidth * shares.share(k)) * 1e3 for k, b in by_kind.items() if b}


def predicted_ms(by_kind: dict, launches: int, bandwidth: float, shares: BandwidthShares, gap_us: float) -> float:
    """``sum_kind bytes / (bandwidth x share) + launches x gap`` in ms (bandwidth in bytes/s), before the scale."""
    return sum(kind_ms(by_kind, bandwidth, shares).values()) + launches * gap_us / 1e3


def forward_scale(forwards: list[dict], bandwidth: float, shares: BandwidthShares,
                  gap_us: float | None = None) -> float:
    """Median over measured forwards of measured ms / :func:`predicted_ms` at the stand-in's own ``bandwidth``.
    ``forwards``: dicts with ``ms`` (the fused forward's median), ``bytes_by_kind`` and ``launches``
    (:func:`kind_bytes` of that call shape)."""
    from .floors import LAUNCH_GAP_US
    from .timing import percentile

    if not forwards:
        raise ValueError("forward_scale: expected at least one measured forward")
    gap = LAUNCH_GAP_US if gap_us is None else gap_us
    return percentile([f["ms"] / predicted_ms(f["bytes_by_kind"], f["launches"], bandwidth, shares, gap)
                       for f in forwards], 50)


def predict(spec, target, image_batch: int = 1, text_batch: int = 1, text_len: int | None = None, *,
            shares: BandwidthShares, weights: str = "fp16", launch_gap_us: float | None = None) -> dict:
    """A prediction, not a measurement: ``(sum_kind bytes / (bandwidth x share) + launches x gap) x scale`` on
    ``target`` (scale: :attr:`BandwidthShares.scale`, whole forwards measured against this formula)."""
    from .floors import LAUNCH_GAP_US, default_fold_ln
    from .targets import get_target

    t = get_target(target)
    gap = LAUNCH_GAP_US if launch_gap_us is None else launch_gap_us
    by_kind, launches = kind_bytes(spec, image_batch, text_batch, text_len, weights=weights,
                                   fold_ln=default_fold_ln(t))
    ms = {k: v * shares.scale for k, v in kind_ms(by_kind, t.dram_bandwidth, shares).items()}
    total = predicted_ms(by_kind, launches, t.dram_bandwidth, shares, gap) * shares.scale
    return dict(target=t.name, weights=weights, predicted_ms=total, ms_by_kind=ms, launches=launches,
                shares={k: shares.share(k) for k in KINDS}, scale=shares.scale, source=dict(shares.source),
                note="prediction from stand-in shares of bandwidth, not a measurement")


def measure_stage_shares(runner, bandwidth: float, iters: int = 50, weights: str = "fp16") -> dict:
    """Per share kind: (bytes, measured ms, share) of a fused Runner's launches timed one stage at a time with CUDA
    events between them (no graph), median over ``iters`` forwards. ``bandwidth``: the stand-in's measured bytes/s.
    CUDA only; the runner's buffers hold garbage afterwards (rerun the executor to get outputs again)."""
    import torch

    stages = runner.plan.stages
    kinds = [stage_kind(s) for s in stages]
    times = [[] for _ in stages]
    for _ in range(iters + 2):
        evs = [torch.cuda.Event(enable_timing=True) for _ in range(len(stages) + 1)]
        evs[0].record()
        for i, op in enumerate(runner.ops):
            op()
            evs[i + 1].record()
        evs[-1].synchronize()
        for i in range(len(stages)):
            times[i].append(evs[i].elapsed_time(evs[i + 1]))
    med = [sorted(t[2:])[len(t[2:]) // 2] for t in times]
    out = {}
    spec = runner.ex.spec
    for k in KINDS:
        b = sum(stage_bytes(spec, s, weights) for s, kk in zip(stages, kinds) if kk == k)
        ms = sum(m for m, kk in zip(med, kinds) if kk == k)
        if ms > 0:
            out[k] = dict(bytes=b, ms=ms, share=b / bandwidth * 1e3 / ms)
    return out

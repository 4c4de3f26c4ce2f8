"""Device floors: the least time one call of a model can take on a target, from its bytes and FLOPs.

``floor = max(bytes / DRAM bandwidth, FLOPs / dense tensor peak)`` per call, for fp16 weights and int8 weights:

- **weight bytes**: every tensor of the towers the call runs, read once per call (weights do not stay in an
  Orin's 2-4 MB L2 between calls). fp16: 2 bytes per element. int8: every Linear weight of both towers -- the
  QKV, out, FC1 and FC2 of every block, the projections, and SigLIP's attention-pooling head (its key/value
  rows, out, FC1, FC2; its query rows act on the constant probe and are applied once when the model is
  prepared) -- is 1 byte per element plus one scale per output channel (``scale_bytes``: by default the fused
  executor's, fp32, ``dualfuse.quantize.SCALE_BYTES``).
  Stay fp16 in both: Linear biases, LayerNorm weights and biases, the patch embedding (a convolution in the
  source model), position and class embeddings, the probe's projected query, and the token-embedding table, of
  which only the rows the call gathers are counted (``min(texts x tokens, vocabulary)`` rows).
- **activation bytes**: an estimate from the plan's cost model (dualfuse.plan): each launch's inputs read plus
  outputs written, without its weights -- activations stay fp16 with int8 weights.
- **FLOPs**: the plan's (GEMMs, attention, LayerNorms, embeddings). The compute term divides them by the dense
  fp16 tensor peak for both precisions: int8 weights are dequantized to fp16 in the GEMM (weight-only
  quantization); ``int8_peak_ms`` says what the dense INT8 peak would allow if activations were int8 too.
- **launches**: the plan's stages, with LayerNorm folding as the fused executor's default picks it on the
  target (folded where there is no PDL: sm_8x).

The floor ignores launch gaps, which at batch 1 on an Orin are a large share (~4 µs a launch on an H200).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .config import SCALE_BYTES
from .plan import Step, make_plan
from .spec import DualEncoderSpec, PatchEmbed, TowerSpec
from .targets import Target, get_target, target_for_card

PRECISIONS = ("fp16", "int8")

# What one dependent launch adds beyond its work: a kernel boundary inside a CUDA graph without PDL (as on sm_8x),
# 1.19 µs on an H200 (benchmarks/sync_cost.py, 112 programs, 2026-11-26; BENCHMARKS.md "Call overhead"). Not
# measured on an Orin: the prediction below carries this card's figure.
LAUNCH_GAP_US = 1.19


@dataclass(frozen=True)
class PrecisionFloor:
    weights: str  # "fp16" | "int8"
    weight_bytes: float
    activation_bytes: float
    flops: float
    memory_ms: float  # (weight + activation bytes) / bandwidth
    compute_ms: float  # FLOPs / dense fp16 tensor peak
    int8_peak_ms: float  # FLOPs / dense INT8 tensor peak (a bound for int8 activations, not used by the floor)
    floor_ms: float
    bound: str  # "memory" | "compute": which term binds

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.activation_bytes


@dataclass
class Floor:
    model: str
    target: Target
    image_batch: int
    text_batch: int
    text_len: int
    fold_ln: bool
    launches: int
    precisions: list[PrecisionFloor]
    weight_breakdown: dict = field(default_factory=dict)  # fp16 elements by group
    notes: list[str] = field(default_factory=list)

    def get(self, weights: str) -> PrecisionFloor:
        for p in self.precisions:
            if p.weights == weights:
                return p
        raise ValueError(f"no floor for weights {weights!r}; expected one of {[p.weights for p in self.precisions]}")

    def predicted_ms(self, weights: str = "fp16", launch_gap_us: float = LAUNCH_GAP_US) -> float:
        """A prediction, not a measurement: the floor plus one launch gap per launch. It assumes every kernel
        streams its bytes at the full DRAM bandwidth (so it is optimistic) and the H200's launch gap."""
        return self.get(weights).floor_ms + self.launches * launch_gap_us / 1e3

    def to_dict(self) -> dict:
        return dict(schema="dualfuse.floor/1", model=self.model, target=self.target.summary(),
                    image_batch=self.image_batch, text_batch=self.text_batch, text_len=self.text_len,
                    fold_ln=self.fold_ln, launches=self.launches, launch_gap_us=LAUNCH_GAP_US,
                    precisions=[dict(asdict(p), bytes=p.bytes, predicted_ms=self.predicted_ms(p.weights))
                                for p in self.precisions],
                    weight_breakdown=dict(self.weight_breakdown), notes=list(self.notes))


# ------------------------------------------------------------------------------------------ weight counts


def _linears(t: TowerSpec) -> list[tuple[int, int, bool]]:
    """(out, in, has bias) of every Linear a call of this tower runs."""
    out = []
    for b in t.blocks:
        for lin in (b.qkv, b.out, b.fc1, b.fc2):
            out.append((lin.out_features, lin.in_features, lin.bias is not None))
    h = t.pool_head
    if h is not None:
        d = t.width
        out.append((2 * d, d, h.qkv.bias is not None))  # key/value rows; the query rows act on the probe once
        for lin in (h.out, h.fc1, h.fc2):
            out.append((lin.out_features, lin.in_features, lin.bias is not None))
    if t.projection is not None:
        out.append((t.projection.out_features, t.projection.in_features, t.projection.bias is not None))
    return out


def tower_weights(t: TowerSpec, batch: int, seq: int) -> dict:
    """Elements read per call, by group: ``linear`` (weights of Linears), ``linear_out_channels`` (their output
    channels: one int8 scale each), ``linear_bias``, ``norm`` (LayerNorm weights + biases), ``embed`` (patch
    weights and bias, class and position embeddings, the gathered token rows, the pooling probe's query)."""
    lins = _linears(t)
    d = t.width
    g = dict(linear=sum(n * k for n, k, _ in lins), linear_out_channels=sum(n for n, _, _ in lins),
             linear_bias=sum(n for n, _, b in lins if b))
    lns = 2 * len(t.blocks) + 1 + (t.pre_ln is not None) + (t.pool_head is not None)
    g["norm"] = 2 * d * lns
    if isinstance(t.embed, PatchEmbed):
        e = t.embed
        g["embed"] = d * e.patch_dim + (d if e.bias is not None else 0) + t.seq_len * d \
            + (d if t.class_embedding is not None else 0) + (d if t.pool_head is not None else 0)
    else:
        g["embed"] = min(batch * seq, t.embed.vocab_size) * d + seq * d
    return g


def weight_bytes_of(groups: dict, weights: str = "fp16", elt: int = 2, scale_bytes: int | None = None) -> dict:
    """Bytes of the element groups of :func:`tower_weights` for ``weights`` "fp16" (every element ``elt`` bytes:
    the model dtype) or "int8" / "fp8" (the Linear weights 1 byte each plus ``scale_bytes`` per output channel,
    default the executor's scale dtype, dualfuse.quantize.SCALE_BYTES; the rest ``elt`` bytes): ``linear``,
    ``scales``, ``other`` (biases, LayerNorms, embeddings) and ``total``. dualfuse.quantize.weight_bytes counts
    with it too."""
    if scale_bytes is None:
        scale_bytes = SCALE_BYTES
    quant = weights != "fp16"
    lin = groups["linear"] * (1 if quant else elt)
    scales = groups["linear_out_channels"] * scale_bytes if quant else 0
    other = (groups["linear_bias"] + groups["norm"] + groups["embed"]) * elt
    return dict(linear=lin, scales=scales, other=other, total=lin + scales + other)


def _step_weight_elems(t: TowerSpec, step: Step) -> int:
    """The weight elements the plan's cost model counts in a step's bytes (removed to leave activations)."""
    d, op = t.width, step.op
    if step.kind == "linear":
        blk, h = (t.blocks[step.layer] if step.layer is not None else None), t.pool_head
        if op in ("map_kv", "final_ln_map_kv"):
            return 2 * d * d
        lin = {"qkv": lambda: blk.qkv, "ln1_qkv": lambda: blk.qkv, "out": lambda: blk.out,
               "fc1": lambda: blk.fc1, "ln2_fc1": lambda: blk.fc1, "fc2": lambda: blk.fc2,
               "map_out": lambda: h.out, "map_fc1": lambda: h.fc1, "map_ln_fc1": lambda: h.fc1,
               "map_fc2": lambda: h.fc2, "proj": lambda: t.projection}[op]()
        return lin.out_features * lin.in_features
    if step.kind == "layernorm":
        return 2 * d
    if op == "patch_embed":
        return d * t.embed.patch_dim + t.seq_len * d
    return 0  # attention, pool_index: no weights


def _activation_bytes(t: TowerSpec, steps: list[Step], batch: int, seq: int, elt: int) -> float:
    total = 0.0
    rows = batch * seq
    for s in steps:
        if s.op == "token_embed":  # plan: elt * (gathered rows + written rows + position rows)
            total += elt * rows * t.width
            continue
        total += s.bytes - elt * _step_weight_elems(t, s)
    return total


# ------------------------------------------------------------------------------------------------ floors


def default_fold_ln(target: Target) -> bool:
    """The fused executor's automatic fold_ln on a target (fp16): folded where launches run without PDL."""
    return not target.pdl


def floors(spec: DualEncoderSpec, target: str | Target, image_batch: int = 1, text_batch: int = 1,
           text_len: int | None = None, *, fold_ln: bool | None = None, scale_bytes: int | None = None,
           model: str | None = None) -> Floor:
    """Floors of one call shape on a target, for fp16 and int8 weights (see the module docstring). scale_bytes:
    bytes per int8 scale, default the fused executor's (fp32: 4, dualfuse.quantize.SCALE_BYTES)."""
    target = get_target(target)
    if scale_bytes is None:
        scale_bytes = SCALE_BYTES
    if scale_bytes not in (2, 4):
        raise ValueError(f"scale_bytes must be 2 (fp16 scales) or 4 (fp32), got {scale_bytes!r}")
    fold_ln = default_fold_ln(target) if fold_ln is None else fold_ln
    plan = make_plan(spec, image_batch, text_batch, text_len, elt=2, fold_ln=fold_ln)
    text_len = plan.text_len
    parts = []
    if image_batch:
        parts.append((spec.vision, image_batch, spec.vision.seq_len, plan.steps("vision")))
    if text_batch:
        parts.append((spec.text, text_batch, text_len, plan.steps("text")))
    groups: dict[str, int] = {}
    act = flops = 0.0
    for t, batch, seq, steps in parts:
        for k, v in tower_weights(t, batch, seq).items():
            groups[k] = groups.get(k, 0) + v
        act += _activation_bytes(t, steps, batch, seq, 2)
        flops += sum(s.flops for s in steps)
    wbytes = {w: weight_bytes_of(groups, w, 2, scale_bytes)["total"] for w in PRECISIONS}
    rows = []
    for w in PRECISIONS:
        mem = (wbytes[w] + act) / target.dram_bandwidth * 1e3
        comp = flops / target.fp16_dense * 1e3
        rows.append(PrecisionFloor(w, wbytes[w], act, flops, mem, comp, flops / target.int8_dense * 1e3,
                                   max(mem, comp), "memory" if mem >= comp else "compute"))
    notes = [
        "weights read once per call; int8 = every Linear weight (blocks, projections, SigLIP head) at 1 byte + "
        f"one {'fp16' if scale_bytes == 2 else 'fp32'} scale per output channel; biases, LayerNorms, patch "
        "embedding, position/class embeddings stay fp16; token-embedding rows counted only where gathered",
        "activation bytes: each launch's inputs read + outputs written (plan cost model), an estimate",
        "compute term: FLOPs / dense fp16 tensor peak for both precisions (int8 weights are dequantized to fp16)",
        "launch gaps are not in the floor",
    ]
    return Floor(model or spec.name, target, image_batch, text_batch, text_len, fold_ln, plan.num_launches, rows,
                 groups, notes)


def floor_share(floor_ms: float, measured_ms: float) -> float:
    """The share of the floor a measured latency reached: floor / measured (1.0 = at the floor)."""
    if not (measured_ms and measured_ms > 0) or floor_ms < 0:
        raise ValueError(f"floor_share: expected a positive measured latency and a floor >= 0, got measured "
                         f"{measured_ms!r}, floor {floor_ms!r}")
    return floor_ms / measured_ms


def card_floor(spec: DualEncoderSpec, card: str, image_batch: int, text_batch: int, text_len: int | None = None,
               weights: str = "fp16") -> tuple[Target, PrecisionFloor] | None:
    """(target, floor at that precision) of one call shape on the card a device name denotes (H100, H200, an Orin:
    dualfuse.targets.target_for_card); None when the card is not a known target."""
    target = target_for_card(card)
    if target is None:
        return None
    return target, floors(spec, target, image_batch, text_batch, text_len).get(weights)


def share_line(spec: DualEncoderSpec, card: str, measured_ms: float, image_batch: int, text_batch: int,
               text_len: int | None = None, weights: str = "fp16") -> str | None:
    """"this run reached X% of the <card> floor" for a measured call on a known card (H100, H200, an Orin);
    None when the card is not in dualfuse.targets."""
    found = card_floor(spec, card, image_batch, text_batch, text_len, weights)
    if found is None or not measured_ms or measured_ms <= 0:
        return None
    target, f = found
    return (f"this run reached {100 * floor_share(f.floor_ms, measured_ms):.1f}% of the {target.name} floor "
            f"({f.floor_ms:.3f} ms, {f.bound}-bound, {weights} weights)")


def profile_floor(p: dict, spec: DualEncoderSpec | None = None) -> dict | None:
    """The floor entry of a profile result dict (dualfuse.profile: ``model``, ``card``, ``image_batch``,
    ``text_batch``, ``text_len``, ``latency.median_ms``): ``{"target", "floor_ms", "bound", "share", "line"}``, or
    None when the card is not a known target or there is no latency. ``spec``: the model's (default: the preset
    named ``p["model"]``, built on the meta device)."""
    target = target_for_card(p.get("card") or "")
    ms = (p.get("latency") or {}).get("median_ms")
    if target is None or not ms:
        return None
    if spec is None:
        from .adapters import to_spec
        from .presets import PRESETS, build_hf

        if p.get("model") not in PRESETS:
            return None
        spec = to_spec(build_hf(p["model"], meta=True))
    f = floors(spec, target, p.get("image_batch") or 0, p.get("text_batch") or 0, p.get("text_len")).get("fp16")
    share = floor_share(f.floor_ms, ms)
    return dict(target=target.name, floor_ms=f.floor_ms, bound=f.bound, share=share,
                line=f"this run reached {100 * share:.1f}% of the {target.name} floor ({f.floor_ms:.3f} ms, "
                     f"{f.bound}-bound, fp16 weights)")


# ------------------------------------------------------------------------------------------------ printing


def format_bytes(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.2f} kB"


def step_weight_elems(t: TowerSpec, step: Step) -> int:
    """The weight elements in a plan step's bytes (the plan cost model's count; 0 for attention and pooling)."""
    return _step_weight_elems(t, step)

"""Weight-only quantization for the fused executor: ``dualfuse.fuse(model, weights="int8")``.

Every linear layer of both towers (QKV, out-proj, FC1, FC2, the projections, SigLIP's attention-pooling head) keeps
its weight on the device as int8 (or fp8 e4m3 on compute capability >= 8.9) with one scale per output channel:

    scale[n] = max_k |W[n, k]| / QMAX        (QMAX = 127 for int8, 448 for e4m3)
    q[n, k]  = round(W[n, k] / scale[n])     (int8: clamped to [-127, 127]; e4m3: round to nearest e4m3)

computed in fp32 from the source weights (after a LayerNorm is folded in: W' = W * gamma, then quantized). The
grouped GEMM (kernels.gemm, ``LinearProblem.weight_scale``) widens the 1-byte tiles to the activation dtype in
registers, accumulates in fp32 and multiplies by the scale before bias / activation / residual. Activations stay
fp16 / bf16. Kept in the model dtype: the patch embedding (its own kernel; ~1.6% of ViT-B/32's weight bytes),
token and position embeddings, LayerNorms, biases.

Parity criteria for quantized weights (tests/test_quantize.py, ``dualfuse eval --weights int8``), against the fp32
reference: min per-embedding cosine >= ``COSINE_MIN`` and relative error <= ``REL_ERR_MAX``, and no decisive
zero-shot flip (the argmax may change only where the reference's top-2 margin is within the error).

``weight_bytes(...)``: the weight bytes one call reads, fp16 vs int8 (int8 bytes + scale bytes), counted as
the device floors count them (dualfuse.floors.tower_weights / weight_bytes_of). Scales are ``SCALE_DTYPE``
(fp32): ``SCALE_BYTES`` each, the figure the floors use too.
"""
from __future__ import annotations

import dataclasses

import torch

from .kernels.gemm.problems import FP8_E4M3, fp8_unsupported_reason

WEIGHT_FORMATS = ("fp16", "int8", "fp8")  # "fp16": the executor's dtype (fp16 / bf16 / fp32), unquantized
QMAX = {"int8": 127.0, "fp8": 448.0}
COSINE_MIN = 0.995  # per-embedding cosine vs the fp32 reference, quantized weights
REL_ERR_MAX = 0.1  # ||out - ref|| / ||ref|| over all embeddings, quantized weights
SCALE_DTYPE = torch.float32  # the per-channel scales the fused executor stores (QuantizedWeights)
SCALE_BYTES = torch.finfo(SCALE_DTYPE).bits // 8


def resolve_weights(weights, device=None) -> str:
    """The weight format of ``weights=`` (None -> "fp16"); ValueError for an unknown value, or for "fp8" where
    the device has no fp8 (compute capability < 8.9, the CPU interpreter)."""
    if weights is None:
        return "fp16"
    if not isinstance(weights, str) or weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be None or one of {list(WEIGHT_FORMATS)} (fp16: unquantized, the executor's "
                         f"dtype; int8 / fp8: weight-only, one scale per output channel), got {weights!r}")
    if weights == "fp8" and device is not None:
        why = fp8_unsupported_reason(device)
        if why is not None:
            raise ValueError(f"weights='fp8': {why}")
    return weights


def quantize_weight(weight: torch.Tensor, fmt: str = "int8", scale_dtype: torch.dtype = SCALE_DTYPE):
    """``(q [N, K] int8 / float8_e4m3fn, scale [N] scale_dtype)`` with ``weight ~= q * scale[:, None]``, symmetric,
    per output channel, computed in fp32 (q from the stored scale, so dequantizing gives exactly what the kernel
    multiplies). An all-zero row gets scale 1 (q = 0)."""
    if fmt not in QMAX:
        raise ValueError(f"quantize_weight: fmt must be 'int8' or 'fp8', got {fmt!r}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"quantize_weight: weight must be a 2-D floating-point [N, K] tensor, got "
                         f"{getattr(weight, 'shape', type(weight).__name__)} {getattr(weight, 'dtype', '')}")
    if scale_dtype not in (torch.float32, torch.float16):
        raise ValueError(f"quantize_weight: scale_dtype must be torch.float32 or torch.float16, got {scale_dtype}")
    if fmt == "fp8" and FP8_E4M3 is None:
        raise ValueError("quantize_weight: this torch has no torch.float8_e4m3fn")
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / QMAX[fmt], torch.ones_like(amax))
    scale = scale.clamp_min(torch.finfo(scale_dtype).tiny).to(scale_dtype)
    v = w / scale.float()[:, None]
    if fmt == "int8":
        q = v.round().clamp_(-127, 127).to(torch.int8)
    else:
        q = v.clamp_(-448.0, 448.0).to(FP8_E4M3)
    return q.contiguous(), scale.contiguous()


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 ``q * scale[:, None]``: the weight the kernel multiplies."""
    return q.float() * scale.float()[:, None]


class QuantizedWeights:
    """The quantized weights of a fused executor: each weight tensor the runners pass to the GEMM (by address) ->
    its per-channel scale. Built by :func:`quantize_executor`; ``attach`` gives a LinearProblem its scale."""

    def __init__(self, fmt: str, scale_dtype: torch.dtype = SCALE_DTYPE):
        self.fmt, self.scale_dtype = fmt, scale_dtype
        self.scales: dict[tuple, torch.Tensor] = {}

    @staticmethod
    def _key(w: torch.Tensor) -> tuple:
        return (w.data_ptr(), tuple(w.shape), w.dtype)

    def quantize(self, weight: torch.Tensor, device) -> torch.Tensor:
        q, s = quantize_weight(weight.to(device), self.fmt, self.scale_dtype)
        self.register(q, s)
        return q

    def register(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        self.scales[self._key(q)] = scale

    def attach(self, problem):
        """The LinearProblem with its weight's scale (a 16-bit weight: as it is)."""
        w = getattr(problem, "weight", None)  # the runners pass every step's problem (LayerNorm, attention, ...)
        if not isinstance(w, torch.Tensor) or w.dtype not in (torch.int8, FP8_E4M3) or problem.weight_scale is not None:
            return problem
        scale = self.scales.get(self._key(problem.weight))
        if scale is None:  # every quantized weight is registered when it is made
            raise AssertionError(f"quantized weight {tuple(problem.weight.shape)} has no registered scale")
        return dataclasses.replace(problem, weight_scale=scale)


def _linears(tower):
    """(owner, attribute) of every linear layer of a tower the fused GEMMs run."""
    for blk in tower.blocks:
        for name in ("qkv", "out", "fc1", "fc2"):
            yield blk, name
    if tower.projection is not None:
        yield tower, "projection"
    if tower.pool_head is not None:
        for name in ("qkv", "out", "fc1", "fc2"):
            yield tower.pool_head, name


def to_device_but_gemm_weights(spec, device, dtype):
    """``spec.to(device, dtype)`` except the GEMM weights, which stay the source's tensors (quantize_executor
    replaces them with their quantized copies): no transient 16-bit copy of them on the device."""
    keep = {id(getattr(o, a).weight) for name in spec.towers for o, a in _linears(getattr(spec, name))}

    def move(t: torch.Tensor) -> torch.Tensor:
        if id(t) in keep:
            return t
        t = t.detach()
        if t.is_floating_point():
            t = t.to(dtype)
        return t.to(device).contiguous()

    return spec.map_tensors(move)


def quantize_executor(ex) -> QuantizedWeights:
    """Quantize a fused executor's linear weights in place (``ex.weights``, ``ex.folded``, SigLIP's ``map_kv``):
    each from the fp32 source (``ex.spec``; folded ones from their fp32 fold), the 16-bit device copy dropped.
    The folded LayerNorms' column sums become those of the dequantized weights (what the GEMM multiplies)."""
    qw = QuantizedWeights(ex.weight_format)
    dev = ex.device
    for name in ex.spec.towers:
        src, dst = getattr(ex.spec, name), getattr(ex.weights, name)
        for (s_owner, attr), (d_owner, _) in zip(_linears(src), _linears(dst)):
            d_lin = getattr(d_owner, attr)
            if d_lin is None:  # replaced by a folded copy (fold_ln)
                continue
            s_lin = getattr(s_owner, attr)
            setattr(d_owner, attr, dataclasses.replace(d_lin, weight=qw.quantize(s_lin.weight, dev)))
        head = dst.pool_head
        if head is not None and getattr(ex, "map_kv_weight", None) is not None:
            # the probe's K/V projection: rows d: of the packed head QKV (per-row scales slice with them)
            d = dst.width
            q = head.qkv.weight[d:]
            scale = qw.scales[qw._key(head.qkv.weight)][d:]
            qw.register(q, scale)
            ex.map_kv_weight = q
    for key, (w, b, norm) in list(ex.folded.items()):
        q = qw.quantize(w, dev)
        colsum = dequantize_weight(q, qw.scales[qw._key(q)]).sum(dim=1).contiguous()
        ex.folded[key] = (q, None if b is None else b.to(ex.dtype), dataclasses.replace(norm, colsum=colsum))
    return qw


# ---- bytes ----------------------------------------------------------------------------------------------------
def weight_bytes(model, weights: str | None = None, dtype: torch.dtype | None = None,
                 towers=("vision", "text")) -> dict:
    """The weight bytes one call reads (per tower and total), for a fused executor (its own format and dtype) or a
    DualEncoderSpec (``weights`` and ``dtype``: default "fp16" and torch.float16).

    ``linear``: the GEMM weights (int8 / fp8: 1 byte per element), ``scales``: their per-channel scales
    (``SCALE_BYTES`` each), ``other``: what stays in the model dtype and is read whole every call (biases,
    LayerNorms, the patch embedding, position and class embeddings, SigLIP's probe). SigLIP's pooling head counts
    its key/value rows only: the query rows act on the constant probe, projected once when the executor is built.
    Not counted: the token embedding table (a call gathers only its own rows) and activations. Both towers, or
    those in ``towers`` (("vision",) for an image-only call). The element counts are dualfuse.floors' (the
    device floors' weight bytes are these, plus the token rows a call gathers)."""
    from .floors import tower_weights, weight_bytes_of

    spec = getattr(model, "spec", model)
    if weights is None:
        weights = getattr(model, "weight_format", "fp16")
    resolve_weights(weights)
    if dtype is None:
        dtype = getattr(model, "dtype", None) if not hasattr(model, "vision") else None
        dtype = dtype or torch.float16
    elt = torch.finfo(dtype).bits // 8
    out = {}
    for name in towers:
        t = getattr(spec, name)
        groups = tower_weights(t, 0, t.seq_len)  # batch 0: no gathered token rows; the whole position table
        out[name] = weight_bytes_of(groups, weights, elt, SCALE_BYTES)
    out["total"] = sum(out[n]["total"] for n in towers)
    out["weights"], out["dtype"] = weights, str(dtype).replace("torch.", "")
    return out


def dequantized_spec(spec, fmt: str = "int8"):
    """A copy of ``spec`` whose GEMM weights are quantized and dequantized again (fp32): the reference forward of it
    (dualfuse.reference) isolates what the weight rounding alone costs, and is what the fused executor computes
    with ``weights=fmt`` and unfolded LayerNorms, up to fp16 / bf16 rounding. SigLIP's head QKV keeps its query
    rows (the executor projects the probe once, from the unquantized weights)."""
    def deq(w):
        return dequantize_weight(*quantize_weight(w, fmt)).to(w.dtype)

    out = spec.map_tensors(lambda t: t)  # new dataclasses, tensors shared
    for name in out.towers:
        tower = getattr(out, name)
        for owner, attr in _linears(tower):
            lin = getattr(owner, attr)
            w = deq(lin.weight)
            if owner is tower.pool_head and attr == "qkv":
                d = tower.width
                w = torch.cat([lin.weight[:d], w[d:]])
            setattr(owner, attr, dataclasses.replace(lin, weight=w))
    return out

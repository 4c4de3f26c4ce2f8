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

from .config import SCALE_BYTES, SCALE_DTYPE, weight_format
from .floors import tower_weights, weight_bytes_of
from .kernels.gemm.problems import FP8_E4M3, fp8_unsupported_reason
from .spec import Linear, gemm_linears

QMAX = {"int8": 127.0, "fp8": 448.0}
COSINE_MIN = 0.995  # per-embedding cosine vs the fp32 reference, quantized weights
REL_ERR_MAX = 0.1  # ||out - ref|| / ||ref|| over all embeddings, quantized weights


def resolve_weights(weights, device=None) -> str:
    """The weight format of ``weights=`` (None -> "fp16"); ValueError for an unknown value, or for "fp8" where
    the device has no fp8 (compute capability < 8.9, the CPU interpreter)."""
    weights = weight_format(weights)
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


def quantize_linear(linear: Linear, fmt: str = "int8", device=None, scale_dtype: torch.dtype = SCALE_DTYPE) -> Linear:
    """A new Linear: ``linear``'s weight quantized per output channel (on ``device``), its scale in
    ``Linear.scale``, the bias as it is."""
    q, scale = quantize_weight(linear.weight.to(device), fmt, scale_dtype)
    return Linear(q, linear.bias, scale)


def quantize_spec(spec, fmt: str = "int8", device=None):
    """A new spec whose GEMM linear layers (spec.gemm_linears; a None one, replaced by a folded copy in an
    executor's weights, stays None) carry int8 / fp8 weights on ``device`` with their per-channel scales
    (``Linear.scale``); the rest shared with ``spec``."""
    out = spec.map_tensors(lambda t: t)  # new dataclasses, tensors shared
    for name in out.towers:  # a single tower's spec has the other one None
        for owner, attr in gemm_linears(getattr(out, name)):
            lin = getattr(owner, attr)
            if lin is not None:
                setattr(owner, attr, quantize_linear(lin, fmt, device))
    return out


def quantize_folded(folded: dict, fmt: str, device, dtype: torch.dtype) -> dict:
    """The fused executor's folded LN -> GEMM layers (``{key: (Linear, FoldedLayerNorm)}``, folded in fp32) as a
    new dict of quantized ones: biases in ``dtype``, the LayerNorms' column sums those of the dequantized weights
    (what the GEMM multiplies)."""
    out = {}
    for key, (lin, norm) in folded.items():
        q = quantize_linear(lin, fmt, device)
        colsum = dequantize_weight(q.weight, q.scale).sum(dim=1).contiguous()
        out[key] = (Linear(q.weight, None if lin.bias is None else lin.bias.to(dtype), q.scale),
                    dataclasses.replace(norm, colsum=colsum))
    return out


def to_device_but_gemm_weights(spec, device, dtype):
    """``spec.to(device, dtype)`` except the GEMM weights, which stay the source's tensors (quantize_spec then
    makes their quantized copies): no transient 16-bit copy of them on the device."""
    keep = {id(getattr(o, a).weight) for name in spec.towers for o, a in gemm_linears(getattr(spec, name))}

    def move(t: torch.Tensor) -> torch.Tensor:
        if id(t) in keep:
            return t
        t = t.detach()
        if t.is_floating_point():
            t = t.to(dtype)
        return t.to(device).contiguous()

    return spec.map_tensors(move)


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
    spec = getattr(model, "spec", model)
    if weights is None:
        weights = getattr(model, "weight_format", "fp16")
    resolve_weights(weights)
    if dtype is None:
        dtype = getattr(model, "dtype", None) if not hasattr(model, "vision") else None
        dtype = dtype or torch.float16
    elt = torch.finfo(dtype).bits // 8
    towers = tuple(n for n in towers if getattr(spec, n) is not None)  # a single tower: the other is None
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
        for owner, attr in gemm_linears(tower):
            lin = getattr(owner, attr)
            w = deq(lin.weight)
            if owner is tower.pool_head and attr == "qkv":
                d = tower.width
                w = torch.cat([lin.weight[:d], w[d:]])
            setattr(owner, attr, dataclasses.replace(lin, weight=w))
    return out

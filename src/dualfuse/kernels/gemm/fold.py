"""`fold_layernorm`: a LayerNorm folded into the linear layer after it (vertical fusion, no LN launch)."""
from __future__ import annotations

import torch

from .problems import FoldedLayerNorm, shape_or_type


def fold_layernorm(weight: torch.Tensor, bias: torch.Tensor | None, ln_weight: torch.Tensor,
                   ln_bias: torch.Tensor | None, eps: float, dtype: torch.dtype | None = None):
    """Fold ``LayerNorm(x; ln_weight, ln_bias, eps)`` into the linear layer after it.

    ``LN(x) @ W.T + b = rstd * (x @ W'.T - mean * colsum(W')) + b'`` with ``W' = W * ln_weight`` (per input
    column) and ``b' = W @ ln_bias + b``; the GEMM accumulates each row's mean and rstd from the x tiles it
    loads anyway and applies them in the epilogue. Computed in fp32, stored in ``dtype`` (default: weight's);
    colsum sums the stored W', so the mean term cancels what the GEMM really multiplies.
    Returns ``(folded_weight [N, K], folded_bias [N], FoldedLayerNorm)`` for a :class:`LinearProblem`."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"fold_layernorm: weight must be a 2-D [N, K] tensor, got {shape_or_type(weight)}")
    n, k = weight.shape
    for name, t, size in (("bias", bias, n), ("ln_weight", ln_weight, k), ("ln_bias", ln_bias, k)):
        if t is None and name != "ln_weight":
            continue
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (size,):
            raise ValueError(f"fold_layernorm: {name} must be a [{size}] tensor, got {shape_or_type(t)}")
    if not float(eps) >= 0.0:
        raise ValueError(f"fold_layernorm: eps must be >= 0, got {eps!r}")
    dtype = dtype or weight.dtype
    w32 = weight.detach().float()
    folded = (w32 * ln_weight.detach().float()[None, :]).to(dtype).contiguous()
    b32 = torch.zeros(n, dtype=torch.float32, device=weight.device) if bias is None else bias.detach().float()
    if ln_bias is not None:
        b32 = b32 + w32 @ ln_bias.detach().float()
    colsum = folded.float().sum(dim=1).contiguous()
    return folded, b32.to(dtype).contiguous(), FoldedLayerNorm(colsum, float(eps))

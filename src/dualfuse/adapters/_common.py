"""Helpers shared by the adapters: read weights without touching the user's model."""
from __future__ import annotations

import torch
from torch import nn

from ..spec import LayerNorm, Linear


class NotCovered(ValueError):
    """The model's family is runnable (the stock executors can call it) but a tower is not expressible in
    DualEncoderSpec, so the fused kernels cannot run it. ``tower`` names the tower, ``what`` the part."""

    def __init__(self, tower: str, what: str, hint: str = ""):
        self.tower, self.what, self.hint = tower, what, hint
        super().__init__(f"{tower} {what} is not covered by the fused kernels" + (f" ({hint})" if hint else ""))


def t(x: torch.Tensor) -> torch.Tensor:
    """A detached copy: the spec never shares storage with (or mutates) the user's model."""
    return x.detach().clone()


def linear(m: nn.Linear) -> Linear:
    return Linear(t(m.weight), t(m.bias) if m.bias is not None else None)


def layer_norm(m: nn.LayerNorm) -> LayerNorm:
    return LayerNorm(t(m.weight), t(m.bias), float(m.eps))


def packed_linear(q: nn.Linear, k: nn.Linear, v: nn.Linear) -> Linear:
    """Pack separate q/k/v projections into one [3D, D] matrix (q | k | v)."""
    bias = None
    if q.bias is not None:
        bias = t(torch.cat([q.bias, k.bias, v.bias]))
    return Linear(t(torch.cat([q.weight, k.weight, v.weight])), bias)


def patch_weight(conv: nn.Conv2d, tower: str = "vision tower") -> tuple[torch.Tensor, torch.Tensor | None]:
    if (conv.kernel_size != conv.stride or conv.padding not in ((0, 0), 0, "valid")
            or conv.kernel_size[0] != conv.kernel_size[1] or conv.dilation not in ((1, 1), 1) or conv.groups != 1):
        raise NotCovered(tower, "patch embedding",
                         "it must be a square Conv2d with stride == kernel size and no padding; got "
                         f"kernel {conv.kernel_size}, stride {conv.stride}, padding {conv.padding}")
    w = conv.weight.detach()
    return t(w.reshape(w.shape[0], -1)), (t(conv.bias) if conv.bias is not None else None)


HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                  "gelu_new": "gelu_tanh"}


def hf_activation(name: str, tower: str = "HF tower") -> str:
    act = HF_ACTIVATIONS.get(name)
    if act is None:
        raise NotCovered(tower, f"activation hidden_act={name!r}", f"covered: {', '.join(HF_ACTIVATIONS)}")
    return act


def module_activation(act: nn.Module, tower: str) -> str:
    """The spec's activation for an activation module (torch, open_clip or timm), matched by class name since
    open_clip and timm each define their own GELU variants."""
    name = type(act).__name__
    if name == "QuickGELU":
        return "quick_gelu"
    if name == "GELU":  # torch's (approximate attr) or timm's (always exact)
        return "gelu_tanh" if getattr(act, "approximate", "none") == "tanh" else "gelu"
    if name == "GELUTanh":  # timm
        return "gelu_tanh"
    raise NotCovered(tower, f"activation {name}", "covered: QuickGELU, GELU (exact or tanh)")


def check_layer_norm(m: nn.Module, tower: str, where: str) -> None:
    """A plain affine LayerNorm with a bias (RMSNorm, BatchNorm, bias-free LN are not in the spec)."""
    if not isinstance(m, nn.LayerNorm) or m.weight is None or m.bias is None:
        raise NotCovered(tower, f"norm {where} ({type(m).__name__})", "only affine LayerNorm with a bias")


def checked_layer_norm(m: nn.Module, tower: str, where: str) -> LayerNorm:
    """``layer_norm(m)`` after ``check_layer_norm`` (NotCovered for anything but an affine LayerNorm)."""
    check_layer_norm(m, tower, where)
    return layer_norm(m)


def scalar(x: torch.Tensor) -> float:
    """A parameter's value as a float; NaN for meta tensors (shape-only specs used for planning)."""
    return float("nan") if x.is_meta else float(x.detach().reshape(()))

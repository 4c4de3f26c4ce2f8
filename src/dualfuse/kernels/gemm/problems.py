"""The problems of a grouped-linear launch (`LinearProblem`, the folded LayerNorm it may carry, row-statistics
buffers) and their validation: everything the kernel assumes about shapes, strides, dtypes and devices is
checked here once, at build time, with a message that names the problem and the tensor."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from .._utils import activation_code, is_interpreter


@dataclass
class FoldedLayerNorm:
    """A LayerNorm over x's rows folded into the GEMM that follows it (vertical fusion: no LN launch, no
    normalized copy of x). Build it with :func:`fold_layernorm`, which also gives the folded weight and bias."""

    colsum: torch.Tensor  # fp32 [N]: row sums of the folded weight exactly as the GEMM reads it
    eps: float
    # x's row statistics as the launch that wrote x left them (LinearProblem.row_stats_out of that launch) and
    # that launch's BLOCK_N (GroupedLinear.block_n). None: each program computes them in a pass over x first.
    stats: torch.Tensor | None = None
    stats_part_width: int = 0


def row_stats_buffer(rows: int, cols: int, device) -> torch.Tensor:
    """A buffer for the row statistics of a [rows, cols] output (LinearProblem.row_stats_out): fp32
    [rows, cdiv(cols, 16) * 2], per part of a row its mean and sum of squared deviations."""
    return torch.zeros(rows, triton.cdiv(cols, 16) * 2, dtype=torch.float32, device=device)


@dataclass
class LinearProblem:
    x: torch.Tensor  # [M, K]; last dim contiguous, row stride may be > K
    weight: torch.Tensor  # [N, K] contiguous (nn.Linear layout): out = x @ weight.T
    out: torch.Tensor  # [M, N] written by the kernel; last dim contiguous, row stride may be > N
    bias: torch.Tensor | None = None  # [N]
    activation: str | None = None  # None | "quick_gelu" | "gelu" (exact erf) | "gelu_tanh"
    residual: torch.Tensor | None = None  # [M, N]; may be the same tensor as out (in-place add)
    # out = act(LayerNorm(x) @ W.T + b) + residual, given the folded weight / bias / norm of fold_layernorm
    norm: FoldedLayerNorm | None = None
    # also write out's per-tile row statistics here (row_stats_buffer(M, N)) for a LayerNorm folded into the
    # GEMM that reads out next
    row_stats_out: torch.Tensor | None = None
    # deferred split-K reduction: out is a contiguous fp32 [S, M, N] tensor and program s of each output tile
    # stores its raw partial sum over its share of K in out[s] (S = out.shape[0] splits, every slice written);
    # no bias, activation, residual, norm or statistics here: the launch that reads out sums the slices (a
    # LayerNormProblem with `add`), so this launch has no split-K tail (arrival counter, partial loads)
    partial_sums: bool = False
    # weight-only quantization: weight is int8 (or fp8 e4m3, torch.float8_e4m3fn, on compute capability >= 8.9)
    # and this is its fp32 / fp16 contiguous [N] per-output-channel scale (W ~= weight * weight_scale[:, None],
    # see dualfuse.quantize); the kernel widens the tiles to x's dtype in registers and scales the fp32 sums
    weight_scale: torch.Tensor | None = None


def shape_or_type(t) -> str:
    return _shape(t) if isinstance(t, torch.Tensor) else type(t).__name__


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# quantized weight dtypes (LinearProblem.weight_scale) and the scale dtypes
FP8_E4M3 = getattr(torch, "float8_e4m3fn", None)
QUANT_DTYPES = tuple(d for d in (torch.int8, FP8_E4M3) if d is not None)
SCALE_DTYPES = (torch.float32, torch.float16)
FP8_MIN_CAPABILITY = (8, 9)


def fp8_unsupported_reason(device) -> str | None:
    """Why fp8 (e4m3) weights can't run on ``device``, or None: they need a CUDA GPU of compute capability >= 8.9
    (Ada, Hopper: the fp8 conversions); sm_80 / sm_87 (A100, Jetson Orin) and the CPU interpreter have none."""
    device = torch.device(device)
    if FP8_E4M3 is None:
        return "this torch has no torch.float8_e4m3fn"
    if device.type != "cuda" or is_interpreter():
        return (f"fp8 (e4m3) weights need a CUDA GPU of compute capability >= 8.9 (sm_89: Ada, Hopper), "
                f"got {device}{' under the Triton interpreter' if is_interpreter() else ''}")
    cc = torch.cuda.get_device_capability(device)
    if cc < FP8_MIN_CAPABILITY:
        return (f"fp8 (e4m3) weights need compute capability >= 8.9 (sm_89: Ada, Hopper), this GPU is "
                f"sm_{cc[0]}{cc[1]} ({torch.cuda.get_device_name(device)}); use int8 weights there")
    return None


def _shape(t) -> str:
    return f"{tuple(t.shape)} {t.dtype} stride={t.stride()} on {t.device}"


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    if t.numel() == 0:
        return (t.data_ptr(), t.data_ptr())
    last = sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    return (t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size())


def _check_stats_buffer(what: str, t, rows: int, cols: int, hint: str) -> None:
    """A row-statistics buffer of a [rows, cols] tensor: contiguous fp32 [rows, cdiv(cols, 16) * 2]."""
    want = (rows, triton.cdiv(cols, 16) * 2)
    if (not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or tuple(t.shape) != want
            or not t.is_contiguous()):
        raise ValueError(f"{what} must be a contiguous fp32 {list(want)} tensor ({hint}), got {shape_or_type(t)}")


def _check_quantized(where: str, p, N: int, first_q) -> None:
    """A quantized weight: int8 / fp8 e4m3 with a contiguous fp32 / fp16 [N] scale; one weight dtype and one scale
    dtype per launch; fp8 only where the card has it."""
    w, s = p.weight, p.weight_scale
    if w.dtype not in QUANT_DTYPES:
        raise ValueError(f"{where}: weight_scale is only for quantized weights (int8 / float8_e4m3fn); this weight "
                         f"is {w.dtype}: pass weight_scale=None")
    if s is None:
        raise ValueError(f"{where}: a {w.dtype} weight needs its per-output-channel weight_scale (a contiguous "
                         f"fp32 / fp16 [N={N}] tensor, see dualfuse.quantize.quantize_weight)")
    if not isinstance(s, torch.Tensor) or tuple(s.shape) != (N,) or not s.is_contiguous():
        raise ValueError(f"{where}: weight_scale must be a contiguous [N={N}] tensor (one scale per output channel), "
                         f"got {shape_or_type(s)}")
    if s.dtype not in SCALE_DTYPES:
        raise ValueError(f"{where}: weight_scale dtype must be fp32 or fp16, got {s.dtype}")
    if FP8_E4M3 is not None and w.dtype == FP8_E4M3:
        why = fp8_unsupported_reason(w.device)
        if why is not None:
            raise ValueError(f"{where}: {why}")
    if first_q is not None and (w.dtype, s.dtype) != first_q:
        raise ValueError(f"{where}: the quantized weights of one launch must share one weight dtype and one scale "
                         f"dtype {first_q}, got ({w.dtype}, {s.dtype}); launch them separately")


def validate_problems(problems) -> None:
    if not isinstance(problems, (list, tuple)) or len(problems) == 0:
        raise ValueError(f"expected a non-empty list of LinearProblem, got {problems!r}")
    first = None
    first_q = None  # (weight dtype, scale dtype) of the first quantized problem: one of each per launch
    for i, p in enumerate(problems):
        where = f"problem {i}"
        if not isinstance(p, LinearProblem):
            raise ValueError(f"{where}: expected a LinearProblem, got {type(p).__name__}")
        for name in ("x", "weight", "out"):
            if not isinstance(getattr(p, name), torch.Tensor):
                raise ValueError(f"{where}: {name} must be a torch.Tensor, got {type(getattr(p, name)).__name__}")
        x, w, out = p.x, p.weight, p.out
        if x.dim() != 2:
            raise ValueError(f"{where}: x must be 2-D [M, K], got {_shape(x)}")
        M, K = x.shape
        if w.dim() != 2 or w.shape[1] != K:
            raise ValueError(f"{where}: weight must be [N, K={K}] (nn.Linear layout), got {_shape(w)}")
        N = w.shape[0]
        if p.partial_sums:
            if (out.dim() != 3 or tuple(out.shape[1:]) != (M, N) or out.shape[0] < 1 or out.dtype != torch.float32
                    or not out.is_contiguous()):
                raise ValueError(f"{where}: with partial_sums, out must be a contiguous fp32 [S, M={M}, N={N}] "
                                 f"tensor (one slice per K split), got {_shape(out)}")
            extras = [name for name, v in (("bias", p.bias), ("activation", p.activation), ("residual", p.residual),
                                           ("norm", p.norm), ("row_stats_out", p.row_stats_out)) if v is not None]
            if extras:
                raise ValueError(f"{where}: partial_sums stores raw partial sums only; the reader applies the "
                                 f"epilogue, so {', '.join(extras)} must be None")
        elif out.dim() != 2 or tuple(out.shape) != (M, N):
            raise ValueError(f"{where}: out must be [M={M}, N={N}], got {_shape(out)}")
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{where}: x dtype must be one of fp16/bf16/fp32, got {x.dtype}")
        if p.weight_scale is not None or w.dtype in QUANT_DTYPES:
            _check_quantized(where, p, N, first_q)
            if first_q is None:
                first_q = (w.dtype, p.weight_scale.dtype)
        elif w.dtype != x.dtype:
            raise ValueError(f"{where}: weight dtype must equal x dtype {x.dtype} (or be int8 / float8_e4m3fn with "
                             f"a weight_scale), got {w.dtype}")
        if out.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{where}: out dtype must be one of fp16/bf16/fp32, got {out.dtype}")
        if K > 1 and x.stride(1) != 1:
            raise ValueError(f"{where}: x must have a contiguous last dim (stride 1), got {_shape(x)}")
        if not w.is_contiguous():
            raise ValueError(f"{where}: weight must be contiguous, got {_shape(w)}")
        if N > 1 and out.stride(-1) != 1:
            raise ValueError(f"{where}: out must have a contiguous last dim (stride 1), got {_shape(out)}")
        if p.bias is not None:
            b = p.bias
            if not isinstance(b, torch.Tensor) or b.dim() != 1 or b.shape[0] != N or not b.is_contiguous():
                raise ValueError(f"{where}: bias must be a contiguous [N={N}] tensor, got "
                                 f"{shape_or_type(b)}")
            if b.dtype != x.dtype:
                raise ValueError(f"{where}: bias dtype must equal x dtype {x.dtype}, got {b.dtype}")
        activation_code(p.activation)  # raises ValueError on an unknown name
        if p.residual is not None:
            r = p.residual
            if not isinstance(r, torch.Tensor) or r.dim() != 2 or tuple(r.shape) != (M, N):
                raise ValueError(f"{where}: residual must be [M={M}, N={N}], got "
                                 f"{shape_or_type(r)}")
            if N > 1 and r.stride(1) != 1:
                raise ValueError(f"{where}: residual must have a contiguous last dim, got {_shape(r)}")
            if r.dtype != out.dtype:
                raise ValueError(f"{where}: residual dtype must equal out dtype {out.dtype}, got {r.dtype}")
            same_view = r.data_ptr() == out.data_ptr() and r.stride() == out.stride()
            ro, oo = _byte_range(r), _byte_range(out)
            if not same_view and ro[0] < oo[1] and oo[0] < ro[1]:
                raise ValueError(f"{where}: residual overlaps out without being the same view "
                                 f"(residual {_shape(r)}, out {_shape(out)}); pass out itself or a disjoint tensor")
        if p.norm is not None:
            nm = p.norm
            if not isinstance(nm, FoldedLayerNorm):
                raise ValueError(f"{where}: norm must be a FoldedLayerNorm (see fold_layernorm), got {type(nm).__name__}")
            c = nm.colsum
            if (not isinstance(c, torch.Tensor) or c.dtype != torch.float32 or tuple(c.shape) != (N,)
                    or not c.is_contiguous()):
                raise ValueError(f"{where}: norm.colsum must be a contiguous fp32 [N={N}] tensor, got {shape_or_type(c)}")
            if not isinstance(nm.eps, (int, float)) or not float(nm.eps) >= 0.0:
                raise ValueError(f"{where}: norm.eps must be a number >= 0, got {nm.eps!r}")
            if nm.stats is not None:
                _check_stats_buffer(f"{where}: norm.stats", nm.stats, M, K, "row_stats_buffer(M, K)")
                w_ = nm.stats_part_width
                if not isinstance(w_, int) or w_ < 16 or w_ & (w_ - 1):
                    raise ValueError(f"{where}: norm.stats_part_width must be the producing launch's BLOCK_N "
                                     f"(a power of two >= 16), got {w_!r}")
        if p.row_stats_out is not None:
            _check_stats_buffer(f"{where}: row_stats_out", p.row_stats_out, M, N, "row_stats_buffer(M, N)")
        tensors = [("x", x), ("weight", w), ("out", out), ("bias", p.bias), ("residual", p.residual),
                   ("norm.colsum", p.norm.colsum if p.norm is not None else None),
                   ("norm.stats", p.norm.stats if p.norm is not None else None), ("row_stats_out", p.row_stats_out),
                   ("weight_scale", p.weight_scale)]
        if first is None:
            first = (x.dtype, out.dtype, x.device)
        for name, t in tensors:
            if t is not None and t.device != first[2]:
                raise ValueError(f"{where}: all tensors must be on {first[2]}, got {name} on {t.device}")
        if x.dtype != first[0]:
            raise ValueError(f"{where}: all problems must share one input dtype {first[0]}, got {x.dtype}")
        if out.dtype != first[1]:
            raise ValueError(f"{where}: all problems must share one out dtype {first[1]}, got {out.dtype}")
    dev = first[2]
    if dev.type != "cuda" and not is_interpreter():
        raise ValueError(f"tensors must be on a CUDA device (or set TRITON_INTERPRET=1 for CPU), got {dev}")

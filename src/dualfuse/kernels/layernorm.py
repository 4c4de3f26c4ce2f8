"""Grouped LayerNorm: one Triton launch normalizes the rows of several problems (e.g. both towers).

Each :class:`LayerNormProblem` has its own rows, width, affine parameters, eps and (optionally) a
row gather (``row_index``): ``out[i] = LN(x[row_index[i]])``. The gather is how pooling is done
(class / EOS / last token rows, see :mod:`dualfuse.kernels.heads`).

:class:`GroupedLayerNorm` follows the prepared-op pattern of every kernel here: ``__init__``
validates and builds the device-side metadata table (one int64 row per problem: data pointers,
sizes, strides, first program id), ``__call__`` only launches one kernel (no allocation, no
host/device sync), so it can be captured in a CUDA graph. The tensors in the problems are static
buffers the caller keeps alive; their *contents* may change between calls.

Numerics: statistics and the affine transform are computed in fp32 (two passes over the row held
in registers: mean, then the mean of squared deviations, as ``torch.nn.functional.layer_norm``).

Deferred residual add (``add``): the LayerNorm that follows a split-K GEMM on the residual stream can finish
that GEMM's reduction: ``x += add_bias + sum_s add[s]`` (the GEMM's raw per-split partial sums, see
``LinearProblem.partial_sums``), written back to ``x``, then ``out = LN(x)``. The GEMM launch then has no
split-K tail (counter atomic, partial loads by the last program): on the critical path at batch 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._utils import (LAUNCH_OPTIONS, check_tensor, describe, gdc_launch, gdc_wait, load_field, pdl_supported, pow2_divisor,
                     problem_of, scalar_bool)

__all__ = ["LayerNormProblem", "GroupedLayerNorm", "grouped_layer_norm", "MAX_ADD_SLICES"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_D = 16384

# Metadata columns (int64 table, one row per problem), read by the kernel as tl.constexpr globals.
(_X, _W, _B, _OUT, _IDX, _IDX_KIND, _ROWS, _D, _XS, _OS, _START, _ADD, _ADD_S,
 _ADD_B) = (tl.constexpr(i) for i in range(14))
_NF = 14
MAX_ADD_SLICES = 8  # partial-sum slices one problem may add (loaded all at once: one L2 round trip)


@dataclass
class LayerNormProblem:
    """One LayerNorm over the rows of ``x`` (or over the rows ``x[row_index]``).

    x: [R, D], last dim contiguous, row stride may be > D.
    weight, bias: [D], contiguous.
    out: [R, D] (or [len(row_index), D] with ``row_index``), last dim contiguous.
    row_index: optional 1-D int32/int64 tensor; ``out[i] = LN(x[row_index[i]])``. Its values are
        read on the device at launch time and must lie in ``[0, R)`` (not checked: no sync).
    add: optional contiguous fp32 [S, R, D] (1 <= S <= 8): partial sums of a GEMM whose result belongs in x.
        First ``x += add_bias + add[0] + ... + add[S-1]`` (fp32, written back to x in x's dtype), then
        ``out = LN(x)``. Not with row_index.
    add_bias: optional [D] (the weight's dtype), only with ``add``.
    """

    x: Tensor
    weight: Tensor
    bias: Tensor
    out: Tensor
    eps: float
    row_index: Tensor | None = None
    add: Tensor | None = None
    add_bias: Tensor | None = None


@triton.jit
def _layer_norm_kernel(
    meta,  # int64 [P, NF]
    eps_ptr,  # fp32 [P]
    n_problems,
    x_ref,  # a tensor of the activations' dtype (pointer element type only)
    w_ref,  # a tensor of the weights' dtype
    o_ref,  # a tensor of the outputs' dtype
    NF: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PTR_ALIGN: tl.constexpr,  # every x/weight/bias/out pointer is a multiple of this many bytes
    ELT_ALIGN: tl.constexpr,  # every row stride and width is a multiple of this many elements
    USE_PDL: tl.constexpr,  # launched with programmatic dependent launch (sm_90+)
    MAX_ADD: tl.constexpr,  # 0: no problem has `add`; else a power of two >= every problem's slices
):
    pid = tl.program_id(0)
    if USE_PDL:
        gdc_launch()  # the next launch may start (its programs wait for all of this one to finish)
    prob = problem_of(pid, meta, n_problems, NF, _START)
    row = meta + prob * NF
    x_ptr = load_field(row, _X, x_ref.dtype, PTR_ALIGN)
    w_ptr = load_field(row, _W, w_ref.dtype, PTR_ALIGN)
    b_ptr = load_field(row, _B, w_ref.dtype, PTR_ALIGN)
    o_ptr = load_field(row, _OUT, o_ref.dtype, PTR_ALIGN)
    idx_addr = tl.load(row + _IDX)
    idx_kind = tl.load(row + _IDX_KIND)
    n_rows = tl.load(row + _ROWS)
    D = load_field(row, _D, tl.int64, ELT_ALIGN)
    x_stride = load_field(row, _XS, tl.int64, ELT_ALIGN)
    o_stride = load_field(row, _OS, tl.int64, ELT_ALIGN)
    start = tl.load(row + _START)
    eps = tl.load(eps_ptr + prob)
    if MAX_ADD > 0:
        add_ptr = tl.load(row + _ADD).to(tl.pointer_type(tl.float32))  # [S, n_rows, D] (x's address when absent)
        n_add = tl.load(row + _ADD_S)  # S; 0 when absent
        add_b_ptr = tl.load(row + _ADD_B).to(w_ref.dtype)  # [D] (weight's address when absent)

    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    # LayerNorm parameters are never written by a kernel: loaded before waiting on the previous launch
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if MAX_ADD > 0:
        add_b = tl.load(add_b_ptr + cols, mask=col_ok & scalar_bool(n_add > 0), other=0.0).to(tl.float32)
    if USE_PDL:
        gdc_wait()  # x and row_index are earlier launches' outputs
    rows = (pid - start) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_ok = rows < n_rows
    src_rows = rows
    if idx_kind == 1:
        src_rows = tl.load(idx_addr.to(tl.pointer_type(tl.int32)) + rows, mask=row_ok, other=0).to(tl.int64)
    elif idx_kind == 2:
        src_rows = tl.load(idx_addr.to(tl.pointer_type(tl.int64)) + rows, mask=row_ok, other=0)

    mask = row_ok[:, None] & col_ok[None, :]
    x_ptrs = x_ptr + src_rows[:, None] * x_stride + cols[None, :]
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    if MAX_ADD > 0:
        # finish the split-K GEMM that writes x: its partial sums (all slices in flight at once), in the order
        # and association of the GEMM's own reduction ((sum of slices) + bias) + residual
        a_ptrs = add_ptr + rows[:, None] * D + cols[None, :]
        slab = n_rows * D
        acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        for s in tl.static_range(MAX_ADD):
            acc += tl.load(a_ptrs + s * slab, mask=mask & scalar_bool(s < n_add), other=0.0)
        x_new = (x + (acc + add_b[None, :])).to(x_ref.dtype.element_ty)
        tl.store(x_ptrs, x_new, mask=mask & scalar_bool(n_add > 0))
        x = tl.where(n_add > 0, x_new.to(tl.float32), x)
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(o_ptr + rows[:, None] * o_stride + cols[None, :], y.to(o_ref.dtype.element_ty), mask=mask)


class GroupedLayerNorm:
    """Prepared grouped LayerNorm: ``GroupedLayerNorm(problems)()`` normalizes all problems in one launch.

    All problems share the activation dtype (``x``), the parameter dtype (``weight``/``bias``) and
    the output dtype (each fp16, bf16 or fp32; they may differ from one another), and the device.
    ``block_rows`` / ``num_warps`` override the heuristics. ``pdl`` (default True): launch with
    programmatic dependent launch where supported (sm_90+).
    """

    def __init__(self, problems: Sequence[LayerNormProblem], *, block_rows: int | None = None,
                 num_warps: int | None = None, pdl: bool = True):
        problems = list(problems)
        if not problems:
            raise ValueError("GroupedLayerNorm: expected at least one LayerNormProblem, got none")
        p0 = problems[0]
        device = p0.x.device
        x_dtype, w_dtype, o_dtype = p0.x.dtype, p0.weight.dtype, p0.out.dtype
        for name, dt in (("x", x_dtype), ("weight", w_dtype), ("out", o_dtype)):
            if dt not in _FLOAT_DTYPES:
                raise ValueError(f"GroupedLayerNorm: {name} dtype must be one of {_FLOAT_DTYPES}, got {dt}")
        rows_meta = []
        eps_list = []
        keep = []  # tensors only the device table refers to
        max_d = 1
        for i, p in enumerate(problems):
            where = f"GroupedLayerNorm problem {i}"
            if not isinstance(p, LayerNormProblem):
                raise ValueError(f"{where}: expected a LayerNormProblem, got {type(p).__name__}")
            x, w, b, out = p.x, p.weight, p.bias, p.out
            for name, t in (("x", x), ("weight", w), ("bias", b), ("out", out)):
                check_tensor(where, name, t, device)
            if x.dim() != 2 or x.stride(1) != 1:
                raise ValueError(f"{where}: x must be [R, D] with a contiguous last dim, got {describe(x)}")
            R, D = x.shape
            if R < 1 or D < 1:
                raise ValueError(f"{where}: x must have at least one row and column, got {tuple(x.shape)}")
            if D > _MAX_D:
                raise ValueError(f"{where}: D={D} exceeds the supported maximum {_MAX_D}")
            if x.dtype != x_dtype or out.dtype != o_dtype:
                raise ValueError(f"{where}: x/out dtypes {x.dtype}/{out.dtype} differ from problem 0's "
                                 f"{x_dtype}/{o_dtype} (one launch shares dtypes)")
            for name, t in (("weight", w), ("bias", b)):
                if t.shape != (D,) or (D > 1 and t.stride(0) != 1):
                    raise ValueError(f"{where}: {name} must be contiguous [{D}], got {describe(t)}")
                if t.dtype != w_dtype:
                    raise ValueError(f"{where}: {name} dtype {t.dtype} differs from problem 0's weight dtype {w_dtype}")
            idx_addr, idx_kind, n_out = 0, 0, R
            if p.row_index is not None:
                ri = p.row_index
                if not isinstance(ri, Tensor) or ri.dim() != 1 or ri.dtype not in (torch.int32, torch.int64):
                    raise ValueError(f"{where}: row_index must be a 1-D int32/int64 tensor, got {describe(ri)}")
                if ri.device != device:
                    raise ValueError(f"{where}: row_index is on {ri.device}, expected {device}")
                if ri.numel() < 1 or (ri.numel() > 1 and ri.stride(0) != 1):
                    raise ValueError(f"{where}: row_index must be contiguous and non-empty, got {describe(ri)}")
                idx_addr, idx_kind, n_out = ri.data_ptr(), (1 if ri.dtype == torch.int32 else 2), ri.numel()
            add_addr, add_s, add_b_addr = x.data_ptr(), 0, w.data_ptr()
            if p.add is not None:
                a = p.add
                if p.row_index is not None:
                    raise ValueError(f"{where}: add (partial sums written back to x) cannot be combined with "
                                     f"row_index (x would be updated in the gathered rows only)")
                if (not isinstance(a, Tensor) or a.dim() != 3 or tuple(a.shape[1:]) != (R, D)
                        or not 1 <= a.shape[0] <= MAX_ADD_SLICES or a.dtype != torch.float32 or not a.is_contiguous()):
                    raise ValueError(f"{where}: add must be a contiguous fp32 [S, R={R}, D={D}] tensor with "
                                     f"1 <= S <= {MAX_ADD_SLICES}, got {describe(a)}")
                if a.device != device:
                    raise ValueError(f"{where}: add is on {a.device}, expected {device}")
                ab = p.add_bias
                if ab is not None:
                    if (not isinstance(ab, Tensor) or ab.shape != (D,) or ab.dtype != w_dtype
                            or (D > 1 and ab.stride(0) != 1) or ab.device != device):
                        raise ValueError(f"{where}: add_bias must be a contiguous [{D}] {w_dtype} tensor on {device} "
                                         f"(the LayerNorm weight's dtype), got "
                                         f"{describe(ab)}")
                else:  # the kernel always adds a bias with `add`: zeros, kept alive with this op
                    ab = torch.zeros(D, dtype=w_dtype, device=device)
                    keep.append(ab)
                add_addr, add_s, add_b_addr = a.data_ptr(), a.shape[0], ab.data_ptr()
            elif p.add_bias is not None:
                raise ValueError(f"{where}: add_bias is only used with add (partial sums); got add_bias without add")
            if out.dim() != 2 or tuple(out.shape) != (n_out, D) or out.stride(1) != 1:
                raise ValueError(f"{where}: out must be [{n_out}, {D}] with a contiguous last dim, got {describe(out)}")
            eps = float(p.eps)
            if not eps >= 0.0:
                raise ValueError(f"{where}: eps must be >= 0, got {p.eps}")
            max_d = max(max_d, D)
            rows_meta.append([x.data_ptr(), w.data_ptr(), b.data_ptr(), out.data_ptr(), idx_addr, idx_kind,
                              n_out, D, x.stride(0), out.stride(0), 0, add_addr, add_s, add_b_addr])
            eps_list.append(eps)

        self.problems = problems
        self._keep = keep
        self.block_d = triton.next_power_of_2(max_d)
        if block_rows is None:
            block_rows = max(1, min(16, 4096 // self.block_d))
        if block_rows < 1 or block_rows & (block_rows - 1):
            raise ValueError(f"GroupedLayerNorm: block_rows must be a power of two >= 1, got {block_rows}")
        self.block_rows = block_rows
        if num_warps is None:
            num_warps = 4 if block_rows * self.block_d <= 4096 else 8
        self.num_warps = num_warps
        start = 0
        for r in rows_meta:
            r[_START] = start
            start += triton.cdiv(r[_ROWS], block_rows)
        self.num_programs = start
        self.meta = torch.tensor(rows_meta, dtype=torch.int64).to(device)
        self.eps = torch.tensor(eps_list, dtype=torch.float32).to(device)
        self._refs = (p0.x, p0.weight, p0.out)
        self._ptr_align = pow2_divisor([r[j] for r in rows_meta for j in (_X, _W, _B, _OUT)], 16)
        self._elt_align = pow2_divisor([r[j] for r in rows_meta for j in (_D, _XS, _OS)], 16)
        self._pdl = bool(pdl) and pdl_supported(device)
        max_add = max(r[_ADD_S] for r in rows_meta)
        self._max_add = triton.next_power_of_2(max_add) if max_add else 0

    @property
    def outputs(self) -> list[Tensor]:
        return [p.out for p in self.problems]

    def __call__(self) -> None:
        x_ref, w_ref, o_ref = self._refs
        _layer_norm_kernel[(self.num_programs,)](
            self.meta, self.eps, len(self.problems), x_ref, w_ref, o_ref,
            NF=_NF, BLOCK_R=self.block_rows, BLOCK_D=self.block_d, PTR_ALIGN=self._ptr_align,
            ELT_ALIGN=self._elt_align, USE_PDL=self._pdl, MAX_ADD=self._max_add, num_warps=self.num_warps,
            **({"launch_pdl": True} if self._pdl else {}), **LAUNCH_OPTIONS,
        )


def grouped_layer_norm(xs: Sequence[Tensor], weights: Sequence[Tensor], biases: Sequence[Tensor],
                       eps: float | Sequence[float], row_indices: Sequence[Tensor | None] | None = None,
                       out_dtype: torch.dtype | None = None) -> list[Tensor]:
    """Allocate outputs, build a :class:`GroupedLayerNorm` and run it once.

    Each ``x`` may be [..., D] (flattened to rows; outputs get the same shape), or [R, D] with a
    ``row_index`` (output [len(row_index), D]). ``eps`` is one float or one per problem.
    """
    xs = list(xs)
    n = len(xs)
    weights, biases = list(weights), list(biases)
    if len(weights) != n or len(biases) != n:
        raise ValueError(f"grouped_layer_norm: got {n} inputs, {len(weights)} weights, {len(biases)} biases")
    eps_l = [float(eps)] * n if isinstance(eps, (int, float)) else [float(e) for e in eps]
    idx_l = [None] * n if row_indices is None else list(row_indices)
    if len(eps_l) != n or len(idx_l) != n:
        raise ValueError(f"grouped_layer_norm: got {n} inputs, {len(eps_l)} eps values, {len(idx_l)} row indices")
    problems, shapes = [], []
    for x, w, b, e, ri in zip(xs, weights, biases, eps_l, idx_l):
        if not isinstance(x, Tensor) or x.dim() < 1:
            raise ValueError(f"grouped_layer_norm: inputs must be tensors with >= 1 dim, got {x!r:.80}")
        D = x.shape[-1]
        if ri is not None:
            if x.dim() != 2:
                raise ValueError(f"grouped_layer_norm: with row_index x must be [R, D], got {tuple(x.shape)}")
            x2 = x
            shape = (ri.numel(), D) if isinstance(ri, Tensor) else None
        else:
            x2 = x if (x.dim() == 2 and x.stride(-1) == 1) else x.reshape(-1, D)
            shape = tuple(x.shape)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        n_out = ri.numel() if isinstance(ri, Tensor) else x2.shape[0]
        out = torch.empty((n_out, D), dtype=out_dtype or x.dtype, device=x.device)
        problems.append(LayerNormProblem(x2, w, b, out, e, ri))
        shapes.append(shape)
    op = GroupedLayerNorm(problems)
    op()
    return [p.out.view(s) if s is not None else p.out for p, s in zip(problems, shapes)]

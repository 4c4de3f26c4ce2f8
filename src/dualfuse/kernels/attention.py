"""Grouped flash attention: one Triton launch computes the attention of several problems (both towers).

Layout: every tensor is a ``[B, S, H*Dh]`` view whose last dim is contiguous (heads-major: head
``h`` owns columns ``h*Dh:(h+1)*Dh``); batch and token strides are arbitrary, so the q/k/v of a
packed QKV GEMM output are used in place (:func:`split_packed_qkv`) and the output is written in
exactly the layout the out-projection GEMM reads. A batch stride of 0 broadcasts one tensor over
the batch (SigLIP's attention-pooling probe: ``q = probe.expand(B, 1, width)``).

Each :class:`AttentionProblem` has its own batch, heads, sequence lengths, head dim, causal flag and
scale. The program grid covers (problem, batch*head, query block) of all problems; the head dim is
a compile-time maximum (next power of two, >= 16) with masking, so the common case (both towers
Dh=64) wastes nothing. Causal masking is top-left aligned like
``F.scaled_dot_product_attention(is_causal=True)`` (query i sees keys j <= i); key blocks fully
above the diagonal are skipped. Online softmax in fp32 with ``exp2`` and a log2(e)-prescaled scale;
P is cast to the input dtype for the P@V product (fp16/bf16), fp32 inputs use IEEE fp32 dots.

:class:`GroupedAttention` is a prepared op: ``__init__`` validates and builds an int64 metadata
table on the device; ``__call__`` only launches one kernel (CUDA-graph capturable).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._utils import (check_tensor, describe, device_props, gdc_launch, gdc_wait, load_field, num_sms, pdl_supported, pow2_divisor, problem_of,
                     scalar_bool, LAUNCH_OPTIONS)

__all__ = ["AttentionProblem", "GroupedAttention", "grouped_attention", "split_packed_qkv"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634
_MAX_HEAD_DIM = 256

# Metadata columns (int64 table, one row per problem, in launch order), read by the kernel as tl.constexpr globals.
(_Q, _K, _V, _O, _Q_SB, _Q_SS, _K_SB, _K_SS, _V_SB, _V_SS, _O_SB, _O_SS, _H, _SQ, _SK, _DH, _CAUSAL, _N_M,
 _START) = (tl.constexpr(i) for i in range(19))
_F = dict(q=_Q, k=_K, v=_V, o=_O, q_sb=_Q_SB, q_ss=_Q_SS, k_sb=_K_SB, k_ss=_K_SS, v_sb=_V_SB, v_ss=_V_SS, o_sb=_O_SB,
          o_ss=_O_SS, H=_H, Sq=_SQ, Sk=_SK, Dh=_DH, causal=_CAUSAL, n_m=_N_M, start=_START)
_NF = 19


@dataclass
class AttentionProblem:
    """softmax(q k^T * scale [+ causal mask]) v for every batch and head.

    q: [B, Sq, H*Dh]; k, v: [B, Sk, H*Dh]; out: [B, Sq, H*Dh] (written). Last dims contiguous,
    other strides arbitrary (batch stride 0 = broadcast). ``scale`` defaults to ``Dh ** -0.5``.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    out: Tensor
    heads: int
    causal: bool = False
    scale: float | None = None


@triton.jit
def _attention_inner(acc, l_i, m_i, q, k_base, v_base, k_ss, v_ss, offs_m, offs_d, d_ok, lo, hi, Sk, causal,
                     qk_scale, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr,
                     IEEE: tl.constexpr):
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        kt_ptrs = k_base + offs_n[None, :] * k_ss + offs_d[:, None]
        v_ptrs = v_base + offs_n[:, None] * v_ss + offs_d[None, :]
        n_ok = offs_n < Sk
        if MASKED:
            if EVEN_D:
                kt = tl.load(kt_ptrs, mask=n_ok[None, :], other=0.0)
            else:
                kt = tl.load(kt_ptrs, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        elif EVEN_D:
            kt = tl.load(kt_ptrs)
        else:
            kt = tl.load(kt_ptrs, mask=d_ok[:, None], other=0.0)
        if IEEE:
            qk = tl.dot(q, kt, input_precision="ieee")
        else:
            qk = tl.dot(q, kt)
        qk = qk * qk_scale
        if MASKED:
            valid = n_ok[None, :] & ((offs_n[None, :] <= offs_m[:, None]) | scalar_bool(causal == 0))
            qk = tl.where(valid, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if MASKED:
            if EVEN_D:
                v = tl.load(v_ptrs, mask=n_ok[:, None], other=0.0)
            else:
                v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        elif EVEN_D:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        if IEEE:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attention_kernel(
    meta,  # int64 [P, NF]
    scales,  # fp32 [P]: scale * log2(e)
    n_problems,
    ref,  # a tensor of the q/k/v dtype (pointer element type only)
    o_ref,  # a tensor of the output dtype
    NF: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,  # every problem's head dim == BLOCK_D: no head-dim masks
    IEEE: tl.constexpr,  # fp32 inputs: IEEE fp32 dots (not TF32)
    PTR_ALIGN: tl.constexpr,  # every data pointer is a multiple of this many bytes
    ELT_ALIGN: tl.constexpr,  # every stride and head dim is a multiple of this many elements
    USE_PDL: tl.constexpr,  # launched with programmatic dependent launch (sm_90+)
):
    pid = tl.program_id(0)
    if USE_PDL:
        gdc_launch()  # the next launch may start (its programs wait for all of this one to finish)
    prob = problem_of(pid, meta, n_problems, NF, _START)
    row = meta + prob * NF
    q_ptr = load_field(row, _Q, ref.dtype, PTR_ALIGN)
    k_ptr = load_field(row, _K, ref.dtype, PTR_ALIGN)
    v_ptr = load_field(row, _V, ref.dtype, PTR_ALIGN)
    o_ptr = load_field(row, _O, o_ref.dtype, PTR_ALIGN)
    # Batch strides stay int64 (scalar base offsets); per-element offsets are int32 (checked on the host).
    q_sb = load_field(row, _Q_SB, tl.int64, ELT_ALIGN)
    q_ss = load_field(row, _Q_SS, tl.int32, ELT_ALIGN)
    k_sb = load_field(row, _K_SB, tl.int64, ELT_ALIGN)
    k_ss = load_field(row, _K_SS, tl.int32, ELT_ALIGN)
    v_sb = load_field(row, _V_SB, tl.int64, ELT_ALIGN)
    v_ss = load_field(row, _V_SS, tl.int32, ELT_ALIGN)
    o_sb = load_field(row, _O_SB, tl.int64, ELT_ALIGN)
    o_ss = load_field(row, _O_SS, tl.int32, ELT_ALIGN)
    H = tl.load(row + _H).to(tl.int32)
    Sq = tl.load(row + _SQ).to(tl.int32)
    Sk = tl.load(row + _SK).to(tl.int32)
    Dh = load_field(row, _DH, tl.int32, ELT_ALIGN)
    causal = tl.load(row + _CAUSAL).to(tl.int32)
    n_m = tl.load(row + _N_M).to(tl.int32)
    start = tl.load(row + _START).to(tl.int32)
    qk_scale = tl.load(scales + prob)

    local = pid - start
    m_blk = local % n_m
    bh = local // n_m
    b = (bh // H).to(tl.int64)
    h = bh % H
    if EVEN_D:
        head_off = h * BLOCK_D
    else:
        head_off = h * Dh

    offs_m = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < Dh
    m_ok = offs_m < Sq
    if EVEN_D:
        md_ok = m_ok[:, None]
    else:
        md_ok = m_ok[:, None] & d_ok[None, :]

    if USE_PDL:
        gdc_wait()  # the metadata above is host-written; q/k/v are the previous launch's output
    q = tl.load(q_ptr + b * q_sb + head_off + offs_m[:, None] * q_ss + offs_d[None, :], mask=md_ok, other=0.0)
    k_base = k_ptr + b * k_sb + head_off
    v_base = v_ptr + b * v_sb + head_off

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Key blocks [0, full_hi) need no mask (inside Sk and, if causal, left of this query block's
    # diagonal); [full_hi, hi) are masked; key blocks past the diagonal are skipped.
    hi = Sk
    full_hi = (Sk // BLOCK_N) * BLOCK_N
    if causal != 0:
        hi = tl.minimum(Sk, (m_blk + 1) * BLOCK_M)
        full_hi = tl.minimum(full_hi, ((m_blk * BLOCK_M + 1) // BLOCK_N) * BLOCK_N)
    acc, l_i, m_i = _attention_inner(acc, l_i, m_i, q, k_base, v_base, k_ss, v_ss, offs_m, offs_d, d_ok,
                                     0, full_hi, Sk, causal, qk_scale, BLOCK_N, False, EVEN_D, IEEE)
    acc, l_i, m_i = _attention_inner(acc, l_i, m_i, q, k_base, v_base, k_ss, v_ss, offs_m, offs_d, d_ok,
                                     full_hi, hi, Sk, causal, qk_scale, BLOCK_N, True, EVEN_D, IEEE)
    acc = acc / l_i[:, None]
    tl.store(o_ptr + b * o_sb + head_off + offs_m[:, None] * o_ss + offs_d[None, :],
             acc.to(o_ref.dtype.element_ty), mask=md_ok)


def split_packed_qkv(qkv: Tensor, width: int) -> tuple[Tensor, Tensor, Tensor]:
    """Split a packed QKV GEMM output [B, S, 3*width] (q|k|v, each heads-major) into strided views."""
    if not isinstance(qkv, Tensor) or qkv.dim() != 3 or qkv.shape[-1] != 3 * width:
        raise ValueError(f"split_packed_qkv: expected [B, S, {3 * width}] (3*width), got {describe(qkv)}")
    return qkv[..., :width], qkv[..., width:2 * width], qkv[..., 2 * width:]


def _default_blocks(device: torch.device, dtype: torch.dtype, problems=()) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the device, dtype and problems.

    16-bit on CUDA (sweep of 22 configs on an H200, benchmarks/kernels_attention.py --sweep): 64 x 64, 3 stages
    while the launch has few programs (batch 1: each program's chain of K/V blocks is the latency); 64 x 32,
    3 stages once there are >= 2 programs per SM (batch 32: 13-18% faster than 64 x 64 there; more programs
    fit per SM)."""
    if device_props(device) is None:  # interpreter (no CUDA device, no target_device)
        return 32, 32, 4, 1
    if dtype == torch.float32:  # IEEE fp32 dots: larger tiles spill registers
        return 32, 32, 4, 2
    programs = sum(p.q.shape[0] * p.heads * -(-p.q.shape[1] // 64) for p in problems
                   if isinstance(p, AttentionProblem) and isinstance(p.q, Tensor) and p.q.dim() == 3)
    return (64, 32, 4, 3) if programs >= 2 * num_sms(device) else (64, 64, 4, 3)


class GroupedAttention:
    """Prepared grouped attention: ``GroupedAttention(problems)()`` runs every problem in one launch.

    All problems share the device, the q/k/v dtype and the output dtype. ``block_m``, ``block_n``,
    ``num_warps``, ``num_stages`` override the defaults (_default_blocks: 64 x 64 or 64 x 32 by program count, 4 warps,
    3 stages on CUDA; 32 x 32 for fp32).
    ``pdl`` (default True): launch with programmatic dependent launch where supported (sm_90+), so this
    launch starts while the previous one drains and the next one while this one drains.
    """

    def __init__(self, problems: Sequence[AttentionProblem], *, block_m: int | None = None,
                 block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                 pdl: bool = True):
        problems = list(problems)
        if not problems:
            raise ValueError("GroupedAttention: expected at least one AttentionProblem, got none")
        p0 = problems[0]
        if not isinstance(p0, AttentionProblem) or not isinstance(p0.q, Tensor):
            raise ValueError(f"GroupedAttention: expected AttentionProblem objects, got {type(p0).__name__}")
        device, dtype, o_dtype = p0.q.device, p0.q.dtype, p0.out.dtype
        if dtype not in _FLOAT_DTYPES or o_dtype not in _FLOAT_DTYPES:
            raise ValueError(f"GroupedAttention: q/k/v and out dtypes must be in {_FLOAT_DTYPES}, got {dtype}, {o_dtype}")
        bm, bn, nw, ns = _default_blocks(device, dtype, problems)
        self.block_m = block_m or bm
        self.block_n = block_n or bn
        self.num_warps = num_warps or nw
        self.num_stages = num_stages or ns
        for name, val in (("block_m", self.block_m), ("block_n", self.block_n)):
            if val < 16 or val & (val - 1):
                raise ValueError(f"GroupedAttention: {name} must be a power of two >= 16, got {val}")

        rows, scales, costs = [], [], []
        max_dh = 16
        for i, p in enumerate(problems):
            where = f"GroupedAttention problem {i}"
            if not isinstance(p, AttentionProblem):
                raise ValueError(f"{where}: expected an AttentionProblem, got {type(p).__name__}")
            q, k, v, out = p.q, p.k, p.v, p.out
            for name, t in (("q", q), ("k", k), ("v", v), ("out", out)):
                check_tensor(where, name, t, device, o_dtype if name == "out" else dtype)
                if t.dim() != 3 or t.stride(2) != 1:
                    raise ValueError(f"{where}: {name} must be [B, S, H*Dh] with a contiguous last dim, got {describe(t)}")
            B, Sq, W = q.shape
            Sk = k.shape[1]
            if B < 1 or Sq < 1 or Sk < 1:
                raise ValueError(f"{where}: batch and sequence lengths must be >= 1, got q {tuple(q.shape)}, k {tuple(k.shape)}")
            if tuple(k.shape) != (B, Sk, W) or tuple(v.shape) != (B, Sk, W):
                raise ValueError(f"{where}: k and v must be [{B}, Sk, {W}] with the same Sk, got k {tuple(k.shape)}, v {tuple(v.shape)}")
            if tuple(out.shape) != (B, Sq, W):
                raise ValueError(f"{where}: out must be {(B, Sq, W)}, got {tuple(out.shape)}")
            H = p.heads
            if not isinstance(H, int) or isinstance(H, bool) or H < 1 or W % H:
                raise ValueError(f"{where}: heads must be a positive int dividing the width {W}, got {H!r}")
            Dh = W // H
            if Dh > _MAX_HEAD_DIM:
                raise ValueError(f"{where}: head dim {Dh} exceeds the supported maximum {_MAX_HEAD_DIM}")
            scale = Dh ** -0.5 if p.scale is None else float(p.scale)
            if not math.isfinite(scale):
                raise ValueError(f"{where}: scale must be finite, got {p.scale}")
            max_dh = max(max_dh, Dh)
            for name, t in (("q", q), ("k", k), ("v", v), ("out", out)):
                if (t.shape[1] + max(self.block_m, self.block_n)) * t.stride(1) + W >= 2 ** 31:
                    raise ValueError(f"{where}: {name} token offsets exceed int32 ({describe(t)})")
            n_m = triton.cdiv(Sq, self.block_m)
            r = [0] * _NF
            r[_F["q"]], r[_F["k"]], r[_F["v"]], r[_F["o"]] = q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr()
            r[_F["q_sb"]], r[_F["q_ss"]] = q.stride(0), q.stride(1)
            r[_F["k_sb"]], r[_F["k_ss"]] = k.stride(0), k.stride(1)
            r[_F["v_sb"]], r[_F["v_ss"]] = v.stride(0), v.stride(1)
            r[_F["o_sb"]], r[_F["o_ss"]] = out.stride(0), out.stride(1)
            r[_F["H"]], r[_F["Sq"]], r[_F["Sk"]], r[_F["Dh"]] = H, Sq, Sk, Dh
            r[_F["causal"]], r[_F["n_m"]] = int(bool(p.causal)), n_m
            rows.append(r)
            scales.append(scale * _LOG2E)
            # Per-program work, for launch order: longest programs first (better tail on the GPU).
            costs.append(min(Sk, self.block_m * n_m) * (0.5 if p.causal else 1.0))

        order = sorted(range(len(problems)), key=lambda j: -costs[j])
        start = 0
        meta_rows, scale_rows = [], []
        for j in order:
            r = rows[j]
            r[_F["start"]] = start
            B = problems[j].q.shape[0]
            start += B * r[_F["H"]] * r[_F["n_m"]]
            meta_rows.append(r)
            scale_rows.append(scales[j])
        self.problems = problems
        self.num_programs = start
        self.block_d = triton.next_power_of_2(max_dh)
        self.meta = torch.tensor(meta_rows, dtype=torch.int64).to(device)
        self.scales = torch.tensor(scale_rows, dtype=torch.float32).to(device)
        self._refs = (p0.q, p0.out)
        self._ieee = dtype == torch.float32
        self._even_d = all(r[_F["Dh"]] == self.block_d for r in rows)
        self._ptr_align = pow2_divisor([r[j] for r in rows for j in (_Q, _K, _V, _O)], 16)
        strides = (_Q_SB, _Q_SS, _K_SB, _K_SS, _V_SB, _V_SS, _O_SB, _O_SS)
        self._elt_align = pow2_divisor([r[j] for r in rows for j in strides] + [r[_DH] for r in rows], 16)
        self._pdl = bool(pdl) and pdl_supported(device)

    @property
    def outputs(self) -> list[Tensor]:
        return [p.out for p in self.problems]

    def __call__(self) -> None:
        ref, o_ref = self._refs
        _attention_kernel[(self.num_programs,)](
            self.meta, self.scales, len(self.problems), ref, o_ref,
            NF=_NF, BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_D=self.block_d, EVEN_D=self._even_d,
            IEEE=self._ieee, PTR_ALIGN=self._ptr_align, ELT_ALIGN=self._elt_align, USE_PDL=self._pdl,
            num_warps=self.num_warps, num_stages=self.num_stages, **({"launch_pdl": True} if self._pdl else {}),
            **LAUNCH_OPTIONS,
        )


def _as_list(x, n: int, name: str) -> list:
    if isinstance(x, (list, tuple)):
        if len(x) != n:
            raise ValueError(f"grouped_attention: got {n} problems but {len(x)} values for {name}")
        return list(x)
    return [x] * n


def grouped_attention(qs, ks=None, vs=None, heads=None, causal=False, scale=None, **op_kwargs) -> list[Tensor]:
    """Allocate outputs, build a :class:`GroupedAttention` and run it once; returns the outputs.

    Either ``grouped_attention([AttentionProblem, ...])`` (outputs given) or
    ``grouped_attention(qs, ks, vs, heads, causal=False, scale=None)`` with per-problem lists of
    [B, S, H*Dh] tensors; ``heads``/``causal``/``scale`` are one value or one per problem.
    """
    qs = list(qs)
    if qs and all(isinstance(p, AttentionProblem) for p in qs):
        op = GroupedAttention(qs, **op_kwargs)
        op()
        return op.outputs
    n = len(qs)
    if ks is None or vs is None or heads is None:
        raise ValueError("grouped_attention: expected a list of AttentionProblem, or qs, ks, vs and heads")
    ks, vs = list(ks), list(vs)
    if len(ks) != n or len(vs) != n:
        raise ValueError(f"grouped_attention: got {n} q, {len(ks)} k and {len(vs)} v tensors")
    heads_l, causal_l, scale_l = _as_list(heads, n, "heads"), _as_list(causal, n, "causal"), _as_list(scale, n, "scale")
    problems = []
    for q, k, v, h, c, s in zip(qs, ks, vs, heads_l, causal_l, scale_l):
        if not isinstance(q, Tensor) or q.dim() != 3:
            raise ValueError(f"grouped_attention: q must be a [B, S, H*Dh] tensor, got {q!r:.80}")
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        problems.append(AttentionProblem(q, k, v, out, h, c, s))
    op = GroupedAttention(problems, **op_kwargs)
    op()
    return op.outputs

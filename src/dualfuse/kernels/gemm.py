"""Grouped GEMM: `out_i = act(x_i @ w_i.T + bias_i) + residual_i` for several problems in ONE launch.

Optionally with the LayerNorm before it folded in (vertical fusion, `fold_layernorm`):
`out_i = act(LN(x_i) @ w_i.T + bias_i) + residual_i` without an LN launch or a normalized copy of x: the
LN's scale and shift are folded into the weight and bias once and the epilogue applies each row's mean and
rstd. The row statistics come from the launch that wrote x (`row_stats_out`: every output tile leaves its
rows' mean and sum of squared deviations; the folded GEMM merges the parts, Chan et al.), or, without them,
from a pass over the program's x rows before its K loop. Measured on H100/H200 (BENCHMARKS.md) the folded
GEMMs cost about what the LayerNorm launches they replace cost under PDL, so the fused executor leaves it off
by default.

Why: the two towers of a dual encoder do the same step (QKV, out-proj, FC1, FC2) on different shapes.
At batch 1 each step is tiny (M = 50 / 77 rows), so the time is launch gaps, per-program latency and
streaming the weights; one launch that covers both towers halves the launches and lets the tiles of both
towers share the SMs.

Layout (Liger-Kernel style: kernel + launcher + glue):
- `_grouped_linear_kernel`: one program = one (problem, output tile, K split). Per-problem pointers,
  sizes and strides are kernel arguments for up to 4 problems (no metadata load on the critical path:
  a program issues its first weight loads at once); above 4 problems they come from an int64 table on
  the device. A program finds its problem by comparing its id with the problems' first program ids.
- `GroupedLinear`: validates once, builds the arguments, picks block config and split-K, allocates the
  split-K workspace; `__call__` only launches (no sync, no allocation) so a CUDA graph can capture it.
- `grouped_linear(...)`: convenience wrapper for one-off calls.

Skinny M (batch 1, and ViT-L/14's 257 rows): a launch is latency-bound. The config comes from a small
cost model (_estimate_us, fitted to H200 timings): all programs in ONE wave, the streamed bytes (weight
tile AND x rows: narrow N tiles re-read x) spread over as many SMs as possible, split-K only where the
tiles are too few (it costs ~3 memory round trips). The epilogue operands (bias, residual) are loaded
before the K loop so their latency hides behind it, and each program asks L2 for its first two weight
steps before waiting on the previous launch. Many rows (batch 32): 128x256 or 64x128 tiles by tile count
and K, no split-K.

Tensor-descriptor (TMA) loads (sm_90+, config "tma"): x and W tiles come through one host-built descriptor per
problem instead of per-element addresses and masks (out-of-bounds rows and columns arrive as zeros). On by default
at batch 32 (-11..-15% per layer on an H200) and at batch 1 where every problem has <= 128 rows; sm_80/87 (Jetson
Orin) keep the pointer loads.

Programmatic dependent launch (sm_90+, on by default where Triton supports it): every program lets the
next launch start at once, and waits (gdc_wait) for the previous one only before it touches activations,
outputs or workspace, so launch latency and ragged tails overlap between consecutive GEMMs. Kernels of
other modules launched without PDL are ordered as usual. config={"pdl": False} turns it off.

Split-K reduction, one launch, no memset node, replay-safe, correct with `residual is out` (only the
last-arriving program of a tile writes out). Two modes (config "split_reduce"):
- "ordered" (default): every split program stores its fp32 partial to its own workspace slot and bumps
  a per-tile counter; the last to arrive loads all S partials with several loads in flight at once and
  sums them in split order 0..S-1: the same bits on every replay (deterministic).
- "atomic": every split program adds its partial into one zeroed fp32 tile (fp32 atomics), then bumps
  the counter; the last reads that one tile and stores zeros back (ready for the next launch). Fewer
  bytes for the last program (1 tile, not S): 1.4 µs/layer faster on ViT-B/32 batch 1 (H200), but the
  fp32 addition order varies between runs: results agree to rounding, not bitwise.
The last program resets the counter to 0 in both modes.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._utils import activation_code, apply_activation, device_smem_bytes, is_interpreter, l2_cache_bytes, num_sms
from ._utils import gdc_launch as _gdc_launch
from ._utils import gdc_wait as _gdc_wait
from ._utils import pdl_supported, scalar_bool

try:  # host-side tensor descriptors (Triton >= 3.4): the optional TMA path
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

__all__ = ["FoldedLayerNorm", "LinearProblem", "GroupedLinear", "fold_layernorm", "grouped_linear", "row_stats_buffer"]

@triton.jit
def _prefetch_l2(ptrs):
    """Ask L2 for the lines at ptrs (no registers, no shared memory held; sm_20+ PTX)."""
    tl.inline_asm_elementwise("mov.u32 $0, 0;\n\tprefetch.global.L2 [$1];", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


# ---------------------------------------------------------------------------------------------------
# per-problem fields: kernel arguments (<= 4 problems) or one int64 table row per problem (> 4)
# (rows sorted by work per program, heaviest first)
# ---------------------------------------------------------------------------------------------------
# (tl.constexpr globals: kernels may only read constexpr globals; the host uses .value)
_F_X, _F_W, _F_OUT, _F_BIAS, _F_RES = (tl.constexpr(i) for i in range(5))  # addresses (bias/res: x's if absent)
_F_M, _F_N, _F_K = tl.constexpr(5), tl.constexpr(6), tl.constexpr(7)
_F_SXM, _F_SOM, _F_SRM = tl.constexpr(8), tl.constexpr(9), tl.constexpr(10)  # row strides (elements): x, out, res
_F_FLAGS = tl.constexpr(11)  # act code (bits 0-3) | 16 bias | 32 residual | 64 LN | 128 stats out | 256 stats in
#                                 | 512 partial sums (out is [S, M, N] fp32: raw per-split sums, no epilogue)
_F_START = tl.constexpr(12)  # first program id of this problem
_F_SPLIT = tl.constexpr(13)  # number of K splits S (1 = no split-K)
_F_IPS = tl.constexpr(14)  # K iterations (of BLOCK_K) per split
_F_WS = tl.constexpr(15)  # fp32 element offset of this problem's split-K workspace
_F_CNT = tl.constexpr(16)  # offset of this problem's tile counters
_F_NORM = tl.constexpr(17)  # address of the folded LayerNorm's fp32 column sums (x's if absent)
_F_EPS = tl.constexpr(18)  # the folded LayerNorm's eps, float64 bits (kernel arguments: the float)
_F_SOUT = tl.constexpr(19)  # address of the row statistics this problem writes of its out (x's if absent)
_F_SIN = tl.constexpr(20)  # address of the row statistics of x its folded LayerNorm reads (x's if absent)
_F_SPW = tl.constexpr(21)  # columns per part of those statistics (the producing launch's BLOCK_N; 16 if absent)
_NF = tl.constexpr(22)
_FLAG_BIAS, _FLAG_RES, _FLAG_NORM, _FLAG_STATS_OUT, _FLAG_STATS_IN, _FLAG_PARTIAL = 16, 32, 64, 128, 256, 512
MAX_ARG_PROBLEMS = 4  # up to this many problems travel as kernel arguments
_ARG_FIELDS = ("xa", "wa", "oa", "ba", "ra", "M", "N", "K", "sx", "so", "sr", "fl", "st", "S", "ips", "wso", "cno",
               "na", "ep", "sa", "sb", "sw")
# per-problem scalars that vary between steps and gain nothing from Triton's value specialization: not
# specialized (one binary serves every step of a model). Addresses, N, K and row strides keep it: their
# divisibility by 16 is what lets the loads be 16 bytes wide (a tl.multiple_of on a kernel argument is
# dropped by the compiler: an argument has no defining op to carry the hint).
_NO_SPEC = [f"{f}{i}" for i in range(MAX_ARG_PROBLEMS) for f in ("M", "fl", "st", "S", "ips", "wso", "cno", "ep", "sw")]


@triton.jit
def _pick(g, v0, v1, v2, v3, NUM_PROBLEMS: tl.constexpr):
    """Problem g's value of a per-problem scalar argument (branch-free select)."""
    r = v0 + g * 0  # a tensor even where v0 was specialized to a constant (an argument equal to 1)
    if NUM_PROBLEMS > 1:
        r = tl.where(g == 1, v1, r)
    if NUM_PROBLEMS > 2:
        r = tl.where(g == 2, v2, r)
    if NUM_PROBLEMS > 3:
        r = tl.where(g == 3, v3, r)
    return r


@triton.jit
def _tma_k_loop(x_desc, w_desc, off_m, off_n, k_lo, k_hi, acc, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc += x[off_m:, k_lo*BK:k_hi*BK] @ w[off_n:, same].T by tensor descriptors (blocks [BM, BK] and [BN, BK])."""
    for kk in range(k_lo, k_hi):
        a = x_desc.load([off_m, kk * BLOCK_K])
        b = w_desc.load([off_n, kk * BLOCK_K])
        acc = tl.dot(a, b.T, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit(do_not_specialize=_NO_SPEC)
def _grouped_linear_kernel(
    meta_ptr,  # int64 [G, _NF] per-problem table (read only when not META_IN_ARGS), see _F_* above
    ws_ptr,  # fp32 split-K workspace (ordered: per tile [S, BLOCK_M, BLOCK_N]; atomic: per tile [BLOCK_M, BLOCK_N])
    cnt_ptr,  # int32 per split tile arrival counters; 0 between launches (the last arrival resets)
    x_ref,  # problem 0's x: only its dtype is used (the real pointers are the per-problem fields)
    out_ref,  # problem 0's out: dtype of every out / residual
    bias_ref,  # a bias (or x when no problem has one): dtype of every bias
    xa0, wa0, oa0, ba0, ra0, M0, N0, K0, sx0, so0, sr0, fl0, st0, S0, ips0, wso0, cno0, na0, ep0, sa0, sb0, sw0,
    xa1, wa1, oa1, ba1, ra1, M1, N1, K1, sx1, so1, sr1, fl1, st1, S1, ips1, wso1, cno1, na1, ep1, sa1, sb1, sw1,
    xa2, wa2, oa2, ba2, ra2, M2, N2, K2, sx2, so2, sr2, fl2, st2, S2, ips2, wso2, cno2, na2, ep2, sa2, sb2, sw2,
    xa3, wa3, oa3, ba3, ra3, M3, N3, K3, sx3, so3, sr3, fl3, st3, S3, ips3, wso3, cno3, na3, ep3, sa3, sb3, sw3,
    dx0, dw0, dx1, dw1, dx2, dw2, dx3, dw3,  # USE_TMA: per problem, tensor descriptors of x [M, K] and w [N, K]
    NUM_PROBLEMS: tl.constexpr,
    META_IN_ARGS: tl.constexpr,  # NUM_PROBLEMS <= 4: fields are the arguments above, else the table
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,  # every K % BLOCK_K == 0: no K masks in the main loop
    ALIGNED: tl.constexpr,  # all pointers 16-byte aligned; row strides and N, K multiples of 16 bytes
    VEC_IN: tl.constexpr,  # 16 // sizeof(input element)
    VEC_OUT: tl.constexpr,  # 16 // sizeof(output element)
    EARLY_EPI: tl.constexpr,  # load bias / residual before the K loop (small tiles: latency hidden)
    ANY_SPLIT: tl.constexpr,  # some problem uses split-K reduced in this launch
    ANY_PARTIAL: tl.constexpr,  # some problem stores raw per-split partial sums (partial_sums=True)
    ATOMIC_REDUCE: tl.constexpr,  # split-K partials summed by fp32 atomics (else ordered, deterministic)
    RED_CHUNK: tl.constexpr,  # ordered reduction: partial tiles loaded at once (1, 2 or 4)
    INPUT_PRECISION: tl.constexpr,  # tl.dot input_precision ("ieee" for fp32 inputs by default)
    PREFETCH: tl.constexpr,  # L2 prefetch of this program's weights at its start: 0 off, -1 all, n first n steps
    PF_LINES: tl.constexpr,  # 128-byte lines per weight row per BLOCK_K step (>= 1)
    USE_PDL: tl.constexpr,  # launched with programmatic dependent launch (sm_90+)
    NORM: tl.constexpr,  # some problem has a folded LayerNorm
    NORM_PREPASS: tl.constexpr,  # ... whose row statistics come from a pass over x before the K loop
    NORM_STATS_IN: tl.constexpr,  # ... whose row statistics come from the launch that wrote x (per-part, merged)
    MAX_PARTS: tl.constexpr,  # power of two >= the parts of any statistics read
    STATS_OUT: tl.constexpr,  # some problem writes per-tile row statistics of its out (for the next LN fold)
    USE_TMA: tl.constexpr,  # x and w tiles by tensor descriptors (TMA on sm_90+): no per-element addresses or masks
):
    pid = tl.program_id(0)
    if USE_PDL:
        _gdc_launch()  # the next launch may start its programs (they wait for all of this one to finish)

    # ---- which problem, and its fields ----
    if META_IN_ARGS:
        g = pid * 0
        if NUM_PROBLEMS > 1:
            g += (pid >= st1).to(tl.int32)
        if NUM_PROBLEMS > 2:
            g += (pid >= st2).to(tl.int32)
        if NUM_PROBLEMS > 3:
            g += (pid >= st3).to(tl.int32)
        x_addr = _pick(g, xa0, xa1, xa2, xa3, NUM_PROBLEMS).to(tl.int64)
        w_addr = _pick(g, wa0, wa1, wa2, wa3, NUM_PROBLEMS).to(tl.int64)
        o_addr = _pick(g, oa0, oa1, oa2, oa3, NUM_PROBLEMS).to(tl.int64)
        b_addr = _pick(g, ba0, ba1, ba2, ba3, NUM_PROBLEMS).to(tl.int64)
        r_addr = _pick(g, ra0, ra1, ra2, ra3, NUM_PROBLEMS).to(tl.int64)
        M = _pick(g, M0, M1, M2, M3, NUM_PROBLEMS).to(tl.int32)
        N = _pick(g, N0, N1, N2, N3, NUM_PROBLEMS).to(tl.int32)
        K = _pick(g, K0, K1, K2, K3, NUM_PROBLEMS).to(tl.int32)
        stride_xm = _pick(g, sx0, sx1, sx2, sx3, NUM_PROBLEMS).to(tl.int64)
        stride_om = _pick(g, so0, so1, so2, so3, NUM_PROBLEMS).to(tl.int64)
        stride_rm = _pick(g, sr0, sr1, sr2, sr3, NUM_PROBLEMS).to(tl.int64)
        flags = _pick(g, fl0, fl1, fl2, fl3, NUM_PROBLEMS).to(tl.int32)
        start = _pick(g, st0, st1, st2, st3, NUM_PROBLEMS).to(tl.int32)
        S = _pick(g, S0, S1, S2, S3, NUM_PROBLEMS).to(tl.int32)
        ips = _pick(g, ips0, ips1, ips2, ips3, NUM_PROBLEMS).to(tl.int32)
        ws_off = _pick(g, wso0, wso1, wso2, wso3, NUM_PROBLEMS).to(tl.int64)
        cnt_off = _pick(g, cno0, cno1, cno2, cno3, NUM_PROBLEMS).to(tl.int32)
        n_addr = _pick(g, na0, na1, na2, na3, NUM_PROBLEMS).to(tl.int64)
        eps = _pick(g, ep0, ep1, ep2, ep3, NUM_PROBLEMS).to(tl.float32)
        so_addr = _pick(g, sa0, sa1, sa2, sa3, NUM_PROBLEMS).to(tl.int64)
        si_addr = _pick(g, sb0, sb1, sb2, sb3, NUM_PROBLEMS).to(tl.int64)
        spw = _pick(g, sw0, sw1, sw2, sw3, NUM_PROBLEMS).to(tl.int32)
    else:
        g = pid * 0
        for i in tl.static_range(1, NUM_PROBLEMS):
            g += (pid >= tl.load(meta_ptr + i * _NF + _F_START)).to(tl.int32)
        row = meta_ptr + g * _NF
        x_addr = tl.load(row + _F_X)
        w_addr = tl.load(row + _F_W)
        o_addr = tl.load(row + _F_OUT)
        b_addr = tl.load(row + _F_BIAS)
        r_addr = tl.load(row + _F_RES)
        M = tl.load(row + _F_M).to(tl.int32)
        N = tl.load(row + _F_N).to(tl.int32)
        K = tl.load(row + _F_K).to(tl.int32)
        stride_xm = tl.load(row + _F_SXM)
        stride_om = tl.load(row + _F_SOM)
        stride_rm = tl.load(row + _F_SRM)
        flags = tl.load(row + _F_FLAGS).to(tl.int32)
        start = tl.load(row + _F_START).to(tl.int32)
        S = tl.load(row + _F_SPLIT).to(tl.int32)
        ips = tl.load(row + _F_IPS).to(tl.int32)
        ws_off = tl.load(row + _F_WS)
        cnt_off = tl.load(row + _F_CNT).to(tl.int32)
        n_addr = tl.load(row + _F_NORM)
        eps = tl.load(row + _F_EPS).to(tl.float64, bitcast=True).to(tl.float32)
        so_addr = tl.load(row + _F_SOUT)
        si_addr = tl.load(row + _F_SIN)
        spw = tl.load(row + _F_SPW).to(tl.int32)

    in_ty = x_ref.dtype.element_ty
    out_ty = out_ref.dtype.element_ty
    x_ptr = x_addr.to(tl.pointer_type(in_ty))  # [M, K], row stride stride_xm
    w_ptr = w_addr.to(tl.pointer_type(in_ty))  # [N, K] contiguous (nn.Linear layout)
    out_ptr = o_addr.to(tl.pointer_type(out_ty))  # [M, N]; partial sums: fp32 [S, M, N]
    bias_ptr = b_addr.to(tl.pointer_type(bias_ref.dtype.element_ty))  # [N] (x's address when absent: never read)
    res_ptr = r_addr.to(tl.pointer_type(out_ty))  # [M, N], may be out itself (x's address when absent)
    colsum_ptr = n_addr.to(tl.pointer_type(tl.float32))  # [N] folded LayerNorm column sums (x's when absent)
    # row statistics, fp32 [rows, cdiv(cols, 16), 2]: per part of a row (the producer's BLOCK_N columns) its
    # mean and sum of squared deviations (Chan et al.: merged exactly and stably by the reader)
    stats_out_ptr = so_addr.to(tl.pointer_type(tl.float32))  # [M, cdiv(N, 16), 2] (x's when absent)
    stats_in_ptr = si_addr.to(tl.pointer_type(tl.float32))  # [M, cdiv(K, 16), 2] (x's when absent)
    if ALIGNED:  # lets the compiler use 16-byte loads/stores (values from arguments/memory carry no hints)
        x_ptr = tl.multiple_of(x_ptr, 16)
        w_ptr = tl.multiple_of(w_ptr, 16)
        out_ptr = tl.multiple_of(out_ptr, 16)
        bias_ptr = tl.multiple_of(bias_ptr, 16)
        res_ptr = tl.multiple_of(res_ptr, 16)
        stride_xm = tl.multiple_of(stride_xm, VEC_IN)
        stride_om = tl.multiple_of(stride_om, VEC_OUT)
        stride_rm = tl.multiple_of(stride_rm, VEC_OUT)
        K = tl.multiple_of(K, VEC_IN)
        N = tl.multiple_of(N, VEC_IN if VEC_IN > VEC_OUT else VEC_OUT)  # n masks constant over 16 bytes
    act = flags & 15
    # runtime scalars that gate bool-block masks: through scalar_bool (a bool under the interpreter too)
    has_bias = scalar_bool((flags & 16) != 0)
    has_res = scalar_bool((flags & 32) != 0)
    has_norm = scalar_bool((flags & 64) != 0)
    has_stats_out = scalar_bool((flags & 128) != 0)
    has_stats_in = scalar_bool((flags & 256) != 0)

    # ---- (tile, split) of this program; tiles in GROUP_M-grouped order for L2 reuse ----
    local = pid - start
    tile = local // S
    split = local % S
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * tiles_n
    first_m = (tile // width) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (tile % width) % group_m
    pid_n = (tile % width) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    out_mask = m_mask[:, None] & n_mask[None, :]
    # x rows past M are masked: at batch 1 a BLOCK_M tile is mostly padding and masked lanes cost no
    # memory traffic. Weight rows past N wrap around instead (in bounds, no mask); never stored.
    rm = tl.where(m_mask, offs_m, 0)
    rn = offs_n % N

    k_lo = split * ips
    k_hi = tl.minimum(k_lo + ips, tl.cdiv(K, BLOCK_K))
    if PREFETCH != 0:
        # ask L2 for this program's weight lines now (before gdc_wait: overlapped with the previous
        # launch's drain under PDL); the pipelined loads below then find them in (or on their way to) L2.
        # PREFETCH < 0: the whole slice; > 0: its first PREFETCH BLOCK_K steps (what the pipeline's
        # prologue asks for first).
        PF_STEP: tl.constexpr = BLOCK_K // PF_LINES
        offs_pf = tl.arange(0, PF_LINES) * PF_STEP
        pf_rows = w_ptr + rn[:, None].to(tl.int64) * K
        pf_hi = k_hi
        if PREFETCH > 0:
            pf_hi = tl.minimum(k_hi, k_lo + PREFETCH)
        for kk in range(k_lo, pf_hi):
            _prefetch_l2(pf_rows + tl.minimum(kk * BLOCK_K + offs_pf, K - 1)[None, :])
    if EARLY_EPI:
        # issued now, consumed after the K loop: their latency hides behind it. Bias is never written by
        # a kernel: safe before gdc_wait
        bias = tl.load(bias_ptr + offs_n, mask=n_mask & has_bias, other=0.0)
    if NORM:
        # column sums of the folded weight (weights: safe before gdc_wait)
        colsum = tl.load(colsum_ptr + offs_n, mask=n_mask & has_norm, other=0.0)
    if USE_PDL:
        _gdc_wait()  # the previous launch is complete and its writes visible from here on
    if NORM_STATS_IN:
        # the statistics of x the launch that wrote it left per part; issued now, merged after the K loop
        n_parts = tl.cdiv(K, spw)
        offs_p = tl.arange(0, MAX_PARTS)
        p_ok = offs_p < n_parts
        s_ptrs = stats_in_ptr + rm[:, None].to(tl.int64) * (tl.cdiv(K, 16) * 2) + offs_p[None, :] * 2
        s_mask = (m_mask & has_norm & has_stats_in)[:, None] & p_ok[None, :]
        part_mean = tl.load(s_ptrs, mask=s_mask, other=0.0)
        part_m2 = tl.load(s_ptrs + 1, mask=s_mask, other=0.0)
    if NORM_PREPASS:
        # row statistics of x in a pass over this program's rows before the K loop (a problem with a folded
        # LayerNorm and no statistics given never splits K, so the program covers whole rows). Shifted by each row's first element:
        # E[(x-s)^2] - E[x-s]^2 stays accurate when |mean| >> std. Accumulating them inside the K loop from
        # the dot's A tiles (or a second load of them) instead gave WRONG results on an H100 with the skinny
        # configs (Triton 3.6; right under the interpreter and at batch 32) and was slower there anyway.
        pre = m_mask & has_norm & scalar_bool((flags & 256) == 0)
        shift = tl.load(x_ptr + rm * stride_xm, mask=pre, other=0.0).to(tl.float32)
        row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        row_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for kk in range(k_lo, k_hi):
            k_ok = (kk * BLOCK_K + offs_k) < K
            xs = tl.load(x_ptr + rm[:, None] * stride_xm + (kk * BLOCK_K + offs_k)[None, :],
                         mask=pre[:, None] & k_ok[None, :], other=0.0)
            d = tl.where(k_ok[None, :], xs.to(tl.float32) - shift[:, None], 0.0)
            row_sum += tl.sum(d, axis=1)
            row_sq += tl.sum(d * d, axis=1)
    if EARLY_EPI:
        # safe with residual is out: only the last program of this tile writes out, after its own read here
        res = tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], mask=out_mask & has_res, other=0.0)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if USE_TMA:
        # one tensor-memory copy per tile and step; rows past M / N and columns past K arrive as zeros
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        if g == 0:
            acc = _tma_k_loop(dx0, dw0, off_m, off_n, k_lo, k_hi, acc, BLOCK_K, INPUT_PRECISION)
        if NUM_PROBLEMS > 1:
            if g == 1:
                acc = _tma_k_loop(dx1, dw1, off_m, off_n, k_lo, k_hi, acc, BLOCK_K, INPUT_PRECISION)
        if NUM_PROBLEMS > 2:
            if g == 2:
                acc = _tma_k_loop(dx2, dw2, off_m, off_n, k_lo, k_hi, acc, BLOCK_K, INPUT_PRECISION)
        if NUM_PROBLEMS > 3:
            if g == 3:
                acc = _tma_k_loop(dx3, dw3, off_m, off_n, k_lo, k_hi, acc, BLOCK_K, INPUT_PRECISION)
    else:
        x_ptrs = x_ptr + rm[:, None] * stride_xm + (k_lo * BLOCK_K + offs_k)[None, :]  # [BLOCK_M, BLOCK_K]
        w_ptrs = w_ptr + rn[None, :].to(tl.int64) * K + (k_lo * BLOCK_K + offs_k)[:, None]  # [BLOCK_K, BLOCK_N] = w.T
        for kk in range(k_lo, k_hi):
            if EVEN_K:
                a = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
                b = tl.load(w_ptrs)
            else:
                k_left = K - kk * BLOCK_K
                a = tl.load(x_ptrs, mask=m_mask[:, None] & (offs_k[None, :] < k_left), other=0.0)
                b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K

    # ---- split-K: park the partial, the last of the S programs of this tile reduces ----
    if ANY_SPLIT or ANY_PARTIAL:
        is_last = pid >= 0  # (true; a runtime value, as the branches below assign)
    else:
        is_last = True
    if ANY_PARTIAL:
        if (flags & 512) != 0:
            # deferred reduction: the raw partial goes to out[split]; the launch that reads out (a LayerNorm
            # with `add`) sums the S slices and applies bias and residual, so no counter, no tail here
            p_ptrs = out_ptr + split.to(tl.int64) * M * stride_om + offs_m[:, None] * stride_om + offs_n[None, :]
            tl.store(p_ptrs, acc.to(out_ty), mask=out_mask)
            is_last = pid < 0
    if ANY_SPLIT:
        if (S > 1) & is_last:
            TILE: tl.constexpr = BLOCK_M * BLOCK_N
            offs_tile = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
            ws_off = tl.multiple_of(ws_off, TILE)  # true by construction
            rows = m_mask[:, None]  # only rows < M: at batch 1 most of a BLOCK_M tile is padding
            if ATOMIC_REDUCE:
                ws_tile = ws_ptr + ws_off + tile.to(tl.int64) * TILE
                tl.atomic_add(ws_tile + offs_tile, acc, mask=rows, sem="relaxed", scope="gpu")
            else:
                ws_tile = ws_ptr + ws_off + tile.to(tl.int64) * S * TILE
                tl.store(ws_tile + split * TILE + offs_tile, acc, mask=rows)
            tl.debug_barrier()  # all threads' partial writes happen before the (single-thread) release
            cnt = cnt_ptr + cnt_off + tile
            arrived = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
            is_last = arrived == S - 1
            if is_last:
                if ATOMIC_REDUCE:
                    acc = tl.load(ws_tile + offs_tile, mask=rows, other=0.0, cache_modifier=".cg")
                    tl.store(ws_tile + offs_tile, tl.zeros_like(acc), mask=rows)  # zeroed for the next launch
                else:
                    # fixed order 0..S-1 whoever arrives last -> bitwise reproducible. RED_CHUNK partials
                    # in flight at once (one L2 round trip per chunk, not per split). .cg: read at L2.
                    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                    for t0 in range(0, S, RED_CHUNK):
                        p0 = tl.load(ws_tile + t0 * TILE + offs_tile, mask=rows, other=0.0, cache_modifier=".cg")
                        if RED_CHUNK > 1:
                            p1 = tl.load(ws_tile + (t0 + 1) * TILE + offs_tile, mask=rows & scalar_bool(t0 + 1 < S),
                                         other=0.0, cache_modifier=".cg")
                        if RED_CHUNK > 2:
                            p2 = tl.load(ws_tile + (t0 + 2) * TILE + offs_tile, mask=rows & scalar_bool(t0 + 2 < S),
                                         other=0.0, cache_modifier=".cg")
                            p3 = tl.load(ws_tile + (t0 + 3) * TILE + offs_tile, mask=rows & scalar_bool(t0 + 3 < S),
                                         other=0.0, cache_modifier=".cg")
                        acc += p0
                        if RED_CHUNK > 1:
                            acc += p1
                        if RED_CHUNK > 2:
                            acc += p2
                            acc += p3
                tl.atomic_xchg(cnt, 0)  # ready for the next launch / graph replay

    # ---- epilogue: [LayerNorm] -> bias -> activation -> residual -> store ----
    if is_last:
        if NORM:
            # LN(x) @ W.T + b == rstd * (x @ W'.T - mean * colsum(W')) + b', W' = W * gamma, b' = W @ beta + b
            k_f = K.to(tl.float32)
            mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
            var = tl.zeros((BLOCK_M,), dtype=tl.float32)
            if NORM_PREPASS:
                mean_s = row_sum / k_f
                var = tl.maximum(row_sq / k_f - mean_s * mean_s, 0.0)
                mean = mean_s + shift
            if NORM_STATS_IN:
                cnt = tl.where(p_ok, tl.minimum(spw, K - offs_p * spw), 0).to(tl.float32)  # columns per part
                mean_p = tl.sum(part_mean * cnt[None, :], axis=1) / k_f
                dev = part_mean - mean_p[:, None]
                var_p = tl.sum(part_m2 + cnt[None, :] * dev * dev, axis=1) / k_f
                mean = tl.where(has_stats_in, mean_p, mean)
                var = tl.where(has_stats_in, var_p, var)
            rstd = 1.0 / tl.sqrt(var + eps)
            normed = rstd[:, None] * (acc - mean[:, None] * colsum[None, :])
            acc = tl.where(has_norm, normed, acc)
        if not EARLY_EPI:
            bias = tl.load(bias_ptr + offs_n, mask=n_mask & has_bias, other=0.0)
        acc += bias.to(tl.float32)[None, :]
        acc = apply_activation(acc, act)
        if not EARLY_EPI:
            # read before this program's store of the same elements: in-place `hidden += proj` is safe
            res = tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], mask=out_mask & has_res,
                          other=0.0)
        acc += res.to(tl.float32)
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(out_ptrs, acc.to(out_ty), mask=out_mask)
        if STATS_OUT:
            # this tile's share of out's row statistics (of the values as stored), for a LayerNorm folded into
            # the GEMM that reads out next: mean and sum of squared deviations over this tile's columns
            v = tl.where(n_mask[None, :], acc.to(out_ty).to(tl.float32), 0.0)
            cnt_n = tl.minimum(BLOCK_N, N - pid_n * BLOCK_N).to(tl.float32)
            t_mean = tl.sum(v, axis=1) / cnt_n
            dv = tl.where(n_mask[None, :], v - t_mean[:, None], 0.0)
            t_m2 = tl.sum(dv * dv, axis=1)
            sp = stats_out_ptr + offs_m.to(tl.int64) * (tl.cdiv(N, 16) * 2) + pid_n * 2
            tl.store(sp, t_mean, mask=m_mask & has_stats_out)
            tl.store(sp + 1, t_m2, mask=m_mask & has_stats_out)


# ---------------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------------
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


def fold_layernorm(weight: torch.Tensor, bias: torch.Tensor | None, ln_weight: torch.Tensor,
                   ln_bias: torch.Tensor | None, eps: float, dtype: torch.dtype | None = None):
    """Fold ``LayerNorm(x; ln_weight, ln_bias, eps)`` into the linear layer after it.

    ``LN(x) @ W.T + b = rstd * (x @ W'.T - mean * colsum(W')) + b'`` with ``W' = W * ln_weight`` (per input
    column) and ``b' = W @ ln_bias + b``; the GEMM accumulates each row's mean and rstd from the x tiles it
    loads anyway and applies them in the epilogue. Computed in fp32, stored in ``dtype`` (default: weight's);
    colsum sums the stored W', so the mean term cancels what the GEMM really multiplies.
    Returns ``(folded_weight [N, K], folded_bias [N], FoldedLayerNorm)`` for a :class:`LinearProblem`."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"fold_layernorm: weight must be a 2-D [N, K] tensor, got {_shape_or_type(weight)}")
    n, k = weight.shape
    for name, t, size in (("bias", bias, n), ("ln_weight", ln_weight, k), ("ln_bias", ln_bias, k)):
        if t is None and name != "ln_weight":
            continue
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (size,):
            raise ValueError(f"fold_layernorm: {name} must be a [{size}] tensor, got {_shape_or_type(t)}")
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


def _shape_or_type(t) -> str:
    return _shape(t) if isinstance(t, torch.Tensor) else type(t).__name__


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CONFIG_KEYS = {
    "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages",
    "num_sms",  # SMs the split-K heuristic aims to fill (e.g. a green context's count)
    "programs_per_sm",  # split-K aims for num_sms * this many programs
    "min_k_iters",  # a split gets at least this many BLOCK_K iterations
    "input_precision",  # tl.dot input_precision for fp32 inputs ("ieee" default, "tf32", "tf32x3")
    "max_split",  # split-K: at most this many splits per problem
    "split_reduce",  # split-K reduction: "ordered" (default, deterministic) or "atomic" (fp32 atomics)
    "early_epilogue",  # load bias/residual before the K loop (default: tiles <= 128 x 64 and few M tiles)
    "prefetch",  # L2 prefetch of each program's weights at its start: False, True (all), n (first n K steps);
    # default 2 for skinny M, off for many rows
    "pdl",  # programmatic dependent launch (default True; used where supported: sm_90+, Triton with launch_pdl)
    "tma",  # x / w tiles by tensor descriptors (default: on for many rows, and for skinny M where every problem has
    # <= 128 rows; used where _tma_supported: <= 4 problems, 16-bit, 16-byte aligned rows, Triton with
    # TensorDescriptor, sm_90+ GPU or the interpreter)
}


def _prefetch_steps(v) -> int:
    if v is True:
        return -1
    if v is False or v is None:
        return 0
    if not isinstance(v, int) or v < 0:
        raise ValueError(f"config prefetch must be a bool or an int >= 0 (BLOCK_K steps), got {v!r}")
    return v


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
        raise ValueError(f"{what} must be a contiguous fp32 {list(want)} tensor ({hint}), got {_shape_or_type(t)}")


def _validate(problems) -> None:
    if not isinstance(problems, (list, tuple)) or len(problems) == 0:
        raise ValueError(f"expected a non-empty list of LinearProblem, got {problems!r}")
    first = None
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
        if x.dtype not in _DTYPES:
            raise ValueError(f"{where}: x dtype must be one of fp16/bf16/fp32, got {x.dtype}")
        if w.dtype != x.dtype:
            raise ValueError(f"{where}: weight dtype must equal x dtype {x.dtype}, got {w.dtype}")
        if out.dtype not in _DTYPES:
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
                                 f"{_shape_or_type(b)}")
            if b.dtype != x.dtype:
                raise ValueError(f"{where}: bias dtype must equal x dtype {x.dtype}, got {b.dtype}")
        activation_code(p.activation)  # raises ValueError on an unknown name
        if p.residual is not None:
            r = p.residual
            if not isinstance(r, torch.Tensor) or r.dim() != 2 or tuple(r.shape) != (M, N):
                raise ValueError(f"{where}: residual must be [M={M}, N={N}], got "
                                 f"{_shape_or_type(r)}")
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
                raise ValueError(f"{where}: norm.colsum must be a contiguous fp32 [N={N}] tensor, got {_shape_or_type(c)}")
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
                   ("norm.stats", p.norm.stats if p.norm is not None else None), ("row_stats_out", p.row_stats_out)]
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


def _tma_supported(problems, device, aligned: bool) -> bool:
    """Tensor-descriptor loads apply: a Triton with TensorDescriptor, an sm_90+ GPU (or the interpreter), <= 4
    problems (descriptors travel as kernel arguments), 16-bit inputs, 16-byte aligned rows, 2-D x and w with
    unit column stride."""
    if TensorDescriptor is None or len(problems) > MAX_ARG_PROBLEMS or not aligned:
        return False
    if problems[0].x.element_size() != 2:
        return False
    if not is_interpreter() and (device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9):
        return False
    return all(p.x.stride(1) == 1 and p.weight.stride(1) == 1 for p in problems)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _smem_bytes(cfg: dict, elt: int) -> int:
    """Shared memory a config needs: pipelined A/B tiles, or the fp32 epilogue tile if larger."""
    pipe = cfg["num_stages"] * (cfg["BLOCK_M"] + cfg["BLOCK_N"]) * cfg["BLOCK_K"] * elt
    return max(pipe, cfg["BLOCK_M"] * cfg["BLOCK_N"] * 4)


def _is_skinny(dims, device) -> bool:
    """Few rows (batch 1): too few 128x128 output tiles to fill the SMs, or every M <= 128."""
    tiles128 = sum(triton.cdiv(m, 128) * triton.cdiv(n, 128) for m, n, _ in dims)
    return max(m for m, _, _ in dims) <= 128 or tiles128 < num_sms(device)


def _fit_smem(cfg: dict, elt: int, device) -> dict:
    limit = device_smem_bytes(device)
    while cfg["num_stages"] > 2 and _smem_bytes(cfg, elt) > limit:
        cfg["num_stages"] -= 1
    while _smem_bytes(cfg, elt) > limit and cfg["BLOCK_N"] > 32:
        cfg["BLOCK_N"] //= 2
    while _smem_bytes(cfg, elt) > limit and cfg["BLOCK_K"] > 32:
        cfg["BLOCK_K"] //= 2
    return cfg


# ---- batch-1 cost model: picks the skinny config. One launch ~ T_LAUNCH + waves * T_PROGRAM + (programs
# per SM) * max(streamed bytes / SM_BYTES_PER_US, padded FLOPs / SM_FLOP_PER_US) + split tail. A program's
# streamed bytes are its weight tile AND its x rows (each N tile re-reads x: narrow tiles cost L2
# traffic); at batch 1 a program streams at ~75 GB/s (latency-bound: a few pipeline stages in flight), so
# spreading the bytes over all SMs in ONE wave matters more than anything else. The split tail (partial
# store, arrival atomic, partial loads) costs ~3 round trips. Fitted to cold-L2 single-launch timings of
# 36 configs x 8 steps (ViT-B/32, ViT-L/14 at batch 1) on an H200; the pick was within 3% of the best
# measured config on average (benchmarks/NOTES-gemm.md).
_T_LAUNCH, _T_PROGRAM, _T_SPLIT, _T_SPLIT_EACH = 2.5, 2.5, 2.5, 0.5  # µs
_SM_BYTES_PER_US, _SM_FLOP_PER_US = 75e3, 3e6
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) the model chooses from (BLOCK_M 64 entries shrink for M <= 32)
_SKINNY_TILES = ((64, 64, 128, 4, 4), (64, 32, 128, 4, 5), (128, 128, 64, 8, 4), (64, 128, 64, 4, 5),
                 (128, 64, 128, 8, 4), (128, 32, 128, 4, 5))
# (programs_per_sm, min_k_iters, max_split): no split-K, or split-K to about one program per SM
_SKINNY_SPLITS = ((0, 1, 1), (1, 2, 8), (1, 4, 4))
# L2 prefetch of each program's first 2 BLOCK_K steps of weights, issued before gdc_wait: under PDL their
# DRAM latency overlaps the previous launch's drain. Measured (H200, in graphs): -1.4 µs/layer ViT-B/32,
# -0.9 ViT-L/14 at batch 1; the whole slice (True) was slower (+2 .. +12 µs/layer), 4 steps no better.
_SKINNY_PREFETCH = 2


def _estimate_us(dims, cfg: dict, splits, elt: int, sms: int, smem_limit: int) -> float:
    """Modelled µs of one skinny launch (see the constants above)."""
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    ctas = max(1, min(smem_limit // _smem_bytes(cfg, elt), 65536 // (cfg["num_warps"] * 32 * 200)))
    programs, t_prog, max_s = 0, 0.0, 1
    for (m, n, k), s in zip(dims, splits):
        tiles_m = triton.cdiv(m, bm)
        iters = max(1, triton.cdiv(k, bk))
        ips = triton.cdiv(iters, max(1, s))
        s_eff = triton.cdiv(iters, ips)
        max_s = max(max_s, s_eff)
        programs += tiles_m * triton.cdiv(n, bn) * s_eff
        stream = ips * bk * elt * (bn + m / tiles_m) / _SM_BYTES_PER_US  # masked x rows move no bytes
        compute = 2 * bm * bn * bk * ips / (_SM_FLOP_PER_US * (1.0 if bn >= 64 else 0.75 if bn == 32 else 0.5))
        t_prog = max(t_prog, stream, compute)
    t = _T_LAUNCH + triton.cdiv(programs, sms * ctas) * _T_PROGRAM + triton.cdiv(programs, sms) * t_prog
    if max_s > 1:
        t += _T_SPLIT + _T_SPLIT_EACH * (max_s - 1)
    return t


def _skinny_configs(max_m: int) -> list[dict]:
    out = []
    for bm, bn, bk, warps, stages in _SKINNY_TILES:
        if bm == 64 and max_m <= 32:
            bm = max(16, _next_pow2(max_m))
        for pps, mki, cap in _SKINNY_SPLITS:
            c = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages,
                     programs_per_sm=pps, min_k_iters=mki, max_split=cap, prefetch=_SKINNY_PREFETCH)
            if c not in out:
                out.append(c)
    return out


def _ranked_skinny(dims, elt, device, base=None, nosplit=None) -> list[tuple[float, dict]]:
    """Skinny configs (fitting the device's shared memory), best modelled first."""
    sms, limit = num_sms(device), device_smem_bytes(device)
    ranked = []
    for c in _skinny_configs(max(m for m, _, _ in dims)):
        c = {**c, **(base or {})}
        if _smem_bytes(c, elt) > limit:
            continue
        ranked.append((_estimate_us(dims, c, _choose_splits(dims, c, device, None, nosplit), elt, c.get("num_sms") or sms,
                                    limit), c))
    ranked.sort(key=lambda t: t[0])  # stable: ties keep the table's order
    return ranked


def _default_config(problems, device, base: dict | None = None) -> dict:
    """Heuristic block config by shape. Small fixed tiles under the interpreter (fast tests). base: the
    caller's overrides (e.g. num_sms of a green context), which the skinny model ranks with."""
    elt = problems[0].x.element_size()
    dims = [(p.x.shape[0], p.weight.shape[0], p.x.shape[1]) for p in problems]
    max_m = max(m for m, _, _ in dims)
    if device.type != "cuda":
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
    if elt == 4:  # fp32 inputs ("ieee" dot = FMA path): correctness use, keep tiles modest
        cfg = dict(BLOCK_M=min(64, max(16, _next_pow2(max_m))), BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4,
                   num_stages=3)
    elif _is_skinny(dims, device):
        ranked = _ranked_skinny(dims, elt, device, base, _nosplit(problems))
        if ranked:
            cfg = dict(ranked[0][1])
        else:
            cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3, programs_per_sm=0,
                       prefetch=_SKINNY_PREFETCH)
        # TMA loads where every problem has <= 128 rows (ViT-B/32 batch 1: -3..-4% per layer on an H200); with more
        # rows (ViT-B/16, L/14, SigLIP at batch 1: 196..257) they were 1-5% slower there
        cfg["tma"] = max_m <= 128
        return cfg
    else:
        # many rows (batch 32): 128 x 256 tiles where there are enough of them for ~2.5 waves (or long K
        # amortises a ragged last wave), else 64 x 128 (3 programs per SM smooth a ragged wave). Measured
        # per step on an H200 (NOTES-gemm.md). No split-K.
        sms = num_sms(device)
        tiles256 = sum(triton.cdiv(m, 128) * triton.cdiv(n, 256) for m, n, _ in dims)
        k_avg = sum(k for _, _, k in dims) / len(dims)
        if tiles256 >= 2.5 * sms or (k_avg >= 2048 and tiles256 >= 1.5 * sms):
            cfg = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
        else:
            cfg = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)
        cfg["programs_per_sm"] = 0
        # tensor-descriptor loads where the card has TMA (sm_90+; else pointer loads): 10-14% less time per layer
        # at batch 32 on an H200 for all four architectures (BENCHMARKS.md); at batch 1 they were -4%..+5%
        cfg["tma"] = True
    return _fit_smem(cfg, elt, device)


def _nosplit(problems) -> list[bool]:
    """Problems that must keep all of K in one program: a folded LayerNorm without given statistics computes
    them from whole rows of x."""
    return [p.norm is not None and p.norm.stats is None for p in problems]


def _choose_splits(dims, cfg, device, split_k, nosplit=None) -> list[int]:
    """K splits per problem. dims: [(M, N, K)]. split_k: None (auto), int (all), or list (per problem).
    nosplit: per problem, True = never split (folded LayerNorm); an explicit split_k > 1 there is an error.

    Auto: no split while the output tiles of all problems fill the SMs (or programs_per_sm == 0); below
    that (skinny M), split so the launch has ~num_sms * programs_per_sm programs of about equal K work: a
    problem with 4x the K gets 4x the splits (work-proportional), no split gets fewer than min_k_iters
    BLOCK_K steps, and no problem more than max_split splits."""
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    tiles = [triton.cdiv(m, bm) * triton.cdiv(n, bn) for m, n, _ in dims]
    iters = [max(1, triton.cdiv(k, bk)) for _, _, k in dims]
    if split_k is not None:
        ks = [split_k] * len(dims) if isinstance(split_k, int) else list(split_k)
        if len(ks) != len(dims) or any(not isinstance(s, int) or s < 1 for s in ks):
            raise ValueError(f"split_k must be None, an int >= 1 or one int >= 1 per problem, got {split_k!r}")
        out = [min(s, it) for s, it in zip(ks, iters)]
        bad = [i for i, s in enumerate(out) if s > 1 and nosplit and nosplit[i]]
        if bad:
            raise ValueError(f"split_k: problem(s) {bad} have a folded LayerNorm, which needs all of K in one "
                             f"program; give them split 1 (a per-problem list), got {split_k!r}")
        return out
    sms = cfg.get("num_sms") or num_sms(device)
    pps = cfg.get("programs_per_sm", 2)
    if sum(tiles) >= sms or not pps:
        return [1] * len(dims)
    target = sms * pps
    work = sum(t * it for t, it in zip(tiles, iters))
    per_split = max(cfg.get("min_k_iters", 4), work / target)
    cap = cfg.get("max_split", 64)
    out = [max(1, min(cap, it, int(it / per_split + 0.5))) for it in iters]
    return [1 if nosplit and nosplit[i] else s for i, s in enumerate(out)]


def _float_bits(v: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(v)))[0]


def _bits_float(v: int) -> float:
    return struct.unpack("<d", struct.pack("<q", int(v)))[0]


class _Plan:
    """Everything one launch needs: per-problem fields, workspace, grid, constexprs. Built once."""

    def __init__(self, problems, cfg: dict, splits: list[int], outs=None):
        device = problems[0].x.device
        outs = outs if outs is not None else [p.out for p in problems]
        bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
        x_dtype = problems[0].x.dtype
        atomic = cfg.get("split_reduce", "ordered") == "atomic"

        rows = []
        for i, (p, out) in enumerate(zip(problems, outs)):
            M, K = p.x.shape
            N = p.weight.shape[0]
            iters = triton.cdiv(K, bk)
            s = max(1, min(splits[i], iters)) if iters > 0 else 1
            ips = triton.cdiv(iters, s) if iters > 0 else 0
            s = triton.cdiv(iters, ips) if iters > 0 else 1  # drop empty splits
            if p.partial_sums and s != out.shape[0]:
                raise ValueError(
                    f"problem {i}: partial_sums out has {out.shape[0]} slices, but K={K} in steps of BLOCK_K={bk} "
                    f"({iters} steps) splits into {s} non-empty parts; allocate [S, M, N] with S = "
                    f"GroupedLinear.partial_slices(K, S, BLOCK_K) (here {s}) or pass a matching split")
            tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
            rows.append(dict(i=i, p=p, out=out, M=M, N=N, K=K, S=s, ips=ips, tiles=tiles))
        # heaviest programs get the lowest ids: they start first (longest-processing-time-first)
        rows.sort(key=lambda r: -r["ips"])
        self.splits = [0] * len(rows)
        fields, start, ws_off, cnt_off = [], 0, 0, 0
        for r in rows:
            p, out = r["p"], r["out"]
            self.splits[r["i"]] = r["S"]
            m = [0] * _NF.value
            m[_F_X.value], m[_F_W.value], m[_F_OUT.value] = p.x.data_ptr(), p.weight.data_ptr(), out.data_ptr()
            # absent bias / residual: a valid address (x's) that the masked loads never read
            m[_F_BIAS.value] = (p.bias if p.bias is not None else p.x).data_ptr()
            m[_F_RES.value] = (p.residual if p.residual is not None else p.x).data_ptr()
            m[_F_M.value], m[_F_N.value], m[_F_K.value] = r["M"], r["N"], r["K"]
            m[_F_SXM.value], m[_F_SOM.value] = p.x.stride(0), out.stride(-2)
            m[_F_SRM.value] = p.residual.stride(0) if p.residual is not None else 0
            m[_F_FLAGS.value] = (activation_code(p.activation) | (_FLAG_BIAS if p.bias is not None else 0)
                                 | (_FLAG_RES if p.residual is not None else 0)
                                 | (_FLAG_NORM if p.norm is not None else 0)
                                 | (_FLAG_STATS_OUT if p.row_stats_out is not None else 0)
                                 | (_FLAG_STATS_IN if p.norm is not None and p.norm.stats is not None else 0)
                                 | (_FLAG_PARTIAL if p.partial_sums else 0))
            m[_F_START.value], m[_F_SPLIT.value], m[_F_IPS.value] = start, r["S"], r["ips"]
            m[_F_WS.value], m[_F_CNT.value] = ws_off, cnt_off
            m[_F_NORM.value] = (p.norm.colsum if p.norm is not None else p.x).data_ptr()
            m[_F_EPS.value] = _float_bits(p.norm.eps if p.norm is not None else 1.0)  # 1.0: unused, finite
            stats_in = p.norm.stats if p.norm is not None else None
            m[_F_SOUT.value] = (p.row_stats_out if p.row_stats_out is not None else p.x).data_ptr()
            m[_F_SIN.value] = (stats_in if stats_in is not None else p.x).data_ptr()
            m[_F_SPW.value] = p.norm.stats_part_width if stats_in is not None else 16
            start += r["tiles"] * r["S"]
            if r["S"] > 1 and not p.partial_sums:
                ws_off += r["tiles"] * (1 if atomic else r["S"]) * bm * bn
                cnt_off += r["tiles"]
            fields.append(m)
        self.num_programs = start
        self.meta_in_args = len(rows) <= MAX_ARG_PROBLEMS
        self.meta = torch.tensor(fields if not self.meta_in_args else [[0] * _NF.value], dtype=torch.int64,
                                 device=device)
        # atomic: partials are added into zeroed tiles (the last program zeroes its tile again); ordered:
        # every slot is written before it is read
        self.ws = (torch.zeros if atomic else torch.empty)(max(ws_off, 1), dtype=torch.float32, device=device)
        self.cnt = torch.zeros(max(cnt_off, 1), dtype=torch.int32, device=device)  # last arrival resets
        padded = fields[:MAX_ARG_PROBLEMS] + [fields[0]] * (MAX_ARG_PROBLEMS - min(len(fields), MAX_ARG_PROBLEMS))
        # kernel arguments carry eps as a float (the table as its float64 bits)
        scalars = [_bits_float(v) if j == _F_EPS.value else v for m in padded for j, v in enumerate(m)]

        ptrs = [t for p, out in zip(problems, outs) for t in (p.x, p.weight, out, p.bias, p.residual) if t is not None]
        strides = [(p.x.stride(0), p.x.element_size()) for p in problems]
        strides += [(p.weight.shape[1], p.weight.element_size()) for p in problems]
        strides += [(o.stride(-2), o.element_size()) for o in outs]
        strides += [(o.shape[-1], e) for o in outs for e in (o.element_size(), problems[0].x.element_size())]
        strides += [(p.residual.stride(0), p.residual.element_size()) for p in problems if p.residual is not None]
        aligned = all(t.data_ptr() % 16 == 0 for t in ptrs) and all((s * e) % 16 == 0 for s, e in strides)
        bias_ref = next((p.bias for p in problems if p.bias is not None), problems[0].x)
        interp = is_interpreter() or device.type != "cuda"
        use_pdl = bool(cfg.get("pdl", True)) and pdl_supported(device)
        any_split = any(r["S"] > 1 and not r["p"].partial_sums for r in rows)
        any_partial = any(r["p"].partial_sums for r in rows)
        max_tiles_m = max(triton.cdiv(r["M"], bm) for r in rows)
        warps = cfg["num_warps"]
        per_thread = bm * bn // (32 * warps)  # fp32 accumulator elements per thread
        use_tma = bool(cfg.get("tma", False)) and _tma_supported(problems, device, aligned)
        descs = [None] * (2 * MAX_ARG_PROBLEMS)
        if use_tma:  # in the kernel's problem order (rows), padded with problem 0's
            for j in range(MAX_ARG_PROBLEMS):
                p = rows[j]["p"] if j < len(rows) else rows[0]["p"]
                descs[2 * j] = TensorDescriptor.from_tensor(p.x, [bm, bk])
                descs[2 * j + 1] = TensorDescriptor.from_tensor(p.weight, [bn, bk])
        self.args = (self.meta, self.ws, self.cnt, problems[0].x, outs[0], bias_ref, *scalars, *descs)
        self.constexprs = dict(
            NUM_PROBLEMS=len(rows),
            META_IN_ARGS=self.meta_in_args,
            BLOCK_M=bm,
            BLOCK_N=bn,
            BLOCK_K=bk,
            GROUP_M=cfg["GROUP_M"],
            EVEN_K=all(r["K"] % bk == 0 for r in rows),
            ALIGNED=aligned,
            VEC_IN=16 // problems[0].x.element_size(),
            VEC_OUT=16 // outs[0].element_size(),
            EARLY_EPI=bool(cfg.get("early_epilogue", bm * bn <= 128 * 64 and max_tiles_m <= 8)),
            ANY_SPLIT=any_split,
            ANY_PARTIAL=any_partial,
            ATOMIC_REDUCE=atomic and any_split,
            RED_CHUNK=(4 if per_thread <= 32 else 2 if per_thread <= 64 else 1) if any_split else 1,
            INPUT_PRECISION=cfg.get("input_precision", "ieee") if x_dtype == torch.float32 else "tf32",
            PREFETCH=0 if interp else _prefetch_steps(cfg.get("prefetch", False)),
            PF_LINES=max(1, bk * problems[0].x.element_size() // 128),
            USE_PDL=use_pdl,
            NORM=any(p.norm is not None for p in problems),
            NORM_PREPASS=any(p.norm is not None and p.norm.stats is None for p in problems),
            NORM_STATS_IN=any(p.norm is not None and p.norm.stats is not None for p in problems),
            MAX_PARTS=_next_pow2(max([triton.cdiv(p.x.shape[1], p.norm.stats_part_width) for p in problems
                                      if p.norm is not None and p.norm.stats is not None] or [1])),
            STATS_OUT=any(p.row_stats_out is not None for p in problems),
            USE_TMA=use_tma,
        )
        self.launch_opts = dict(num_warps=warps, num_stages=cfg["num_stages"])
        if use_pdl:
            self.launch_opts["launch_pdl"] = True
        self.grid = (self.num_programs,)

    def warmup(self):
        """Compile and load without running, so the first __call__ can be captured by a CUDA graph."""
        if self.num_programs and not is_interpreter():
            ck = _grouped_linear_kernel.warmup(*self.args, grid=self.grid, **self.constexprs, **self.launch_opts)
            init = getattr(ck, "_init_handles", None)
            if init is not None:
                init()  # module load onto the device now, not lazily inside a graph capture

    def launch(self):
        if self.num_programs:
            _grouped_linear_kernel[self.grid](*self.args, **self.constexprs, **self.launch_opts)


class GroupedLinear:
    """All problems in ONE kernel launch.

    Built once (validates, builds the per-problem fields, picks config, allocates any split-K workspace);
    calling it only launches — no host<->device sync, no allocation, so a CUDA graph can capture
    __call__ and replay it. Pointers are baked in: the tensors in the problems must stay alive and be
    reused (static buffers).

    split_k: None = heuristic; an int forces that many K splits on every problem (clamped to its K
    iterations); a list gives one per problem. config: overrides of the heuristic block config, keys
    in _CONFIG_KEYS. tune=True (CUDA only): time candidate configs once (cold L2, on scratch outputs)
    and keep the fastest (cached per shape signature); `tune_table` then lists every candidate's time.

    Determinism: with the default split_reduce="ordered" every call gives the same bits; with
    config={"split_reduce": "atomic"} split-K problems agree between calls to fp32 rounding only.

    One GroupedLinear must not run concurrently with itself (its split-K workspace and counters are
    per object); different objects may run on different streams. Problems in one launch must not write
    memory another problem of the same launch reads (except residual is out, which is supported).
    """

    def __init__(self, problems: list[LinearProblem], *, split_k=None, config: dict | None = None,
                 tune: bool = False):
        _validate(problems)
        self.problems = list(problems)
        device = self.problems[0].x.device
        if config is not None:
            if not isinstance(config, dict) or not set(config) <= _CONFIG_KEYS:
                raise ValueError(f"config must be a dict with keys from {sorted(_CONFIG_KEYS)}, got {config!r}")
            _prefetch_steps(config.get("prefetch", False))
            if config.get("split_reduce", "ordered") not in ("ordered", "atomic"):
                raise ValueError(f"config split_reduce must be 'ordered' or 'atomic', got {config['split_reduce']!r}")
        self.tune_table = None
        if tune and any(p.partial_sums for p in self.problems):
            raise ValueError("tune=True does not support partial_sums problems: the slices of their out fix the "
                             "split; tune the launch without partial_sums, then pass its config")
        if tune and device.type == "cuda":
            cfg, split_k, self.tune_table = _tune(self.problems, config or {}, split_k)
        else:
            cfg = {**_default_config(self.problems, device, config), **(config or {})}
        for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
            v = cfg[k]
            if not isinstance(v, int) or v < 16 or v & (v - 1):
                raise ValueError(f"config {k} must be a power of two >= 16, got {v!r}")
        dims = [(p.x.shape[0], p.weight.shape[0], p.x.shape[1]) for p in self.problems]
        self.config = cfg
        splits = _choose_splits(dims, cfg, device, split_k, _nosplit(self.problems))
        # partial-sums problems split into as many parts as their out has slices (checked by _Plan)
        splits = [p.out.shape[0] if p.partial_sums else s for p, s in zip(self.problems, splits)]
        self._plan = _Plan(self.problems, cfg, splits)
        self.splits = self._plan.splits  # K splits per problem, in the caller's order
        self.num_programs = self._plan.num_programs
        self._plan.warmup()

    @property
    def outputs(self) -> list[torch.Tensor]:
        return [p.out for p in self.problems]

    @staticmethod
    def partial_slices(K: int, split: int, block_k: int) -> int:
        """Slices a partial_sums out needs when K (in steps of block_k) is split `split` ways: empty parts are
        dropped, so this can be less than `split`."""
        iters = max(1, triton.cdiv(K, block_k))
        s = max(1, min(split, iters))
        return triton.cdiv(iters, triton.cdiv(iters, s))

    @property
    def uses_tma(self) -> bool:
        """Whether the launch loads x / w tiles by tensor descriptors (config "tma" where _tma_supported)."""
        return bool(self._plan.constexprs["USE_TMA"])

    @property
    def block_n(self) -> int:
        """Columns per output tile: the part width of the row statistics this launch writes (row_stats_out)."""
        return self.config["BLOCK_N"]

    def __call__(self) -> None:
        self._plan.launch()


def grouped_linear(xs, weights, biases=None, activations=None, residuals=None, out_dtype=None, norms=None,
                   **kwargs) -> list[torch.Tensor]:
    """Convenience: allocate outputs, build a GroupedLinear, run it once, return outputs. norms: per problem
    None or the FoldedLayerNorm of fold_layernorm (then weights/biases must be the folded ones)."""
    if not isinstance(xs, (list, tuple)) or not isinstance(weights, (list, tuple)):
        raise ValueError("xs and weights must be lists of tensors")
    n = len(xs)
    biases = [None] * n if biases is None else list(biases)
    activations = [activations] * n if activations is None or isinstance(activations, str) else list(activations)
    residuals = [None] * n if residuals is None else list(residuals)
    norms = [None] * n if norms is None else list(norms)
    if not (len(weights) == len(biases) == len(activations) == len(residuals) == len(norms) == n):
        raise ValueError(f"xs, weights, biases, activations, residuals, norms must have equal lengths, got "
                         f"{n}, {len(weights)}, {len(biases)}, {len(activations)}, {len(residuals)}, {len(norms)}")
    if out_dtype is not None and out_dtype not in _DTYPES:
        raise ValueError(f"out_dtype must be None or one of fp16/bf16/fp32, got {out_dtype}")
    problems = []
    for x, w, b, a, r, nm in zip(xs, weights, biases, activations, residuals, norms):
        if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor) or x.dim() != 2 or w.dim() != 2:
            raise ValueError(f"each x must be a 2-D [M, K] tensor and each weight a 2-D [N, K] tensor, got "
                             f"{getattr(x, 'shape', type(x).__name__)} and {getattr(w, 'shape', type(w).__name__)}")
        out = torch.empty((x.shape[0], w.shape[0]), dtype=out_dtype or x.dtype, device=x.device)
        problems.append(LinearProblem(x, w, out, bias=b, activation=a, residual=r, norm=nm))
    GroupedLinear(problems, **kwargs)()
    return [p.out for p in problems]


# ---------------------------------------------------------------------------------------------------
# optional one-time tuning (CUDA): time candidates one launch at a time with a cold L2 (as in a model
# forward, where every layer's weights come from DRAM), on scratch outputs
# ---------------------------------------------------------------------------------------------------
_TUNE_CACHE: dict = {}
_TUNE_REPS = 15


def _candidates(problems, device, base: dict) -> list[dict]:
    """Block configs x split-K settings around the heuristic (split settings don't recompile)."""
    elt = problems[0].x.element_size()
    dims = [(p.x.shape[0], p.weight.shape[0], p.x.shape[1]) for p in problems]
    bk = 64 if elt <= 2 else 32
    default = _default_config(problems, device, base)
    cands = [default]
    if elt == 4:
        pass  # fp32: correctness path, the heuristic only
    elif _is_skinny(dims, device):
        cands += [c for _, c in _ranked_skinny(dims, elt, device, base, _nosplit(problems))]
    else:
        for bm, bn, warps, stages in ((128, 256, 8, 3), (64, 128, 4, 3), (128, 128, 8, 3), (128, 128, 8, 4),
                                      (64, 128, 4, 4), (256, 128, 8, 3)):
            cands.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages,
                              programs_per_sm=0))
    limit = device_smem_bytes(device)
    out = []
    for c in cands:
        c = {**c, **base}
        if _smem_bytes(c, elt) <= limit and c not in out:
            out.append(c)
    return out


def _precompile(plans) -> None:
    """Compile the distinct binaries of several plans in threads (Triton releases the GIL for much of a
    compile, and ptxas is a subprocess): a tune over ~30 binaries takes seconds, not a minute. Errors
    are left for the serial pass to report."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    todo = {}
    for plan in plans:
        key = (tuple(sorted(plan.constexprs.items())), tuple(sorted(plan.launch_opts.items())))
        todo.setdefault(key, plan)
    if len(todo) < 2:
        return

    def one(plan):
        try:
            _grouped_linear_kernel.warmup(*plan.args, grid=plan.grid, **plan.constexprs, **plan.launch_opts)
        except Exception:
            pass

    with ThreadPoolExecutor(max_workers=max(1, min(8, (os.cpu_count() or 2) - 1))) as ex:
        list(ex.map(one, todo.values()))


_FLUSH: dict = {}


def _cold_l2(device):
    """Read a buffer twice the L2 size: evicts weights of earlier runs and leaves clean lines (a write
    flush would leave dirty lines that the timed kernel then pays to write back)."""
    buf = _FLUSH.get(device)
    if buf is None:
        buf = _FLUSH[device] = torch.ones(2 * l2_cache_bytes(device) // 2, dtype=torch.float16, device=device)
    buf.sum()


def _clocks_up(device, ms: float = 30.0) -> None:
    """Keep the GPU busy for a while (matrix products) so it is at its working clocks before timing."""
    a = torch.randn(2048, 2048, device=device, dtype=torch.float16)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    while True:
        for _ in range(20):
            a @ a
        stop.record()
        stop.synchronize()
        if start.elapsed_time(stop) >= ms:
            break


def _time_cold(plan, device, reps=_TUNE_REPS) -> float:
    """Median µs of one launch after an L2 flush. A sleep after the flush keeps the GPU busy while the
    host enqueues the events and the launch, so the time is the kernel's, not the host's."""
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for e0, e1 in ev:
        _cold_l2(device)
        torch.cuda._sleep(100_000)
        e0.record()
        plan.launch()
        e1.record()
    torch.cuda.synchronize(device)
    ts = sorted(e0.elapsed_time(e1) * 1e3 for e0, e1 in ev)
    return ts[len(ts) // 2]


def _tune(problems, base: dict, split_k):
    device = problems[0].x.device
    key = (
        torch.cuda.get_device_name(device), problems[0].x.dtype, problems[0].out.dtype, repr(sorted(base.items())),
        repr(split_k),
        tuple((p.x.shape[0], p.weight.shape[0], p.x.shape[1], p.bias is not None, p.activation,
               p.residual is not None, p.norm is not None, p.norm is not None and p.norm.stats is not None,
               p.row_stats_out is not None) for p in problems),
    )
    if key in _TUNE_CACHE:
        return _TUNE_CACHE[key]
    outs = [torch.empty_like(p.out) for p in problems]  # scratch: the real out (maybe = residual) is untouched
    dims = [(p.x.shape[0], p.weight.shape[0], p.x.shape[1]) for p in problems]
    best = (math.inf, None)
    table = []
    plans = []
    for cfg in _candidates(problems, device, base):
        try:
            plans.append((cfg, _Plan(problems, cfg, _choose_splits(dims, cfg, device, split_k, _nosplit(problems)),
                                     outs=outs)))
        except Exception as e:
            table.append(dict(config=cfg, error=f"{type(e).__name__}: {str(e)[:200]}"))
    _precompile([plan for _, plan in plans])
    _clocks_up(device)  # compiling left the GPU idle: clocks dropped; the first candidate would pay
    stream = torch.cuda.Stream(device)
    if plans:  # one discarded round: the first timed candidate still came out slow (H200, 2 of 4 cases)
        try:
            plans[0][1].warmup()
            with torch.cuda.stream(stream):
                plans[0][1].launch()
                _time_cold(plans[0][1], device, reps=5)
        except Exception:
            pass
    for cfg, plan in plans:
        try:
            plan.warmup()
            with torch.cuda.stream(stream):
                plan.launch()  # first run outside the timing (module load)
                t = _time_cold(plan, device)
        except Exception as e:  # e.g. out of resources for this config on this card: skip it
            table.append(dict(config=cfg, error=f"{type(e).__name__}: {str(e)[:200]}"))
            continue
        table.append(dict(config=cfg, splits=plan.splits, programs=plan.num_programs, us=t))
        if t < best[0]:
            best = (t, (cfg, plan.splits))
    del plans
    torch.cuda.current_stream(device).wait_stream(stream)
    if best[1] is None:
        best = (0.0, ({**_default_config(problems, device, base), **base}, split_k))
    _TUNE_CACHE[key] = (*best[1], table)
    return _TUNE_CACHE[key]

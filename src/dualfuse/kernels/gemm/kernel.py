"""The grouped-linear kernel: `out_i = act([LN](x_i) @ w_i.T + bias_i) + residual_i` for several problems.

One program = one (problem, output tile, K split). A program finds its problem by comparing its id with the
problems' first program ids, then reads the problem's fields (table.py: kernel arguments for up to
MAX_ARG_PROBLEMS problems, else a row of the device table).

The kernel body reads as its steps; each step is a @triton.jit helper defined above it, in this order (Triton
inlines them, so the compiled code is that of one body: benchmarks/kernel_ir.py compares two commits' PTX and SASS):
- problem selection: `_find_problem`, `_problem_fields` (typed pointers, sizes, flags; all tl.multiple_of hints),
  `_tile_of` (the program's tile and K split);
- the K loop: `_prefetch_weights` (L2), `_tma_dot` (tensor descriptors) or `_ptr_dot` (pointers, 16-bit or
  quantized weights, `_widen`);
- split-K: `_store_partial` (deferred reduction), `_split_k_reduce` (in-launch reduction);
- the folded LayerNorm's row statistics: `_ln_load_parts` (given by the launch that wrote x), `_ln_row_pass` (a
  pass over x), `_ln_mean_var`;
- the epilogue: `_ln_fold`, `_epilogue` (bias, activation, residual, store), `_store_row_stats`.

Tensor-descriptor (TMA) loads (USE_TMA, sm_90+): x and W tiles come through one host-built descriptor per problem
instead of per-element addresses and masks (out-of-bounds rows and columns arrive as zeros).

Programmatic dependent launch (USE_PDL, sm_90+): every program lets the next launch start at once, and waits
(gdc_wait) for the previous one only before it touches activations, outputs or workspace, so launch latency and
ragged tails overlap between consecutive GEMMs. Before gdc_wait a program reads only weights, biases, folded-LN
column sums and the table, which no kernel writes.

Split-K reduction, in the same launch, without a memset, replay-safe, correct with `residual is out` (only the
last-arriving program of a tile writes out): every split program stores its fp32 partial to its own workspace
slot and bumps a per-tile counter; the last to arrive loads all S partials, several loads in flight at once, and
sums them in split order 0..S-1, so every replay gives the same bits. It resets the counter to 0.

Weight-only quantization (ANY_WQ; a problem with FLAG_WQ): the weight is int8 (or fp8 e4m3 on sm_89+) with one
scale per output channel. Its tiles are loaded as 1-byte values and widened to the activation dtype in registers
(int8 and e4m3 values are exact in fp16 and bf16), the dot accumulates in fp32, and the scale multiplies the
accumulator right after the K loop: before the split-K partial store (a per-column scale distributes over the
split sum), before the folded LayerNorm's mean term (whose column sums are those of the dequantized weight) and
before bias / activation / residual. Quantized and 16-bit problems may share a launch (the flag picks the K loop
per program); tensor-descriptor (TMA) loads are not used in a launch with quantized weights.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .._utils import apply_activation, scalar_bool
from .._utils import gdc_launch as _gdc_launch
from .._utils import gdc_wait as _gdc_wait
from .table import (ACT_MASK, COL_BIAS, COL_CNT, COL_COLSUM, COL_EPS, COL_FLAGS, COL_ITERS, COL_K, COL_M, COL_N,
                    COL_OUT, COL_RES, COL_SPLITS, COL_START, COL_STATS_IN, COL_STATS_OUT, COL_STATS_WIDTH,
                    COL_SCALE, COL_STRIDE_OUT, COL_STRIDE_RES, COL_STRIDE_X, COL_W, COL_WS, COL_X, FLAG_BIAS,
                    FLAG_NORM, FLAG_PARTIAL, FLAG_RES, FLAG_STATS_IN, FLAG_STATS_OUT, FLAG_WQ, NO_SPEC, NUM_COLS)


# ---------------------------------------------------------------------------------------------- problem selection
@triton.jit
def _find_problem(pid, meta_ptr, st1, st2, st3, NUM_PROBLEMS: tl.constexpr, META_IN_ARGS: tl.constexpr):
    """The problem program pid belongs to: how many problems after the first start at or before pid."""
    g = pid * 0
    if META_IN_ARGS:
        if NUM_PROBLEMS > 1:
            g += (pid >= st1).to(tl.int32)
        if NUM_PROBLEMS > 2:
            g += (pid >= st2).to(tl.int32)
        if NUM_PROBLEMS > 3:
            g += (pid >= st3).to(tl.int32)
    else:
        for i in tl.static_range(1, NUM_PROBLEMS):
            g += (pid >= tl.load(meta_ptr + i * NUM_COLS + COL_START)).to(tl.int32)
    return g


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
def _field(g, f0, f1, f2, f3, col: tl.constexpr, NUM_PROBLEMS: tl.constexpr):
    """Problem g's value of column col, from the per-problem argument tuples f0..f3 (table.ARG_NAMES order)."""
    return _pick(g, f0[col], f1[col], f2[col], f3[col], NUM_PROBLEMS)


@triton.jit
def _problem_fields(g, meta_ptr, f0, f1, f2, f3, x_ref, out_ref, bias_ref, wq_ref, scale_ref,
                    NUM_PROBLEMS: tl.constexpr, META_IN_ARGS: tl.constexpr, ALIGNED: tl.constexpr,
                    VEC_IN: tl.constexpr, VEC_OUT: tl.constexpr, VEC_K: tl.constexpr, TILE: tl.constexpr):
    """Problem g's fields (table.py), from the arguments f0..f3 (META_IN_ARGS) or from row g of the table: typed
    pointers, sizes, strides, flags and split-K layout. Every tl.multiple_of hint is given here, next to the op
    that defines the value (a hint on a helper's argument or result is dropped when the helper is inlined)."""
    if META_IN_ARGS:
        x_addr = _field(g, f0, f1, f2, f3, COL_X, NUM_PROBLEMS).to(tl.int64)
        w_addr = _field(g, f0, f1, f2, f3, COL_W, NUM_PROBLEMS).to(tl.int64)
        o_addr = _field(g, f0, f1, f2, f3, COL_OUT, NUM_PROBLEMS).to(tl.int64)
        b_addr = _field(g, f0, f1, f2, f3, COL_BIAS, NUM_PROBLEMS).to(tl.int64)
        r_addr = _field(g, f0, f1, f2, f3, COL_RES, NUM_PROBLEMS).to(tl.int64)
        M = _field(g, f0, f1, f2, f3, COL_M, NUM_PROBLEMS).to(tl.int32)
        N = _field(g, f0, f1, f2, f3, COL_N, NUM_PROBLEMS).to(tl.int32)
        K = _field(g, f0, f1, f2, f3, COL_K, NUM_PROBLEMS).to(tl.int32)
        stride_xm = _field(g, f0, f1, f2, f3, COL_STRIDE_X, NUM_PROBLEMS).to(tl.int64)
        stride_om = _field(g, f0, f1, f2, f3, COL_STRIDE_OUT, NUM_PROBLEMS).to(tl.int64)
        stride_rm = _field(g, f0, f1, f2, f3, COL_STRIDE_RES, NUM_PROBLEMS).to(tl.int64)
        flags = _field(g, f0, f1, f2, f3, COL_FLAGS, NUM_PROBLEMS).to(tl.int32)
        start = _field(g, f0, f1, f2, f3, COL_START, NUM_PROBLEMS).to(tl.int32)
        S = _field(g, f0, f1, f2, f3, COL_SPLITS, NUM_PROBLEMS).to(tl.int32)
        ips = _field(g, f0, f1, f2, f3, COL_ITERS, NUM_PROBLEMS).to(tl.int32)
        ws_off = _field(g, f0, f1, f2, f3, COL_WS, NUM_PROBLEMS).to(tl.int64)
        cnt_off = _field(g, f0, f1, f2, f3, COL_CNT, NUM_PROBLEMS).to(tl.int32)
        n_addr = _field(g, f0, f1, f2, f3, COL_COLSUM, NUM_PROBLEMS).to(tl.int64)
        eps = _field(g, f0, f1, f2, f3, COL_EPS, NUM_PROBLEMS).to(tl.float32)
        so_addr = _field(g, f0, f1, f2, f3, COL_STATS_OUT, NUM_PROBLEMS).to(tl.int64)
        si_addr = _field(g, f0, f1, f2, f3, COL_STATS_IN, NUM_PROBLEMS).to(tl.int64)
        spw = _field(g, f0, f1, f2, f3, COL_STATS_WIDTH, NUM_PROBLEMS).to(tl.int32)
        q_addr = _field(g, f0, f1, f2, f3, COL_SCALE, NUM_PROBLEMS).to(tl.int64)
    else:
        row = meta_ptr + g * NUM_COLS
        x_addr = tl.load(row + COL_X)
        w_addr = tl.load(row + COL_W)
        o_addr = tl.load(row + COL_OUT)
        b_addr = tl.load(row + COL_BIAS)
        r_addr = tl.load(row + COL_RES)
        M = tl.load(row + COL_M).to(tl.int32)
        N = tl.load(row + COL_N).to(tl.int32)
        K = tl.load(row + COL_K).to(tl.int32)
        stride_xm = tl.load(row + COL_STRIDE_X)
        stride_om = tl.load(row + COL_STRIDE_OUT)
        stride_rm = tl.load(row + COL_STRIDE_RES)
        flags = tl.load(row + COL_FLAGS).to(tl.int32)
        start = tl.load(row + COL_START).to(tl.int32)
        S = tl.load(row + COL_SPLITS).to(tl.int32)
        ips = tl.load(row + COL_ITERS).to(tl.int32)
        ws_off = tl.load(row + COL_WS)
        cnt_off = tl.load(row + COL_CNT).to(tl.int32)
        n_addr = tl.load(row + COL_COLSUM)
        eps = tl.load(row + COL_EPS).to(tl.float64, bitcast=True).to(tl.float32)  # the table holds its bits
        so_addr = tl.load(row + COL_STATS_OUT)
        si_addr = tl.load(row + COL_STATS_IN)
        spw = tl.load(row + COL_STATS_WIDTH).to(tl.int32)
        q_addr = tl.load(row + COL_SCALE)

    in_ty = x_ref.dtype.element_ty
    out_ty = out_ref.dtype.element_ty
    x_ptr = x_addr.to(tl.pointer_type(in_ty))  # [M, K], row stride stride_xm
    w_ptr = w_addr.to(tl.pointer_type(in_ty))  # [N, K] contiguous (nn.Linear layout)
    wq_ptr = w_addr.to(tl.pointer_type(wq_ref.dtype.element_ty))  # [N, K] int8 / fp8: the same address, quantized
    scale_ptr = q_addr.to(tl.pointer_type(scale_ref.dtype.element_ty))  # [N] per-channel scales (x's when absent)
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
        wq_ptr = tl.multiple_of(wq_ptr, 16)
        out_ptr = tl.multiple_of(out_ptr, 16)
        bias_ptr = tl.multiple_of(bias_ptr, 16)
        res_ptr = tl.multiple_of(res_ptr, 16)
        stride_xm = tl.multiple_of(stride_xm, VEC_IN)
        stride_om = tl.multiple_of(stride_om, VEC_OUT)
        stride_rm = tl.multiple_of(stride_rm, VEC_OUT)
        K = tl.multiple_of(K, VEC_K)
        N = tl.multiple_of(N, VEC_IN if VEC_IN > VEC_OUT else VEC_OUT)  # n masks constant over 16 bytes
    ws_off = tl.multiple_of(ws_off, TILE)  # a problem's split-K workspace starts at a whole tile (by construction)
    return (x_ptr, w_ptr, wq_ptr, w_addr, scale_ptr, out_ptr, bias_ptr, res_ptr, colsum_ptr, stats_out_ptr,
            stats_in_ptr, M, N, K, stride_xm, stride_om, stride_rm, flags, start, S, ips, ws_off, cnt_off, eps, spw)


@triton.jit
def _tile_of(local, S, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(tile, split, pid_m, pid_n) of the problem's local-th program: S splits per tile, tiles in GROUP_M-grouped
    order for L2 reuse."""
    tile = local // S
    split = local % S
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * tiles_n
    first_m = (tile // width) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (tile % width) % group_m
    pid_n = (tile % width) // group_m
    return tile, split, pid_m, pid_n


# ---------------------------------------------------------------------------------------------------- K loop
@triton.jit
def _prefetch_l2(ptrs):
    """Ask L2 for the lines at ptrs (no registers, no shared memory held; sm_20+ PTX)."""
    tl.inline_asm_elementwise("mov.u32 $0, 0;\n\tprefetch.global.L2 [$1];", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _prefetch_weights(w_addr, w_ptr, rn, K, k_lo, k_hi, has_wq, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr,
                      PF_LINES: tl.constexpr, ANY_WQ: tl.constexpr, ALL_WQ: tl.constexpr, VEC_IN: tl.constexpr):
    """Ask L2 for the weight lines of this program's first PREFETCH BLOCK_K steps (rows rn, PF_LINES lines per row
    and step): what the pipeline's prologue asks for first."""
    PF_STEP: tl.constexpr = BLOCK_K // PF_LINES
    offs_pf = tl.arange(0, PF_LINES) * PF_STEP
    pf_hi = tl.minimum(k_hi, k_lo + PREFETCH)
    if ANY_WQ:
        # byte addresses: a quantized weight has 1-byte elements
        if ALL_WQ:
            w_elt = 1
        else:
            w_elt = tl.where(has_wq, 1, 16 // VEC_IN).to(tl.int64)
        pf_rows = w_addr.to(tl.pointer_type(tl.int8)) + rn[:, None].to(tl.int64) * K * w_elt
        for kk in range(k_lo, pf_hi):
            _prefetch_l2(pf_rows + tl.minimum(kk * BLOCK_K + offs_pf, K - 1)[None, :] * w_elt)
    else:
        pf_rows = w_ptr + rn[:, None].to(tl.int64) * K
        for kk in range(k_lo, pf_hi):
            _prefetch_l2(pf_rows + tl.minimum(kk * BLOCK_K + offs_pf, K - 1)[None, :])


@triton.jit
def _tma_k_loop(x_desc, w_desc, off_m, off_n, k_lo, k_hi, acc, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc += x[off_m:, k_lo*BK:k_hi*BK] @ w[off_n:, same].T by tensor descriptors (blocks [BM, BK] and [BN, BK])."""
    for kk in range(k_lo, k_hi):
        a = x_desc.load([off_m, kk * BLOCK_K])
        b = w_desc.load([off_n, kk * BLOCK_K])
        acc = tl.dot(a, b.T, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _tma_dot(g, dx0, dw0, dx1, dw1, dx2, dw2, dx3, dw3, off_m, off_n, k_lo, k_hi, acc, BLOCK_K: tl.constexpr,
             INPUT_PRECISION: tl.constexpr, NUM_PROBLEMS: tl.constexpr):
    """The K loop by problem g's tensor descriptors (dx_i: x [M, K] in [BLOCK_M, BLOCK_K] blocks, dw_i: w [N, K] in
    [BLOCK_N, BLOCK_K] blocks): one tensor-memory copy per tile and step; rows past M / N and columns past K arrive
    as zeros."""
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
    return acc


@triton.jit
def _widen(w, dtype: tl.constexpr, WIDEN_BITS: tl.constexpr):
    """A weight tile (x's dtype, int8 or fp8 e4m3) as ``dtype``, exactly. int8 -> fp16 with WIDEN_BITS: one integer op
    and one fp16 subtract per element instead of the int-to-float conversion, which sm_80..sm_90 run at 16 results
    per clock per SM, a quarter of the logic-op rate: the byte q xor 0x80 is q + 128, and under the fp16 exponent
    bits 0x64 it reads as 1024 + q + 128."""
    if WIDEN_BITS:
        if w.dtype == tl.int8:
            if dtype == tl.float16:
                u = w.to(tl.uint8, bitcast=True).to(tl.uint16) ^ 0x6480
                return u.to(tl.float16, bitcast=True) - 1152.0
    return w.to(dtype)


@triton.jit
def _ptr_k_loop(x_ptrs, w_ptrs, m_mask, offs_k, K, k_lo, k_hi, acc, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                INPUT_PRECISION: tl.constexpr, WIDEN_BITS: tl.constexpr):
    """acc += x[rows, k_lo*BK:k_hi*BK] @ w[cols, same].T by pointer loads. x_ptrs: [BLOCK_M, BLOCK_K] at k_lo;
    w_ptrs: [BLOCK_K, BLOCK_N] (w.T) at k_lo, of x's dtype or 1-byte quantized values (int8 / fp8 e4m3), which
    are widened to x's dtype in registers (exact, _widen) before the dot."""
    for kk in range(k_lo, k_hi):
        if EVEN_K:
            a = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
            b = tl.load(w_ptrs)
        else:
            k_left = K - kk * BLOCK_K
            a = tl.load(x_ptrs, mask=m_mask[:, None] & (offs_k[None, :] < k_left), other=0.0)
            b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, _widen(b, a.dtype, WIDEN_BITS), acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return acc


@triton.jit
def _ptr_dot(x_ptr, w_ptr, wq_ptr, rm, rn, m_mask, offs_k, stride_xm, K, k_lo, k_hi, flags, acc,
             BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, INPUT_PRECISION: tl.constexpr, WIDEN_BITS: tl.constexpr,
             ANY_WQ: tl.constexpr, ALL_WQ: tl.constexpr):
    """The K loop by pointer loads of x rows rm and weight rows rn: the 16-bit weight (w_ptr) or, for a problem with
    FLAG_WQ, the quantized one (wq_ptr; only that loop is compiled when ALL_WQ)."""
    x_ptrs = x_ptr + rm[:, None] * stride_xm + (k_lo * BLOCK_K + offs_k)[None, :]  # [BLOCK_M, BLOCK_K]
    w_offs = rn[None, :].to(tl.int64) * K + (k_lo * BLOCK_K + offs_k)[:, None]  # [BLOCK_K, BLOCK_N] = w.T
    if ALL_WQ:
        acc = _ptr_k_loop(x_ptrs, wq_ptr + w_offs, m_mask, offs_k, K, k_lo, k_hi, acc, BLOCK_K, EVEN_K,
                          INPUT_PRECISION, WIDEN_BITS)
    elif ANY_WQ:
        if (flags & FLAG_WQ) != 0:
            acc = _ptr_k_loop(x_ptrs, wq_ptr + w_offs, m_mask, offs_k, K, k_lo, k_hi, acc, BLOCK_K, EVEN_K,
                              INPUT_PRECISION, WIDEN_BITS)
        else:
            acc = _ptr_k_loop(x_ptrs, w_ptr + w_offs, m_mask, offs_k, K, k_lo, k_hi, acc, BLOCK_K, EVEN_K,
                              INPUT_PRECISION, WIDEN_BITS)
    else:
        acc = _ptr_k_loop(x_ptrs, w_ptr + w_offs, m_mask, offs_k, K, k_lo, k_hi, acc, BLOCK_K, EVEN_K,
                          INPUT_PRECISION, WIDEN_BITS)
    return acc


# ---------------------------------------------------------------------------------------------------- split-K
@triton.jit
def _store_partial(acc, out_ptr, split, M, stride_om, offs_m, offs_n, out_mask):
    """Deferred reduction: the raw partial goes to out[split] (out: fp32 [S, M, N]); the launch that reads out (a
    LayerNorm with `add`) sums the S slices and applies bias and residual, so no counter, no tail here."""
    p_ptrs = out_ptr + split.to(tl.int64) * M * stride_om + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(p_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _split_k_reduce(acc, ws_ptr, cnt_ptr, ws_off, cnt_off, tile, split, S, m_mask, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, RED_CHUNK: tl.constexpr):
    """Park this split's partial in the workspace (fp32 [S, BLOCK_M, BLOCK_N] per tile at ws_off) and count its
    arrival; the last of the S programs of the tile sums all partials. Returns (acc, is_last): the full sum and
    True in the last program, else its own partial and False."""
    TILE: tl.constexpr = BLOCK_M * BLOCK_N
    offs_tile = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    rows = m_mask[:, None]  # only rows < M: at batch 1 most of a BLOCK_M tile is padding
    ws_tile = ws_ptr + ws_off + tile.to(tl.int64) * S * TILE
    tl.store(ws_tile + split * TILE + offs_tile, acc, mask=rows)
    tl.debug_barrier()  # all threads' partial writes happen before the (single-thread) release
    cnt = cnt_ptr + cnt_off + tile
    arrived = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
    is_last = arrived == S - 1
    if is_last:
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
    return acc, is_last


# ------------------------------------------------------------------------------- LayerNorm statistics (folded LN)
@triton.jit
def _ln_load_parts(stats_in_ptr, rm, m_mask, has_norm, has_stats_in, K, spw, MAX_PARTS: tl.constexpr):
    """The row statistics of x that the launch which wrote it left per part of spw columns (stats_in_ptr:
    fp32 [M, cdiv(K, 16), 2], mean and sum of squared deviations), for rows rm. Returns (part_mean,
    part_m2, offs_p, p_ok): [BLOCK_M, MAX_PARTS] each, the part index and which parts exist."""
    n_parts = tl.cdiv(K, spw)
    offs_p = tl.arange(0, MAX_PARTS)
    p_ok = offs_p < n_parts
    s_ptrs = stats_in_ptr + rm[:, None].to(tl.int64) * (tl.cdiv(K, 16) * 2) + offs_p[None, :] * 2
    s_mask = (m_mask & has_norm & has_stats_in)[:, None] & p_ok[None, :]
    part_mean = tl.load(s_ptrs, mask=s_mask, other=0.0)
    part_m2 = tl.load(s_ptrs + 1, mask=s_mask, other=0.0)
    return part_mean, part_m2, offs_p, p_ok


@triton.jit
def _ln_row_pass(x_ptr, rm, stride_xm, pre, K, k_lo, k_hi, offs_k, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Row sums of x - shift and of its squares over columns k_lo*BLOCK_K .. k_hi*BLOCK_K for rows rm where pre,
    shifted by each row's first element: E[(x-s)^2] - E[x-s]^2 stays accurate when |mean| >> std. Returns
    (shift, row_sum, row_sq), [BLOCK_M] fp32 each."""
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
    return shift, row_sum, row_sq


@triton.jit
def _ln_mean_var(K, shift, row_sum, row_sq, part_mean, part_m2, offs_p, p_ok, spw, has_stats_in,
                 BLOCK_M: tl.constexpr, NORM_PREPASS: tl.constexpr, NORM_STATS_IN: tl.constexpr):
    """Each row's mean and variance over its K columns: from the pass over x (NORM_PREPASS: shift, row_sum,
    row_sq of _ln_row_pass) or, where has_stats_in, merged from the parts that the launch which wrote x left
    (NORM_STATS_IN: _ln_load_parts; Chan et al.)."""
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
    return mean, var


# ---------------------------------------------------------------------------------------------------- epilogue
@triton.jit
def _ln_fold(acc, mean, var, eps, colsum, has_norm):
    """The folded LayerNorm: LN(x) @ W.T + b == rstd * (x @ W'.T - mean * colsum(W')) + b', W' = W * gamma,
    b' = W @ beta + b (acc holds x @ W'.T; b' is the bias added after)."""
    rstd = 1.0 / tl.sqrt(var + eps)
    normed = rstd[:, None] * (acc - mean[:, None] * colsum[None, :])
    return tl.where(has_norm, normed, acc)


@triton.jit
def _store_row_stats(acc, out_ty: tl.constexpr, stats_out_ptr, offs_m, m_mask, n_mask, pid_n, N, has_stats_out,
                     BLOCK_N: tl.constexpr):
    """This tile's share of out's row statistics (of the values as stored: acc as out_ty), for a LayerNorm folded
    into the GEMM that reads out next: mean and sum of squared deviations over the tile's columns, at
    stats_out_ptr [M, cdiv(N, 16), 2] part pid_n."""
    v = tl.where(n_mask[None, :], acc.to(out_ty).to(tl.float32), 0.0)
    cnt_n = tl.minimum(BLOCK_N, N - pid_n * BLOCK_N).to(tl.float32)
    t_mean = tl.sum(v, axis=1) / cnt_n
    dv = tl.where(n_mask[None, :], v - t_mean[:, None], 0.0)
    t_m2 = tl.sum(dv * dv, axis=1)
    sp = stats_out_ptr + offs_m.to(tl.int64) * (tl.cdiv(N, 16) * 2) + pid_n * 2
    tl.store(sp, t_mean, mask=m_mask & has_stats_out)
    tl.store(sp + 1, t_m2, mask=m_mask & has_stats_out)


@triton.jit
def _load_bias(bias_ptr, offs_n, n_mask, has_bias):
    """The bias of columns offs_n (0 where masked or the problem has none). Never written by a kernel: safe to load
    before gdc_wait."""
    return tl.load(bias_ptr + offs_n, mask=n_mask & has_bias, other=0.0)


@triton.jit
def _load_residual(res_ptr, offs_m, offs_n, stride_rm, out_mask, has_res):
    """The residual tile (0 where masked or the problem has none). Safe with residual is out: only the last program
    of a tile writes out, after its own read here."""
    return tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], mask=out_mask & has_res, other=0.0)


@triton.jit
def _epilogue(acc, bias, res, act, bias_ptr, res_ptr, out_ptr, offs_m, offs_n, n_mask, out_mask, stride_rm,
              stride_om, has_bias, has_res, EARLY_EPI: tl.constexpr):
    """out = act(acc + bias) + residual, stored as out's dtype. bias and res: loaded before the K loop (EARLY_EPI),
    else None and loaded here. Returns the fp32 values stored."""
    if not EARLY_EPI:
        bias = _load_bias(bias_ptr, offs_n, n_mask, has_bias)
    acc += bias.to(tl.float32)[None, :]
    acc = apply_activation(acc, act)
    if not EARLY_EPI:
        # read before this program's store of the same elements: in-place `hidden += proj` is safe
        res = _load_residual(res_ptr, offs_m, offs_n, stride_rm, out_mask, has_res)
    acc += res.to(tl.float32)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    return acc


# ------------------------------------------------------------------------------------------------------ kernel
@triton.jit(do_not_specialize=NO_SPEC)
def grouped_linear_kernel(
    meta_ptr,  # int64 [G, NUM_COLS] per-problem table (read only when not META_IN_ARGS), see table.py
    ws_ptr,  # fp32 split-K workspace: per split tile [S, BLOCK_M, BLOCK_N]
    cnt_ptr,  # int32 per split tile arrival counters; 0 between launches (the last arrival resets)
    x_ref,  # problem 0's x: only its dtype is used (the real pointers are the per-problem fields)
    out_ref,  # problem 0's out: dtype of every out / residual
    bias_ref,  # a bias (or x when no problem has one): dtype of every bias
    wq_ref,  # a quantized weight (or x when none): dtype of every quantized weight (int8 / fp8 e4m3)
    scale_ref,  # a weight_scale (or x when none): dtype of every per-channel scale (fp32 / fp16)
    # Per-problem fields of problems 0..3: the columns COL_X .. COL_SCALE of table.py, named ARG_NAMES + index.
    # Addresses are int64 (an absent bias / residual / colsum / statistics / scales: x's, never read).
    # problem 0, in groups (problems 1..3 repeat them):
    xa0, wa0, oa0,  # addresses: x [M, K], weight [N, K] (16-bit or int8 / fp8), out [M, N] (partial: fp32 [S, M, N])
    ba0, ra0,  # addresses: bias [N], residual [M, N] (may be out)
    M0, N0, K0, sx0, so0, sr0,  # sizes; row strides (elements) of x, out, residual
    fl0, st0,  # flags: activation code | FLAG_* bits; the problem's first program id
    S0, ips0, wso0, cno0,  # split-K: K splits S, BLOCK_K steps per split; workspace (fp32 elements), counter offsets
    na0, ep0,  # folded LayerNorm: address of column sums fp32 [N], eps (float)
    sa0, sb0, sw0,  # row statistics: addresses written fp32 [M, cdiv(N, 16), 2], read [M, cdiv(K, 16), 2]; read width
    qa0,  # address of the quantized weight's per-output-channel scales [N]
    xa1, wa1, oa1, ba1, ra1, M1, N1, K1, sx1, so1, sr1, fl1, st1, S1, ips1, wso1, cno1, na1, ep1, sa1, sb1, sw1, qa1,
    xa2, wa2, oa2, ba2, ra2, M2, N2, K2, sx2, so2, sr2, fl2, st2, S2, ips2, wso2, cno2, na2, ep2, sa2, sb2, sw2, qa2,
    xa3, wa3, oa3, ba3, ra3, M3, N3, K3, sx3, so3, sr3, fl3, st3, S3, ips3, wso3, cno3, na3, ep3, sa3, sb3, sw3, qa3,
    dx0, dw0, dx1, dw1, dx2, dw2, dx3, dw3,  # USE_TMA: per problem, tensor descriptors of x [M, K] and w [N, K]
    NUM_PROBLEMS: tl.constexpr,
    META_IN_ARGS: tl.constexpr,  # NUM_PROBLEMS <= MAX_ARG_PROBLEMS: fields are the arguments above, else the table
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
    RED_CHUNK: tl.constexpr,  # split-K reduction: partial tiles loaded at once (1, 2 or 4)
    INPUT_PRECISION: tl.constexpr,  # tl.dot input_precision ("ieee" for fp32 inputs by default)
    PREFETCH: tl.constexpr,  # L2 prefetch of this program's first PREFETCH BLOCK_K steps of weights (0: off)
    PF_LINES: tl.constexpr,  # 128-byte lines per weight row per BLOCK_K step (>= 1)
    USE_PDL: tl.constexpr,  # launched with programmatic dependent launch (sm_90+)
    NORM: tl.constexpr,  # some problem has a folded LayerNorm
    NORM_PREPASS: tl.constexpr,  # ... whose row statistics come from a pass over x before the K loop
    NORM_STATS_IN: tl.constexpr,  # ... whose row statistics come from the launch that wrote x (per-part, merged)
    MAX_PARTS: tl.constexpr,  # power of two >= the parts of any statistics read
    STATS_OUT: tl.constexpr,  # some problem writes per-tile row statistics of its out (for the next LN fold)
    USE_TMA: tl.constexpr,  # x and w tiles by tensor descriptors (TMA on sm_90+): no per-element addresses or masks
    ANY_WQ: tl.constexpr,  # some problem has a quantized weight (FLAG_WQ): wq_ref's dtype, scales of scale_ref's
    ALL_WQ: tl.constexpr,  # ... every problem has one (only the quantized K loop is compiled)
    VEC_K: tl.constexpr,  # ALIGNED: every K is a multiple of this (16 where every weight is 1-byte, else VEC_IN)
    WIDEN_BITS: tl.constexpr,  # int8 weights widen to fp16 by integer ops, not conversions (_widen)
):
    pid = tl.program_id(0)
    if USE_PDL:
        _gdc_launch()  # the next launch may start its programs (they wait for all of this one to finish)

    # ---- which problem, its fields, this program's (tile, split) ----
    g = _find_problem(pid, meta_ptr, st1, st2, st3, NUM_PROBLEMS, META_IN_ARGS)
    (x_ptr, w_ptr, wq_ptr, w_addr, scale_ptr, out_ptr, bias_ptr, res_ptr, colsum_ptr, stats_out_ptr, stats_in_ptr,
     M, N, K, stride_xm, stride_om, stride_rm, flags, start, S, ips, ws_off, cnt_off, eps, spw) = _problem_fields(
        g, meta_ptr,
        (xa0, wa0, oa0, ba0, ra0, M0, N0, K0, sx0, so0, sr0, fl0, st0, S0, ips0, wso0, cno0,
         na0, ep0, sa0, sb0, sw0, qa0),
        (xa1, wa1, oa1, ba1, ra1, M1, N1, K1, sx1, so1, sr1, fl1, st1, S1, ips1, wso1, cno1,
         na1, ep1, sa1, sb1, sw1, qa1),
        (xa2, wa2, oa2, ba2, ra2, M2, N2, K2, sx2, so2, sr2, fl2, st2, S2, ips2, wso2, cno2,
         na2, ep2, sa2, sb2, sw2, qa2),
        (xa3, wa3, oa3, ba3, ra3, M3, N3, K3, sx3, so3, sr3, fl3, st3, S3, ips3, wso3, cno3,
         na3, ep3, sa3, sb3, sw3, qa3),
        x_ref, out_ref, bias_ref, wq_ref, scale_ref, NUM_PROBLEMS, META_IN_ARGS, ALIGNED, VEC_IN, VEC_OUT, VEC_K,
        BLOCK_M * BLOCK_N)
    out_ty = out_ref.dtype.element_ty
    act = flags & ACT_MASK
    # runtime scalars that gate bool-block masks: through scalar_bool (a bool under the interpreter too)
    has_bias = scalar_bool((flags & FLAG_BIAS) != 0)
    has_res = scalar_bool((flags & FLAG_RES) != 0)
    has_norm = scalar_bool((flags & FLAG_NORM) != 0)
    has_stats_out = scalar_bool((flags & FLAG_STATS_OUT) != 0)
    has_stats_in = scalar_bool((flags & FLAG_STATS_IN) != 0)
    has_wq = scalar_bool((flags & FLAG_WQ) != 0)
    tile, split, pid_m, pid_n = _tile_of(pid - start, S, M, N, BLOCK_M, BLOCK_N, GROUP_M)

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

    # ---- before gdc_wait: only what no kernel writes (weights, biases, scales, column sums) ----
    if PREFETCH > 0:
        # now, before gdc_wait: under PDL their DRAM latency overlaps the previous launch's drain, and the
        # pipelined loads below find them in (or on their way to) L2
        _prefetch_weights(w_addr, w_ptr, rn, K, k_lo, k_hi, has_wq, BLOCK_K, PREFETCH, PF_LINES, ANY_WQ, ALL_WQ,
                          VEC_IN)
    bias = None  # EARLY_EPI: loaded now, consumed after the K loop (latency hidden behind it); else in the epilogue
    if EARLY_EPI:
        bias = _load_bias(bias_ptr, offs_n, n_mask, has_bias)
    if ANY_WQ:
        # the quantized weight's per-channel scales (1.0 for a 16-bit weight: exact)
        w_scale = tl.load(scale_ptr + offs_n, mask=n_mask & has_wq, other=1.0).to(tl.float32)
    if NORM:
        colsum = tl.load(colsum_ptr + offs_n, mask=n_mask & has_norm, other=0.0)  # of the folded weight
    if USE_PDL:
        _gdc_wait()  # the previous launch is complete and its writes visible from here on

    # ---- folded LayerNorm: row statistics of x (loaded or computed now, applied in the epilogue) ----
    part_mean, part_m2, offs_p, p_ok = None, None, None, None
    if NORM_STATS_IN:
        part_mean, part_m2, offs_p, p_ok = _ln_load_parts(stats_in_ptr, rm, m_mask, has_norm, has_stats_in, K, spw,
                                                          MAX_PARTS)
    shift, row_sum, row_sq = None, None, None
    if NORM_PREPASS:
        # a problem with a folded LayerNorm and no statistics given never splits K, so the program covers whole
        # rows. Not accumulated inside the K loop from the dot's A tiles (or a second load of them): Triton 3.6
        # miscompiles that with the skinny configs on sm_90, and it is slower.
        pre = m_mask & has_norm & scalar_bool((flags & FLAG_STATS_IN) == 0)
        shift, row_sum, row_sq = _ln_row_pass(x_ptr, rm, stride_xm, pre, K, k_lo, k_hi, offs_k, BLOCK_M, BLOCK_K)
    res = None
    if EARLY_EPI:
        res = _load_residual(res_ptr, offs_m, offs_n, stride_rm, out_mask, has_res)

    # ---- the K loop ----
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if USE_TMA:
        acc = _tma_dot(g, dx0, dw0, dx1, dw1, dx2, dw2, dx3, dw3, pid_m * BLOCK_M, pid_n * BLOCK_N, k_lo, k_hi, acc,
                       BLOCK_K, INPUT_PRECISION, NUM_PROBLEMS)
    else:
        acc = _ptr_dot(x_ptr, w_ptr, wq_ptr, rm, rn, m_mask, offs_k, stride_xm, K, k_lo, k_hi, flags, acc, BLOCK_K,
                       EVEN_K, INPUT_PRECISION, WIDEN_BITS, ANY_WQ, ALL_WQ)
    if ANY_WQ:
        # dequantize: per output channel, before split-K partials, the folded LN and the epilogue
        acc = acc * w_scale[None, :]

    # ---- split-K: park the partial, the last of the S programs of this tile reduces ----
    if ANY_SPLIT or ANY_PARTIAL:
        is_last = pid >= 0  # (true; a runtime value, as the branches below assign)
    else:
        is_last = True
    if ANY_PARTIAL:
        if (flags & FLAG_PARTIAL) != 0:
            _store_partial(acc, out_ptr, split, M, stride_om, offs_m, offs_n, out_mask)
            is_last = pid < 0
    if ANY_SPLIT:
        if (S > 1) & is_last:
            acc, is_last = _split_k_reduce(acc, ws_ptr, cnt_ptr, ws_off, cnt_off, tile, split, S, m_mask, BLOCK_M,
                                           BLOCK_N, RED_CHUNK)

    # ---- epilogue: [LayerNorm] -> bias -> activation -> residual -> store [-> row statistics of out] ----
    if is_last:
        if NORM:
            mean, var = _ln_mean_var(K, shift, row_sum, row_sq, part_mean, part_m2, offs_p, p_ok, spw, has_stats_in,
                                     BLOCK_M, NORM_PREPASS, NORM_STATS_IN)
            acc = _ln_fold(acc, mean, var, eps, colsum, has_norm)
        acc = _epilogue(acc, bias, res, act, bias_ptr, res_ptr, out_ptr, offs_m, offs_n, n_mask, out_mask, stride_rm,
                        stride_om, has_bias, has_res, EARLY_EPI)
        if STATS_OUT:
            _store_row_stats(acc, out_ty, stats_out_ptr, offs_m, m_mask, n_mask, pid_n, N, has_stats_out, BLOCK_N)

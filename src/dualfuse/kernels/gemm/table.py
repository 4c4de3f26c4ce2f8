"""The per-problem fields of one grouped-linear launch, defined once for the host and the kernel.

A problem's fields are one row of ``NUM_COLS`` int64 values. Up to ``MAX_ARG_PROBLEMS`` problems they travel as
kernel arguments (``{ARG_NAMES[col]}{i}`` for problem i: no metadata load on the critical path, a program starts its
first weight loads at once); above that they come from an int64 [G, NUM_COLS] table on the device. The kernel reads
column c as ``tl.load(row + COL_...)`` (the table) or picks argument ``ARG_NAMES[c]`` (the arguments); the host
writes both from :func:`pack_row`. Rows are in the kernel's problem order (heaviest work per program first).

The column indices are ``tl.constexpr`` objects: a @triton.jit function may read a module-level global only when it
is a ``tl.constexpr`` instance (``COL_M = tl.constexpr(5)``; an annotation ``COL_M: tl.constexpr = 5`` is not
enough). They also work as list indices on the host (``row[COL_M]``).
"""
from __future__ import annotations

import struct

import triton.language as tl

from .._utils import activation_code

# addresses (bias / residual / colsum / statistics: x's when absent, a valid address the masked loads never read)
COL_X = tl.constexpr(0)  # x [M, K]
COL_W = tl.constexpr(1)  # weight [N, K]
COL_OUT = tl.constexpr(2)  # out [M, N] (partial sums: fp32 [S, M, N])
COL_BIAS = tl.constexpr(3)  # bias [N]
COL_RES = tl.constexpr(4)  # residual [M, N]
# sizes and row strides (elements)
COL_M = tl.constexpr(5)
COL_N = tl.constexpr(6)
COL_K = tl.constexpr(7)
COL_STRIDE_X = tl.constexpr(8)
COL_STRIDE_OUT = tl.constexpr(9)
COL_STRIDE_RES = tl.constexpr(10)
COL_FLAGS = tl.constexpr(11)  # activation code | FLAG_* bits
COL_START = tl.constexpr(12)  # first program id of this problem
COL_SPLITS = tl.constexpr(13)  # number of K splits S (1 = no split-K)
COL_ITERS = tl.constexpr(14)  # K iterations (of BLOCK_K) per split
COL_WS = tl.constexpr(15)  # fp32 element offset of this problem's split-K workspace
COL_CNT = tl.constexpr(16)  # offset of this problem's tile arrival counters
COL_COLSUM = tl.constexpr(17)  # address of the folded LayerNorm's fp32 column sums [N]
COL_EPS = tl.constexpr(18)  # the folded LayerNorm's eps: float64 bits in the table, the float as an argument
COL_STATS_OUT = tl.constexpr(19)  # address of the row statistics this problem writes of its out
COL_STATS_IN = tl.constexpr(20)  # address of the row statistics of x its folded LayerNorm reads
COL_STATS_WIDTH = tl.constexpr(21)  # columns per part of those statistics (the producer's BLOCK_N; 16 if absent)
COL_SCALE = tl.constexpr(22)  # address of a quantized weight's per-output-channel scales [N] (x's when absent)
NUM_COLS = tl.constexpr(23)

# kernel-argument name of each column, in column order (problem i's argument is f"{name}{i}")
ARG_NAMES = ("xa", "wa", "oa", "ba", "ra", "M", "N", "K", "sx", "so", "sr", "fl", "st", "S", "ips", "wso", "cno",
             "na", "ep", "sa", "sb", "sw", "qa")
assert len(ARG_NAMES) == NUM_COLS.value
MAX_ARG_PROBLEMS = 4  # up to this many problems travel as kernel arguments

# COL_FLAGS: bits 0-3 the activation code, then
ACT_MASK = tl.constexpr(15)
FLAG_BIAS = tl.constexpr(16)
FLAG_RES = tl.constexpr(32)
FLAG_NORM = tl.constexpr(64)  # a folded LayerNorm
FLAG_STATS_OUT = tl.constexpr(128)  # writes per-tile row statistics of out
FLAG_STATS_IN = tl.constexpr(256)  # the folded LayerNorm reads x's row statistics (else a pass over x)
FLAG_PARTIAL = tl.constexpr(512)  # out is [S, M, N] fp32: raw per-split sums, no epilogue
FLAG_WQ = tl.constexpr(1024)  # the weight is quantized (int8 / fp8, weight_scale per output channel)

# Per-problem scalars that vary between steps and gain nothing from Triton's value specialization are not
# specialized (one binary serves every step of a model). Addresses, N, K and row strides keep it: their
# divisibility by 16 is what lets the loads be 16 bytes wide (a tl.multiple_of on a kernel argument is
# dropped by the compiler: an argument has no defining op to carry the hint).
_NO_SPEC_COLS = (COL_M, COL_FLAGS, COL_START, COL_SPLITS, COL_ITERS, COL_WS, COL_CNT, COL_EPS, COL_STATS_WIDTH)
NO_SPEC = [f"{ARG_NAMES[c]}{i}" for i in range(MAX_ARG_PROBLEMS) for c in _NO_SPEC_COLS]


def float_bits(v: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(v)))[0]


def bits_float(v: int) -> float:
    return struct.unpack("<d", struct.pack("<q", int(v)))[0]


def pack_row(p, *, start: int, splits: int, iters: int, ws_off: int, cnt_off: int) -> list[int]:
    """One problem's row. p: a LinearProblem."""
    out = p.out
    x = p.x
    stats_in = p.norm.stats if p.norm is not None else None
    row = [0] * NUM_COLS.value
    row[COL_X], row[COL_W], row[COL_OUT] = x.data_ptr(), p.weight.data_ptr(), out.data_ptr()
    row[COL_BIAS] = (p.bias if p.bias is not None else x).data_ptr()
    row[COL_RES] = (p.residual if p.residual is not None else x).data_ptr()
    row[COL_M], row[COL_N], row[COL_K] = x.shape[0], p.weight.shape[0], x.shape[1]
    row[COL_STRIDE_X], row[COL_STRIDE_OUT] = x.stride(0), out.stride(-2)
    row[COL_STRIDE_RES] = p.residual.stride(0) if p.residual is not None else 0
    row[COL_FLAGS] = (activation_code(p.activation)
                      | (FLAG_BIAS.value if p.bias is not None else 0)
                      | (FLAG_RES.value if p.residual is not None else 0)
                      | (FLAG_NORM.value if p.norm is not None else 0)
                      | (FLAG_STATS_OUT.value if p.row_stats_out is not None else 0)
                      | (FLAG_STATS_IN.value if stats_in is not None else 0)
                      | (FLAG_PARTIAL.value if p.partial_sums else 0)
                      | (FLAG_WQ.value if p.weight_scale is not None else 0))
    row[COL_START], row[COL_SPLITS], row[COL_ITERS] = start, splits, iters
    row[COL_WS], row[COL_CNT] = ws_off, cnt_off
    row[COL_COLSUM] = (p.norm.colsum if p.norm is not None else x).data_ptr()
    row[COL_EPS] = float_bits(p.norm.eps if p.norm is not None else 1.0)  # 1.0: unused, finite
    row[COL_STATS_OUT] = (p.row_stats_out if p.row_stats_out is not None else x).data_ptr()
    row[COL_STATS_IN] = (stats_in if stats_in is not None else x).data_ptr()
    row[COL_STATS_WIDTH] = p.norm.stats_part_width if stats_in is not None else 16
    row[COL_SCALE] = (p.weight_scale if p.weight_scale is not None else x).data_ptr()
    return row


def kernel_args(rows: list[list[int]]) -> list:
    """The per-problem scalar arguments of the first MAX_ARG_PROBLEMS rows, padded with row 0's (never read):
    row after row, in column order; eps as the float (the table holds its float64 bits)."""
    padded = rows[:MAX_ARG_PROBLEMS] + [rows[0]] * (MAX_ARG_PROBLEMS - min(len(rows), MAX_ARG_PROBLEMS))
    return [bits_float(v) if c == COL_EPS.value else v for row in padded for c, v in enumerate(row)]

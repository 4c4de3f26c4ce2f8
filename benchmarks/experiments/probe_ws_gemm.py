"""Probe: a WEIGHT-RESIDENT skinny grouped GEMM for batch-1 dual-encoder layers (vision + text in one launch).

What it tests
-------------
At batch 1 the four GEMM steps of a layer (QKV, out-proj + residual, FC1 + quick_gelu, FC2 + residual) of both
towers cost ~21.5 us/layer with `GroupedLinear` (H200, CUDA graph, PDL) against a 12 us target, and Nsight says
each launch is latency-bound. Hypothesis: if every program loads its WHOLE weight slice (BLOCK_N rows x its K
range) BEFORE `gdc_wait()` -- weights never depend on the previous kernel, so under PDL this overlaps the
previous launch -- then after `gdc_wait()` it only has to fetch x tiles (from L2), do the dots and the epilogue.

The kernel (`_ws_kernel`) is an unrolled sequence of up to 16 K-steps: `wt0 = load`, `if STEPS > 1: wt1 = load`,
... then `gdc_wait()`, then `acc = tl.dot(x_i, wt_i, acc)` per step. Two problems per launch (program ids
[0, start1) are problem 0, the rest problem 1); each problem has its own constexprs (STEPS, BLOCK_M, K masks
only where its K range is not a whole number of BLOCK_K steps, bias / activation / residual), in two branches
of one kernel. Epilogue: bias, quick_gelu (any activation of dualfuse.kernels._utils), residual (may alias the
output: `h += proj`). Split-K: where a problem's K range exceeds the program budget (max_k elements, and the
shared-memory budget smem_kb), programs of one tile take disjoint K ranges and add fp32 partials with
`tl.atomic_add` into a zeroed workspace tile; the LAST arriving program (per-tile counter) reads the sum, zeroes
the tile and the counter again (replay-safe, one launch, no memset / follow-up epilogue kernel) and does the
epilogue. So with the default budgets only FC2 (K = 3072 / 2048) splits.

What Triton makes of the "register" tiles (--inspect --sass; same with Triton 3.6 and 3.8 for sm_90a): each
loaded W tile is stored to shared memory right after its load (the dot operand's local_alloc is moved up to the
load), so all W LDG/STS come BEFORE griddepcontrol.wait (ACQBULK) and after the wait every wgmma reads W from
shared memory: no per-step copy, but the weights are shared-memory resident, not register resident. The x tiles
go global -> registers -> shared -> wgmma. With x_all, ptxas interleaves the x loads with their shared stores in
small groups (several dependent L2 round trips, 70 registers); one x tile at a time (x_all off) issues the next
x tile's loads between this step's wgmmas (~150-180 registers). A program's shared memory (W slice + x tiles:
144-192 KB with x_all at the default budgets, 64-96 KB without) decides whether it fits on an SM beside the
previous launch's program (228 KB per SM), which PDL overlap needs; hence the smem_kb and seq variants, and the
nopdl controls.

Variants (VARIANTS below; --extra NAME:JSON adds more): BLOCK_N 32/64, BLOCK_K 64/128/256, 4/8 warps, x tiles all
at once after the wait (x_all) or one at a time (seq), 64-row text tiles, shared-memory budget (smem_kb: split K
further to fit), min_programs (split K until the launch has one program per SM), PDL off.

How to run
----------
    # CPU, Triton interpreter (fp16): correctness of the kernel on small awkward shapes
    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/experiments/probe_ws_gemm.py --check
    # CPU, no GPU needed: compile each variant for sm_90a, print registers / spills / shared memory / SASS order
    PYTHONPATH=src python benchmarks/experiments/probe_ws_gemm.py --inspect [--sass] [--variants a,b]
    # CPU: the GPU-mode pipeline (build, check against GroupedLinear, table, JSON) on toy shapes, no timing
    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/experiments/probe_ws_gemm.py --smoke --replays 3
    # GPU (H100/H200): GroupedLinear default vs every variant, 12-layer CUDA graphs, median us per layer
    PYTHONPATH=src python benchmarks/experiments/probe_ws_gemm.py --json ws.json [--model ViT-L/14] [--variants a,b]

GPU mode: ViT-B/32 batch-1 shapes (vision M=50, D=768, F=3072; text M=77, D=512, F=2048; --model ViT-L/14:
257/1024/4096 and 77/768/3072), distinct random fp16 weights per layer (layers = max(12, 3 x L2 / layer
weights), as benchmarks/kernel_bench.py), buffers and steps exactly as kernel_bench.py's 'fused' variant (its Tower
class); one CUDA graph per variant; `dualfuse.timing.time_graph` -> median us per layer over --replays
(default 200). Each variant's layer-0 outputs are compared with GroupedLinear's (max abs error, fp16) and with
an fp32 torch reference, before and after timing. A variant that fails to compile / run / check is recorded
with its error and the run goes on. Prints a table; --json PATH writes everything.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent.parent  # benchmarks/
sys.path.insert(0, str(_HERE))  # benchmarks/kernel_bench.py (Tower, MODELS)
if (_HERE.parent / "src" / "dualfuse").is_dir():
    sys.path.insert(0, str(_HERE.parent / "src"))
HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA and "--inspect" not in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit is created

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from dualfuse.kernels._utils import activation_code, apply_activation, gdc_launch, gdc_wait  # noqa: E402
from dualfuse.kernels._utils import is_interpreter, num_sms, pdl_supported  # noqa: E402

MAX_STEPS = 16  # unrolled K-steps per program (the kernel below is written out for 16)

# name: config. BLOCK_N, BLOCK_K, num_warps; max_k: K elements per program at most (more: split-K);
# smem_kb: estimated shared memory per program at most (W slice + x tiles; more: split-K); x_all: all x tiles
# of the K range loaded at once after gdc_wait (else one per step); bm_max: largest BLOCK_M (M <= bm_max: one
# row tile, BLOCK_M = next power of 2 >= M); min_programs: split K further until the launch has this many
# programs (0: no)
BASE = dict(BLOCK_N=32, BLOCK_K=128, num_warps=4, max_k=1024, smem_kb=200, x_all=True, bm_max=128, min_programs=0,
            pdl=True)
VARIANTS = {
    "n32k128w4": {},  # W slice + all x tiles in shared memory: 144-192 KB, one program per SM
    "n32k128w8": dict(num_warps=8),
    "n32k256w4": dict(BLOCK_K=256),
    "n32k64w4": dict(BLOCK_K=64),
    "n64k128w8": dict(BLOCK_N=64, num_warps=8),
    "n64k128w4": dict(BLOCK_N=64),
    "n32k128w4-bm64": dict(bm_max=64),  # text (77 rows): two 64-row tiles instead of one 128-row tile
    "n32k128w4-s100": dict(smem_kb=100),  # split K until <= ~100 KB: the next launch's program fits beside
    "n32k128w4-fill": dict(min_programs=-1),  # split K until >= one program per SM (out-proj has 40 tiles)
    "n32k128w4-seq": dict(x_all=False),  # one x tile at a time: 64-96 KB, next x load overlaps this step's MMA
    "n32k128w8-seq": dict(x_all=False, num_warps=8),
    "n32k128w4-nopdl": dict(pdl=False),  # controls: without PDL the weight loads cannot overlap the previous launch
    "n32k128w4-seq-nopdl": dict(x_all=False, pdl=False),
}
DEFAULT_VARIANTS = list(VARIANTS)


# ---------------------------------------------------------------------------------------------------
# kernel
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _w_load(w_ptrs, offs_k, k_len, I: tl.constexpr, BLOCK_K: tl.constexpr, MASK_K: tl.constexpr):
    """Step I of the program's weight slice as a [BLOCK_K, BLOCK_N] tile (the W^T view); k_len: valid K
    columns from the program's first one."""
    if MASK_K:
        return tl.load(w_ptrs + I * BLOCK_K, mask=(I * BLOCK_K + offs_k)[:, None] < k_len, other=0.0)
    else:
        return tl.load(w_ptrs + I * BLOCK_K)


@triton.jit
def _x_load(x_ptrs, m_mask, offs_k, k_len, I: tl.constexpr, BLOCK_K: tl.constexpr, MASK_K: tl.constexpr):
    """Step I of the program's x rows, [BLOCK_M, BLOCK_K]; rows past M masked (no memory traffic)."""
    if MASK_K:
        return tl.load(x_ptrs + I * BLOCK_K, mask=m_mask[:, None] & ((I * BLOCK_K + offs_k)[None, :] < k_len),
                       other=0.0)
    else:
        return tl.load(x_ptrs + I * BLOCK_K, mask=m_mask[:, None], other=0.0)


@triton.jit
def _epilogue(acc, bias, res, o_ptr, offs_m, offs_n, m_mask, n_mask, stride_om, ACT: tl.constexpr,
              HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr):
    if HAS_BIAS:
        acc += bias[None, :]
    acc = apply_activation(acc, ACT)
    if HAS_RES:
        acc += res.to(tl.float32)
    tl.store(o_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(o_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _ws_problem(local, x_ptr, w_ptr, o_ptr, b_ptr, r_ptr, ws_ptr, cnt_ptr, M, N, K, stride_xm, stride_om,
                stride_rm, S, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                STEPS: tl.constexpr, MASK_K: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
                HAS_RES: tl.constexpr, SPLIT: tl.constexpr, X_ALL: tl.constexpr, USE_PDL: tl.constexpr):
    """One program of one problem: output tile (pid_m, pid_n), K range [k0, k0 + STEPS * BLOCK_K)."""
    tiles_n = tl.cdiv(N, BLOCK_N)
    if SPLIT:
        split = local % S
        tile = local // S
    else:
        split = 0
        tile = local
    pid_m = tile // tiles_n
    pid_n = tile % tiles_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    rm = tl.where(m_mask, offs_m, 0)
    rn = offs_n % N  # weight rows past N wrap around (in bounds, no mask); those columns are never stored
    k0 = split * (STEPS * BLOCK_K)
    k_len = K - k0  # valid K columns from k0 (the masks, where MASK_K)
    w_ptrs = w_ptr + rn[None, :].to(tl.int64) * K + (k0 + offs_k)[:, None]  # [BLOCK_K, BLOCK_N]: W^T
    x_ptrs = x_ptr + rm[:, None] * stride_xm + (k0 + offs_k)[None, :]  # [BLOCK_M, BLOCK_K]

    # ---- the whole weight slice of this program, before gdc_wait (weights are never written by a kernel) ----
    wt0 = _w_load(w_ptrs, offs_k, k_len, 0, BLOCK_K, MASK_K)
    if STEPS > 1:
        wt1 = _w_load(w_ptrs, offs_k, k_len, 1, BLOCK_K, MASK_K)
    if STEPS > 2:
        wt2 = _w_load(w_ptrs, offs_k, k_len, 2, BLOCK_K, MASK_K)
    if STEPS > 3:
        wt3 = _w_load(w_ptrs, offs_k, k_len, 3, BLOCK_K, MASK_K)
    if STEPS > 4:
        wt4 = _w_load(w_ptrs, offs_k, k_len, 4, BLOCK_K, MASK_K)
    if STEPS > 5:
        wt5 = _w_load(w_ptrs, offs_k, k_len, 5, BLOCK_K, MASK_K)
    if STEPS > 6:
        wt6 = _w_load(w_ptrs, offs_k, k_len, 6, BLOCK_K, MASK_K)
    if STEPS > 7:
        wt7 = _w_load(w_ptrs, offs_k, k_len, 7, BLOCK_K, MASK_K)
    if STEPS > 8:
        wt8 = _w_load(w_ptrs, offs_k, k_len, 8, BLOCK_K, MASK_K)
    if STEPS > 9:
        wt9 = _w_load(w_ptrs, offs_k, k_len, 9, BLOCK_K, MASK_K)
    if STEPS > 10:
        wt10 = _w_load(w_ptrs, offs_k, k_len, 10, BLOCK_K, MASK_K)
    if STEPS > 11:
        wt11 = _w_load(w_ptrs, offs_k, k_len, 11, BLOCK_K, MASK_K)
    if STEPS > 12:
        wt12 = _w_load(w_ptrs, offs_k, k_len, 12, BLOCK_K, MASK_K)
    if STEPS > 13:
        wt13 = _w_load(w_ptrs, offs_k, k_len, 13, BLOCK_K, MASK_K)
    if STEPS > 14:
        wt14 = _w_load(w_ptrs, offs_k, k_len, 14, BLOCK_K, MASK_K)
    if STEPS > 15:
        wt15 = _w_load(w_ptrs, offs_k, k_len, 15, BLOCK_K, MASK_K)

    bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    if USE_PDL:
        gdc_wait()  # the previous launch is complete and its writes visible from here on
    res = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_RES:  # issued before the dots: its latency hides behind them (read before any store: h += proj is safe)
        res = tl.load(r_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], mask=m_mask[:, None] & n_mask[None, :],
                      other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if X_ALL:  # every x tile of the K range requested at once, then the dots
        xt0 = _x_load(x_ptrs, m_mask, offs_k, k_len, 0, BLOCK_K, MASK_K)
        if STEPS > 1:
            xt1 = _x_load(x_ptrs, m_mask, offs_k, k_len, 1, BLOCK_K, MASK_K)
        if STEPS > 2:
            xt2 = _x_load(x_ptrs, m_mask, offs_k, k_len, 2, BLOCK_K, MASK_K)
        if STEPS > 3:
            xt3 = _x_load(x_ptrs, m_mask, offs_k, k_len, 3, BLOCK_K, MASK_K)
        if STEPS > 4:
            xt4 = _x_load(x_ptrs, m_mask, offs_k, k_len, 4, BLOCK_K, MASK_K)
        if STEPS > 5:
            xt5 = _x_load(x_ptrs, m_mask, offs_k, k_len, 5, BLOCK_K, MASK_K)
        if STEPS > 6:
            xt6 = _x_load(x_ptrs, m_mask, offs_k, k_len, 6, BLOCK_K, MASK_K)
        if STEPS > 7:
            xt7 = _x_load(x_ptrs, m_mask, offs_k, k_len, 7, BLOCK_K, MASK_K)
        if STEPS > 8:
            xt8 = _x_load(x_ptrs, m_mask, offs_k, k_len, 8, BLOCK_K, MASK_K)
        if STEPS > 9:
            xt9 = _x_load(x_ptrs, m_mask, offs_k, k_len, 9, BLOCK_K, MASK_K)
        if STEPS > 10:
            xt10 = _x_load(x_ptrs, m_mask, offs_k, k_len, 10, BLOCK_K, MASK_K)
        if STEPS > 11:
            xt11 = _x_load(x_ptrs, m_mask, offs_k, k_len, 11, BLOCK_K, MASK_K)
        if STEPS > 12:
            xt12 = _x_load(x_ptrs, m_mask, offs_k, k_len, 12, BLOCK_K, MASK_K)
        if STEPS > 13:
            xt13 = _x_load(x_ptrs, m_mask, offs_k, k_len, 13, BLOCK_K, MASK_K)
        if STEPS > 14:
            xt14 = _x_load(x_ptrs, m_mask, offs_k, k_len, 14, BLOCK_K, MASK_K)
        if STEPS > 15:
            xt15 = _x_load(x_ptrs, m_mask, offs_k, k_len, 15, BLOCK_K, MASK_K)
        acc = tl.dot(xt0, wt0, acc)
        if STEPS > 1:
            acc = tl.dot(xt1, wt1, acc)
        if STEPS > 2:
            acc = tl.dot(xt2, wt2, acc)
        if STEPS > 3:
            acc = tl.dot(xt3, wt3, acc)
        if STEPS > 4:
            acc = tl.dot(xt4, wt4, acc)
        if STEPS > 5:
            acc = tl.dot(xt5, wt5, acc)
        if STEPS > 6:
            acc = tl.dot(xt6, wt6, acc)
        if STEPS > 7:
            acc = tl.dot(xt7, wt7, acc)
        if STEPS > 8:
            acc = tl.dot(xt8, wt8, acc)
        if STEPS > 9:
            acc = tl.dot(xt9, wt9, acc)
        if STEPS > 10:
            acc = tl.dot(xt10, wt10, acc)
        if STEPS > 11:
            acc = tl.dot(xt11, wt11, acc)
        if STEPS > 12:
            acc = tl.dot(xt12, wt12, acc)
        if STEPS > 13:
            acc = tl.dot(xt13, wt13, acc)
        if STEPS > 14:
            acc = tl.dot(xt14, wt14, acc)
        if STEPS > 15:
            acc = tl.dot(xt15, wt15, acc)
    else:  # one x tile after another (load, dot)
        acc = tl.dot(_x_load(x_ptrs, m_mask, offs_k, k_len, 0, BLOCK_K, MASK_K), wt0, acc)
        if STEPS > 1:
            acc = tl.dot(_x_load(x_ptrs, m_mask, offs_k, k_len, 1, BLOCK_K, MASK_K), wt1, acc)
        if STEPS > 2:
            acc = tl.dot(_x_load(x_ptrs, m_mask, offs_k, k_len, 2, BLOCK_K, MASK_K), wt2, acc)
        if STEPS > 3:
            acc = tl.dot(_x_load(x_ptrs, m_mask, offs_k, k_len, 3, BLOCK_K, MASK_K), wt3, acc)
        if STEPS > 4:
            acc = tl.dot(_x_load(x_ptrs, m_mask, offs_k, k_len, 4, BLOCK_K, MASK_K), wt4, acc)
        if STEPS > 5:
            acc = tl.dot(_x_load(x_ptrs, m_mask, offs_k, k_len, 5, BLOCK_K, MASK_K), wt5, acc)
        if STEPS > 6:
            acc = tl.dot(_x_load(x_ptrs, m_mask, offs_k, k_len, 6, BLOCK_K, MASK_K), wt6, acc)
        if STEPS > 7:
            acc = tl.dot(_x_load(x_ptrs, m_mask, offs_k, k_len, 7, BLOCK_K, MASK_K), wt7, acc)
        if STEPS > 8:
            acc = tl.dot(_x_load(x_ptrs, m_mask, offs_k, k_len, 8, BLOCK_K, MASK_K), wt8, acc)
        if STEPS > 9:
            acc = tl.dot(_x_load(x_ptrs, m_mask, offs_k, k_len, 9, BLOCK_K, MASK_K), wt9, acc)
        if STEPS > 10:
            acc = tl.dot(_x_load(x_ptrs, m_mask, offs_k, k_len, 10, BLOCK_K, MASK_K), wt10, acc)
        if STEPS > 11:
            acc = tl.dot(_x_load(x_ptrs, m_mask, offs_k, k_len, 11, BLOCK_K, MASK_K), wt11, acc)
        if STEPS > 12:
            acc = tl.dot(_x_load(x_ptrs, m_mask, offs_k, k_len, 12, BLOCK_K, MASK_K), wt12, acc)
        if STEPS > 13:
            acc = tl.dot(_x_load(x_ptrs, m_mask, offs_k, k_len, 13, BLOCK_K, MASK_K), wt13, acc)
        if STEPS > 14:
            acc = tl.dot(_x_load(x_ptrs, m_mask, offs_k, k_len, 14, BLOCK_K, MASK_K), wt14, acc)
        if STEPS > 15:
            acc = tl.dot(_x_load(x_ptrs, m_mask, offs_k, k_len, 15, BLOCK_K, MASK_K), wt15, acc)

    if SPLIT:
        # partial into the zeroed fp32 tile; the last of the S programs of this tile sums up, zeroes, epilogue
        TILE: tl.constexpr = BLOCK_M * BLOCK_N
        offs_t = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        ws_tile = ws_ptr + tile.to(tl.int64) * TILE
        rows = m_mask[:, None]
        tl.atomic_add(ws_tile + offs_t, acc, mask=rows, sem="relaxed", scope="gpu")
        tl.debug_barrier()  # all threads' partial adds happen before the (single-thread) release
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == S - 1:
            acc = tl.load(ws_tile + offs_t, mask=rows, other=0.0, cache_modifier=".cg")
            tl.store(ws_tile + offs_t, tl.zeros_like(acc), mask=rows)  # zero again for the next launch / replay
            tl.atomic_xchg(cnt_ptr + tile, 0)
            _epilogue(acc, bias, res, o_ptr, offs_m, offs_n, m_mask, n_mask, stride_om, ACT, HAS_BIAS, HAS_RES)
    else:
        _epilogue(acc, bias, res, o_ptr, offs_m, offs_n, m_mask, n_mask, stride_om, ACT, HAS_BIAS, HAS_RES)


@triton.jit
def _ws_kernel(
    x0, w0, o0, b0, r0, ws0, cnt0, M0, N0, K0, sx0, so0, sr0, S0,
    x1, w1, o1, b1, r1, ws1, cnt1, M1, N1, K1, sx1, so1, sr1, S1,
    start1,  # first program id of problem 1
    BM0: tl.constexpr, STEPS0: tl.constexpr, MASK0: tl.constexpr, ACT0: tl.constexpr, BIAS0: tl.constexpr,
    RES0: tl.constexpr, SPLIT0: tl.constexpr,
    BM1: tl.constexpr, STEPS1: tl.constexpr, MASK1: tl.constexpr, ACT1: tl.constexpr, BIAS1: tl.constexpr,
    RES1: tl.constexpr, SPLIT1: tl.constexpr,
    TWO: tl.constexpr,  # problem 1 exists
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, X_ALL: tl.constexpr, USE_PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    if USE_PDL:
        gdc_launch()  # the next launch may start its programs (they wait for all of this one in their gdc_wait)
    if TWO:
        if pid >= start1:
            _ws_problem(pid - start1, x1, w1, o1, b1, r1, ws1, cnt1, M1, N1, K1, sx1, so1, sr1, S1,
                        BM1, BLOCK_N, BLOCK_K, STEPS1, MASK1, ACT1, BIAS1, RES1, SPLIT1, X_ALL, USE_PDL)
        else:
            _ws_problem(pid, x0, w0, o0, b0, r0, ws0, cnt0, M0, N0, K0, sx0, so0, sr0, S0,
                        BM0, BLOCK_N, BLOCK_K, STEPS0, MASK0, ACT0, BIAS0, RES0, SPLIT0, X_ALL, USE_PDL)
    else:
        _ws_problem(pid, x0, w0, o0, b0, r0, ws0, cnt0, M0, N0, K0, sx0, so0, sr0, S0,
                    BM0, BLOCK_N, BLOCK_K, STEPS0, MASK0, ACT0, BIAS0, RES0, SPLIT0, X_ALL, USE_PDL)


# ---------------------------------------------------------------------------------------------------
# host side: plan once, launch only
# ---------------------------------------------------------------------------------------------------
def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _smem_estimate(bm, bn, bk, steps, x_all, elt) -> int:
    """Bytes of shared memory a program holds at most: its W slice, plus its x tiles (all steps, or ~2)."""
    return steps * bk * bn * elt + (steps if x_all else 2) * bm * bk * elt


class WSGemm:
    """One or two `LinearProblem`s (bias / activation / residual, residual may be out; no folded LayerNorm or
    row statistics) in ONE weight-resident launch. Built once (plan, split-K workspace, arguments); calling it
    only launches, so a CUDA graph can capture it. Not to be run concurrently with itself (workspace)."""

    def __init__(self, problems, config: dict | None = None, sms: int | None = None):
        if not 1 <= len(problems) <= 2:
            raise ValueError("WSGemm takes one or two problems")
        cfg = {**BASE, **(config or {})}
        self.config = cfg
        bn, bk = cfg["BLOCK_N"], cfg["BLOCK_K"]
        x_all = bool(cfg["x_all"])
        device = problems[0].x.device
        sms = sms or num_sms(device)
        plans = []
        for p in problems:
            if getattr(p, "norm", None) is not None or getattr(p, "row_stats_out", None) is not None:
                raise ValueError("WSGemm: no folded LayerNorm / row statistics")
            M, K = p.x.shape
            N = p.weight.shape[0]
            if p.x.stride(1) != 1 or not p.weight.is_contiguous() or p.out.stride(1) != 1:
                raise ValueError("WSGemm: x, out need a contiguous last dim and the weight must be contiguous")
            elt = p.x.element_size()
            bm = max(16, min(cfg["bm_max"], _next_pow2(M)))
            iters = triton.cdiv(K, bk)
            max_steps = max(1, min(MAX_STEPS, cfg["max_k"] // bk))
            s = triton.cdiv(iters, max_steps)
            while triton.cdiv(iters, s) > 1 and (_smem_estimate(bm, bn, bk, triton.cdiv(iters, s), x_all, elt)
                                                 > cfg["smem_kb"] * 1024):
                s += 1
            steps = triton.cdiv(iters, s)
            plans.append(dict(p=p, M=M, N=N, K=K, BM=bm, iters=iters, steps=steps, S=triton.cdiv(iters, steps),
                              tiles=triton.cdiv(M, bm) * triton.cdiv(N, bn), elt=elt))
        target = cfg["min_programs"]
        target = sms * -target if target < 0 else target
        while target and sum(q["tiles"] * q["S"] for q in plans) < target:
            cand = [q for q in plans if q["steps"] > 1]
            if not cand:
                break
            q = max(cand, key=lambda q: (q["steps"], q["tiles"]))
            s = q["S"] + 1
            while triton.cdiv(q["iters"], s) == q["steps"]:
                s += 1
            q["steps"] = triton.cdiv(q["iters"], s)
            q["S"] = triton.cdiv(q["iters"], q["steps"])
        start = 0
        for i, q in enumerate(plans):
            p = q["p"]
            if q["steps"] > MAX_STEPS:
                raise ValueError(f"problem {i}: {q['steps']} K steps per program > {MAX_STEPS}")
            q["start"] = start
            q["programs"] = q["tiles"] * q["S"]
            start += q["programs"]
            q["mask_k"] = q["S"] * q["steps"] * bk != q["K"]
            q["smem_est"] = _smem_estimate(q["BM"], bn, bk, q["steps"], x_all, q["elt"])
            split = q["S"] > 1
            # split-K: fp32 partial tiles (zeroed; the last program of a tile zeroes it again) + arrival counters
            q["ws"] = torch.zeros(q["tiles"] * q["BM"] * bn if split else 1, dtype=torch.float32, device=device)
            q["cnt"] = torch.zeros(q["tiles"] if split else 1, dtype=torch.int32, device=device)
            q["args"] = (p.x, p.weight, p.out, p.bias if p.bias is not None else p.out,
                         p.residual if p.residual is not None else p.out, q["ws"], q["cnt"], q["M"], q["N"], q["K"],
                         p.x.stride(0), p.out.stride(0), p.residual.stride(0) if p.residual is not None else 0, q["S"])
            q["cexp"] = dict(BM=q["BM"], STEPS=q["steps"], MASK=q["mask_k"], ACT=activation_code(p.activation),
                             BIAS=p.bias is not None, RES=p.residual is not None, SPLIT=split)
        two = len(plans) == 2
        q1 = plans[1] if two else plans[0]
        self.num_programs = start
        self.args = (*plans[0]["args"], *q1["args"], plans[1]["start"] if two else start)
        self.constexprs = {**{f"{k}0": v for k, v in plans[0]["cexp"].items()},
                           **{f"{k}1": v for k, v in q1["cexp"].items()},
                           "TWO": two, "BLOCK_N": bn, "BLOCK_K": bk, "X_ALL": x_all,
                           "USE_PDL": pdl_supported(device) and bool(cfg.get("pdl", True))}
        self.opts = dict(num_warps=cfg["num_warps"], num_stages=1)
        if self.constexprs["USE_PDL"]:
            self.opts["launch_pdl"] = True
        self.grid = (self.num_programs,)
        self.plans = plans
        self.compiled = None

    def info(self) -> dict:
        d = dict(programs=self.num_programs,
                 problems=[dict(M=q["M"], N=q["N"], K=q["K"], BM=q["BM"], steps=q["steps"], S=q["S"],
                                programs=q["programs"], mask_k=q["mask_k"], smem_est_kb=round(q["smem_est"] / 1024, 1))
                           for q in self.plans])
        ck = self.compiled
        if ck is not None:
            for k in ("n_regs", "n_spills"):
                if getattr(ck, k, None) is not None:
                    d[k] = getattr(ck, k)
            d["shared_kb"] = round(getattr(ck.metadata, "shared", 0) / 1024, 1)
        return d

    def warmup(self, load: bool = True):
        """Compile (and load onto the device) without running: the first call can then be graph-captured."""
        if is_interpreter():
            return
        ck = _ws_kernel.warmup(*self.args, grid=self.grid, **self.constexprs, **self.opts)
        if load:
            init = getattr(ck, "_init_handles", None)
            if init is not None:
                init()
            self.compiled = ck

    def __call__(self):
        _ws_kernel[self.grid](*self.args, **self.constexprs, **self.opts)


# ---------------------------------------------------------------------------------------------------
# --check: CPU interpreter (or GPU), small awkward shapes, fp32 torch reference
# ---------------------------------------------------------------------------------------------------
def _ref(x, w, b, act, r):
    y = x.float() @ w.float().t()
    if b is not None:
        y = y + b.float()
    if act == "quick_gelu":
        y = y * torch.sigmoid(1.702 * y)
    elif act == "gelu":
        y = torch.nn.functional.gelu(y)
    elif act == "gelu_tanh":
        y = torch.nn.functional.gelu(y, approximate="tanh")
    if r is not None:
        y = y + r.float()
    return y


# (M, N, K, bias, activation, residual: None | "alias" (out += ...) | "sep"), config overrides
CHECK_CASES = [
    ([(3, 40, 200, True, "quick_gelu", None), (77, 72, 64, True, None, "alias")],
     dict(BLOCK_N=32, BLOCK_K=64, max_k=128, bm_max=32)),  # split + K mask (200), 3 row tiles, ragged N
    ([(1, 50, 128, False, None, "sep"), (50, 100, 192, True, "quick_gelu", None)],
     dict(BLOCK_N=16, BLOCK_K=32, max_k=64, x_all=False)),  # M=1, splits 2 and 3, one x tile at a time
    ([(50, 24, 200, True, None, "alias")], dict(BLOCK_N=32, BLOCK_K=64)),  # one problem, 4 masked steps, no split
    ([(77, 64, 256, True, "quick_gelu", None), (50, 48, 128, True, None, "alias")],
     dict(BLOCK_N=16, BLOCK_K=32, min_programs=40)),  # min_programs: split to fill
    ([(50, 96, 384, True, None, "alias"), (77, 64, 256, True, "quick_gelu", None)],
     dict(BLOCK_N=64, BLOCK_K=128, max_k=256)),  # the real tile shape, 128-row text tile, split
    ([(3, 20, 1000, True, None, "alias"), (1, 8, 1088, False, "quick_gelu", None)],
     dict(BLOCK_N=16, BLOCK_K=64, max_k=2048, smem_kb=1000, x_all=False)),  # all 16 unrolled steps, the last masked
    # (K=1000); K=1088 = 17 x 64 -> 2 splits of 9 steps, masked
    ([(77, 40, 256, False, "gelu_tanh", "alias"), (50, 24, 130, True, None, "sep")],
     dict(BLOCK_N=32, BLOCK_K=64, max_k=128, bm_max=64)),  # 2 row tiles x split 2; K=130: 3 steps -> S=2 x 2, masked
]


def run_check(device) -> bool:
    from dualfuse.kernels.gemm import LinearProblem

    dtype = torch.float16
    gen = torch.Generator().manual_seed(0)
    ok = True
    for ci, (shapes, cfg) in enumerate(CHECK_CASES):
        probs, specs = [], []
        for (M, N, K, has_b, act, res) in shapes:
            x = torch.randn(M, K, generator=gen).to(device, dtype)
            w = (torch.randn(N, K, generator=gen) * K ** -0.5).to(device, dtype)
            b = (torch.randn(N, generator=gen) * 0.1).to(device, dtype) if has_b else None
            out = torch.full((M, N), float("nan"), dtype=dtype, device=device)
            r = None
            if res == "alias":
                out.copy_(torch.randn(M, N, generator=gen))
                r = out
            elif res == "sep":
                r = torch.randn(M, N, generator=gen).to(device, dtype)
            probs.append(LinearProblem(x, w, out, bias=b, activation=act, residual=r))
            specs.append((M, N, K, has_b, act, res))
        try:
            op = WSGemm(probs, cfg, sms=8)
            for call in range(2):  # the second call: workspace / counters must be back to zero, aliasing again
                want = [_ref(p.x, p.weight, p.bias, p.activation, p.residual) for p in probs]
                for p, s in zip(probs, specs):
                    if s[5] != "alias":
                        p.out.fill_(float("nan"))
                op()
                for i, (p, wnt) in enumerate(zip(probs, want)):
                    err = (p.out.float() - wnt).abs().max().item()
                    tol = 2e-2 * max(1.0, wnt.abs().max().item())
                    good = err <= tol  # NaN (an unwritten element) fails
                    ok &= good
                    print(f"  case {ci} call {call} problem {i} {specs[i]}: max abs err {err:.2e} "
                          f"{'ok' if good else 'FAIL'}")
                for q in op.plans:
                    if q["ws"].abs().sum().item() != 0 or q["cnt"].abs().sum().item() != 0:
                        ok = False
                        print(f"  case {ci}: split-K workspace / counters not reset: FAIL")
            print(f"  case {ci} plan: {json.dumps(op.info()['problems'])}")
        except Exception:
            traceback.print_exc()
            ok = False
    print("check:", "PASS" if ok else "FAIL")
    return ok


# ---------------------------------------------------------------------------------------------------
# --inspect: compile for sm_90a on this machine (no GPU needed), resources + SASS order
# ---------------------------------------------------------------------------------------------------
def _nv_bin(name):
    import triton.backends.nvidia as nv

    p = Path(nv.__file__).parent / "bin" / name
    return str(p) if p.exists() else name


def _sass_summary(cubin: bytes) -> str:
    """The memory / MMA / barrier instructions in program order, runs collapsed (ACQBULK = griddepcontrol.wait)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([_nv_bin("cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    seq = []
    for line in sass.splitlines():
        if not re.match(r"^\s+/\*[0-9a-f]{4}\*/", line):
            continue
        ins = re.sub(r"^\s*/\*[0-9a-f]+\*/\s*", "", line).split(";")[0].strip()
        toks = ins.split()
        if not toks:
            continue
        name = toks[1] if toks[0].startswith("@") and len(toks) > 1 else toks[0]
        base = name.split(".")[0]
        if base in ("LDG", "STG", "STS", "LDS", "LDSM", "BAR", "HGMMA", "ACQBULK", "RED", "ATOMG", "ATOM", "EXIT",
                    "PREEXIT", "WARPGROUP"):
            key = name if base == "WARPGROUP" else base
            if seq and seq[-1][0] == key:
                seq[-1][1] += 1
            else:
                seq.append([key, 1])
    return " ".join(f"{k}x{n}" if n > 1 else k for k, n in seq)


def _ptxas_usage(ptx: str, arch: str) -> str:
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        r = subprocess.run([_nv_bin("ptxas"), f"-arch={arch}", "-v", str(src), "-o", str(Path(d) / "k.o")],
                           capture_output=True, text=True)
    txt = r.stdout + r.stderr
    regs = re.findall(r"Used (\d+) registers", txt)
    spill = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", txt)
    return f"regs {regs[-1] if regs else '?'} spill st/ld {'/'.join(spill[-1]) if spill else '?'}"


def run_inspect(args) -> int:
    """Plans and compiles every variant's four steps for ViT-B/32 batch 1 shapes (tensors on the CPU only give
    shapes / strides / alignment) and prints what the compiler made of them."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernel_bench import MODELS, Tower

    vis, txt, act = MODELS[args.model]
    gen = torch.Generator().manual_seed(0)
    towers = [Tower(*vis, act, 1, 1, torch.float16, "cpu", gen), Tower(*txt, act, 1, 1, torch.float16, "cpu", gen)]
    probs = [t.problems(0) for t in towers]
    names = _variant_names(args)
    fn = _ws_kernel
    arg_names = fn.arg_names
    tys = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int32: "*i32"}
    print(f"triton {triton.__version__}, target sm_{args.arch}")
    for name in names:
        cfg = _variant_cfg(name, args)
        for step in STEPS:
            try:
                op = WSGemm([p[step] for p in probs], cfg, sms=132)
                op.constexprs["USE_PDL"] = bool(cfg.get("pdl", True))  # as on an sm_90 GPU
                sig, attrs, cexp = {}, {}, {}
                vals = list(op.args)
                for i, an in enumerate(arg_names):
                    if an in op.constexprs:
                        sig[an] = "constexpr"
                        cexp[an] = op.constexprs[an]
                        continue
                    v = vals[i]
                    if isinstance(v, torch.Tensor):
                        sig[an] = tys[v.dtype]
                        if v.data_ptr() % 16 == 0:
                            attrs[(i,)] = [["tt.divisibility", 16]]
                    else:
                        sig[an] = "i32" if -2**31 <= v < 2**31 else "i64"
                        if v % 16 == 0:
                            attrs[(i,)] = [["tt.divisibility", 16]]
                src = ASTSource(fn=fn, signature=sig, constexprs=cexp, attrs=attrs)
                t0 = datetime.datetime.now()
                ck = triton.compile(src, target=GPUTarget("cuda", args.arch, 32),
                                    options=dict(num_warps=cfg["num_warps"], num_stages=1,
                                                 launch_pdl=op.constexprs["USE_PDL"]))
                dt = (datetime.datetime.now() - t0).total_seconds()
                arch = f"sm_{args.arch}a" if args.arch == 90 else f"sm_{args.arch}"
                usage = _ptxas_usage(ck.asm["ptx"], arch)
                info = op.info()["problems"]
                plan = " | ".join(f"BM{q['BM']} steps{q['steps']} S{q['S']} P{q['programs']} est{q['smem_est_kb']:.0f}K"
                                  for q in info)
                print(f"\n{name} {step}: {usage}, shared {ck.metadata.shared / 1024:.0f} KB, compile {dt:.1f} s; "
                      f"{plan}")
                if args.sass:
                    print("   ", _sass_summary(ck.asm["cubin"]))
                if args.dump:
                    d = Path(args.dump)
                    d.mkdir(parents=True, exist_ok=True)
                    for k in ("ttgir", "ptx"):
                        (d / f"{name}-{step}.{k}").write_text(ck.asm[k])
            except Exception as e:
                print(f"\n{name} {step}: FAILED {type(e).__name__}: {str(e)[:300]}")
    return 0


# ---------------------------------------------------------------------------------------------------
# GPU benchmark
# ---------------------------------------------------------------------------------------------------
STEPS = ("qkv", "out", "fc1", "fc2")


def _variant_names(args) -> list[str]:
    names = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else list(DEFAULT_VARIANTS)
    return names + [e.partition(":")[0] for e in args.extra]


def _variant_cfg(name, args) -> dict:
    for e in args.extra:
        n, _, js = e.partition(":")
        if n == name:
            return {**BASE, **json.loads(js)}
    if name not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r}; known: {', '.join(VARIANTS)} (or --extra NAME:JSON)")
    return {**BASE, **VARIANTS[name]}


def _smoke_time_graph(layers, replays):
    """--smoke: every layer once, no timing."""
    for ops in layers:
        for op in ops:
            op()
    return [0.0] * replays


def run_gpu(args, smoke: bool = False) -> int:
    """smoke: the same pipeline on the CPU interpreter with toy shapes, 2 layers and no timing (a test of this
    script, not of the kernel's speed)."""
    from concurrent.futures import ThreadPoolExecutor

    from kernel_bench import MODELS, TOY, Tower

    from dualfuse import timing

    from dualfuse.kernels.gemm import GroupedLinear

    time_graph = _smoke_time_graph if smoke else (  # µs per replay
        lambda layers, replays: [ms * 1e3 for ms in timing.time_graph(layers, replays)])
    t_start = datetime.datetime.now()
    elapsed = lambda: (datetime.datetime.now() - t_start).total_seconds()  # noqa: E731
    dtype = torch.float16
    if smoke:
        device, (vis, txt, act), card, n_layers, pdl = "cpu", TOY["toy"], "cpu (TRITON_INTERPRET=1)", 2, False
        sync = lambda: None  # noqa: E731
    else:
        device, (vis, txt, act) = "cuda", MODELS[args.model]
        card = torch.cuda.get_device_name(0)
        l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
        per_layer_w = sum((3 * d * d + d * d + 2 * d * f) for d, _, f in (vis, txt)) * 2
        n_layers = min(48, max(args.layers, math.ceil(3 * l2 / per_layer_w)))  # graph's weights >> L2 (kernels.py)
        pdl = pdl_supported("cuda")
        sync = torch.cuda.synchronize
    gen = torch.Generator().manual_seed(0)
    towers = [Tower(*vis, act, 1, n_layers, dtype, device, gen), Tower(*txt, act, 1, n_layers, dtype, device, gen)]
    print(f"{card}, triton {triton.__version__}, torch {torch.__version__}; {'toy' if smoke else args.model} batch 1, "
          f"{n_layers} layers per graph, {args.replays} replays; PDL {pdl}", flush=True)

    def build(name):
        layers = []
        for layer in range(n_layers):
            probs = [t.problems(layer) for t in towers]
            if name.startswith("grouped"):  # as benchmarks/kernel_bench.py 'fused': defaults, no tuning
                layers.append([GroupedLinear([p[s] for p in probs]) for s in STEPS])
            else:
                cfg = _variant_cfg(name, args)
                layers.append([WSGemm([p[s] for p in probs], cfg) for s in STEPS])
        return layers

    def set_inputs():
        g = torch.Generator().manual_seed(1234)
        for t in towers:
            for buf in (t.ln1, t.attn, t.ln2, t.hidden):
                buf.copy_(torch.randn(buf.shape, generator=g))
            t.qkv.fill_(float("nan"))
            t.mlp.fill_(float("nan"))

    def run_layer0(layers):
        set_inputs()
        for op in layers[0]:
            op()
        sync()
        return {f"{tn}.{k}": getattr(t, k).clone() for tn, t in zip(("vision", "text"), towers)
                for k in ("qkv", "mlp", "hidden")}

    set_inputs()
    h0 = [t.hidden.clone() for t in towers]
    ref32 = {}
    for tn, t, h in zip(("vision", "text"), towers, h0):
        for k, v in t.reference(0, h).items():
            ref32[f"{tn}.{k}"] = v

    def compare(got, base):
        out = {}
        for k, v in got.items():
            d = dict(rel_fp32=((v.float() - ref32[k]).norm() / ref32[k].norm()).item())
            if base is not None:
                d["max_abs_vs_grouped"] = (v.float() - base[k].float()).abs().max().item()
            out[k] = d
        return out

    names = ["grouped"] + _variant_names(args) + ["grouped-again"]
    # compile the variants' distinct binaries in threads first (ptxas is a subprocess; errors show up later)
    t0 = datetime.datetime.now()
    pre = []
    for name in names[1:-1]:
        try:
            probs = [t.problems(0) for t in towers]
            pre += [WSGemm([p[s] for p in probs], _variant_cfg(name, args)) for s in STEPS]
        except Exception:
            pass

    def _compile(op):
        try:
            op.warmup(load=False)
        except Exception:
            pass

    with ThreadPoolExecutor(max_workers=max(1, min(8, (os.cpu_count() or 2) - 1))) as ex:
        list(ex.map(_compile, pre))
    del pre
    print(f"precompiled in {(datetime.datetime.now() - t0).total_seconds():.0f} s", flush=True)

    rows, base_out = [], None

    def write_json():
        if not args.json:
            return
        rec = dict(benchmark="probe_ws_gemm", card=card, model="toy" if smoke else args.model, batch=1, dtype="fp16",
                   layers=n_layers, replays=args.replays, triton=triton.__version__, torch=torch.__version__,
                   cuda=torch.version.cuda, pdl=pdl, date=datetime.datetime.now().isoformat(timespec="seconds"),
                   wall_s=elapsed(), base=BASE, rows=rows)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(rec, f, indent=1, default=str)

    for name in names:
        row = dict(variant=name, config=None if name.startswith("grouped") else _variant_cfg(name, args))
        rows.append(row)
        if elapsed() > args.budget_s and not name.startswith("grouped"):
            row["error"] = f"skipped: time budget {args.budget_s} s spent"
            print(f"{name:<22} skipped (time budget)", flush=True)
            continue
        try:
            layers = build(name)
            for op in layers[0]:
                if hasattr(op, "warmup"):
                    op.warmup()
            if name.startswith("grouped"):
                row["kernel_info"] = {s: dict(config=op.config, splits=op.splits, programs=op.num_programs,
                                              tma=op.uses_tma) for s, op in zip(STEPS, layers[0])}
            else:
                row["kernel_info"] = {s: op.info() for s, op in zip(STEPS, layers[0])}
            got = run_layer0(layers)
            if name == "grouped":
                base_out = got
            row["check"] = compare(got, base_out)
            ts = sorted(t / n_layers for t in time_graph(layers, args.replays))
            row.update(us_median=statistics.median(ts), us_p10=ts[int(0.1 * (len(ts) - 1))],
                       us_p90=ts[int(0.9 * (len(ts) - 1))], us_min=ts[0])
            row["check_after_replays"] = compare(run_layer0(layers), base_out)  # workspace / counters stayed clean
            del layers
        except Exception as e:
            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            if smoke:
                raise
        chk = row.get("check_after_replays") or row.get("check") or {}
        row["max_abs_vs_grouped"] = max((v.get("max_abs_vs_grouped", 0.0) for v in chk.values()), default=None)
        row["max_rel_fp32"] = max((v["rel_fp32"] for v in chk.values()), default=None)
        row["ok"] = "error" not in row and row["max_rel_fp32"] is not None and row["max_rel_fp32"] <= 1e-2
        if "error" in row:
            print(f"{name:<22} FAILED: {row['error'][:200]}", flush=True)
        else:
            print(f"{name:<22} {row['us_median']:7.2f} us/layer  (p90 {row['us_p90']:.2f}; max|err| vs grouped "
                  f"{row['max_abs_vs_grouped']:.2e}, rel fp32 {row['max_rel_fp32']:.1e}; {elapsed():.0f} s)",
                  flush=True)
        if not smoke:
            torch.cuda.empty_cache()
        write_json()  # after every variant: a run cut short still leaves its results

    base_us = rows[0].get("us_median")
    print(f"\n{card}, {'toy' if smoke else args.model} batch 1, fp16, {n_layers}-layer CUDA graphs, "
          f"{args.replays} replays; 4 GEMM steps x 2 towers per layer; {elapsed():.0f} s in all")
    hdr = (f"{'variant':<22}{'us/layer':>9}{'p90':>7}{'vs grp':>8}{'max|err|':>10}{'rel32':>9}  "
           f"programs qkv/out/fc1/fc2  regs/spills/smem  K splits (vision,text)")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<22}  FAILED: {r['error'][:150]}")
            continue
        ki = r.get("kernel_info", {})
        progs = "/".join(str(ki[s]["programs"]) for s in STEPS)
        if r["variant"].startswith("grouped"):
            splits = " ".join(f"{s}:{','.join(map(str, ki[s]['splits']))}" for s in STEPS if max(ki[s]["splits"]) > 1)
            res = "-"
        else:
            splits = " ".join(f"{s}:{','.join(str(q['S']) for q in ki[s]['problems'])}" for s in STEPS
                              if max(q["S"] for q in ki[s]["problems"]) > 1)
            regs = [ki[s].get("n_regs") for s in STEPS]
            spills = [ki[s].get("n_spills") for s in STEPS]
            smem = [ki[s].get("shared_kb") for s in STEPS]
            res = (f"{max(regs) if None not in regs else '?'}/{sum(spills) if None not in spills else '?'}/"
                   f"{max(smem) if None not in smem else '?'}K")
        vs = f"{base_us / r['us_median']:.2f}x" if base_us else "-"  # (smoke: no times)
        print(f"{r['variant']:<22}{r['us_median']:>9.2f}{r['us_p90']:>7.2f}{vs:>8}{r['max_abs_vs_grouped']:>10.2e}"
              f"{r['max_rel_fp32']:>9.1e}  {progs:<24}{res:<18}{splits or '-'}{'' if r['ok'] else '  CHECK FAILED'}")
    print("(vs grp: grouped median / variant median, > 1 = faster; regs/spills/smem: the most of the 4 steps' "
          "binaries; max|err|: fp16 outputs of layer 0 against "
          "GroupedLinear's, after the timed replays; rel32: relative error against the fp32 torch reference)")
    if args.json:
        write_json()
        print(f"wrote {args.json}")
    return 0 if all(r.get("ok") for r in rows) else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="correctness on small shapes (CPU: TRITON_INTERPRET=1)")
    p.add_argument("--inspect", action="store_true", help="compile for --arch on this machine, print resources")
    p.add_argument("--arch", type=int, default=90, help="--inspect: compute capability (90 = sm_90a)")
    p.add_argument("--sass", action="store_true", help="--inspect: also print the SASS memory/MMA order")
    p.add_argument("--dump", metavar="DIR", default=None, help="--inspect: write each binary's TTGIR and PTX here")
    p.add_argument("--model", default="ViT-B/32", help="ViT-B/32 (default) or another name of kernels.py's MODELS, "
                                                        "e.g. ViT-L/14")
    p.add_argument("--variants", default=None, help=f"comma-separated subset of {', '.join(VARIANTS)}")
    p.add_argument("--extra", action="append", default=[], metavar="NAME:JSON",
                   help="another variant: BASE overridden by JSON, e.g. 'n16:{\"BLOCK_N\": 16}'")
    p.add_argument("--replays", type=int, default=200)
    p.add_argument("--layers", type=int, default=12, help="at least this many layers per graph")
    p.add_argument("--budget-s", type=float, default=150.0, help="skip the variants left after this many seconds")
    p.add_argument("--json", metavar="PATH", default=None)
    p.add_argument("--smoke", action="store_true", help="CPU (TRITON_INTERPRET=1): run the GPU-mode pipeline on toy "
                                                        "shapes without timing (tests this script)")
    args = p.parse_args(argv)
    if args.smoke:
        return run_gpu(args, smoke=True)
    if args.check:
        device = "cuda" if HAS_CUDA else "cpu"
        if device == "cpu" and not is_interpreter():
            raise SystemExit("--check on CPU needs TRITON_INTERPRET=1")
        return 0 if run_check(device) else 1
    if args.inspect:
        return run_inspect(args)
    if not HAS_CUDA:
        raise SystemExit("timing needs a CUDA GPU (on CPU: --check with TRITON_INTERPRET=1, or --inspect)")
    return run_gpu(args)


if __name__ == "__main__":
    sys.exit(main())

"""Grouped GEMM: `out_i = act(x_i @ w_i.T + bias_i) + residual_i` for several problems in ONE launch.

Why: the two towers of a dual encoder do the same step (QKV, out-proj, FC1, FC2) on different shapes.
At batch 1 each step is tiny (M = 50 / 77 rows), so the time is launch gaps plus streaming the weights;
one launch that covers both towers halves the launches and lets the tiles of both towers share the SMs.

Layout (Liger-Kernel style: kernel + launcher + glue):
- `_grouped_linear_kernel`: one program = one (problem, output tile, K split). Per-problem pointers,
  sizes and strides come from an int64 metadata table on the device; a program finds its problem by
  comparing its id against the problems' first program ids (few problems: unrolled).
- `GroupedLinear`: validates once, builds the metadata, picks block config and split-K, allocates the
  split-K workspace; `__call__` only launches (no sync, no allocation) so a CUDA graph can capture it.
- `grouped_linear(...)`: convenience wrapper for one-off calls.

Split-K (for skinny M, when the output tiles of all problems are fewer than the SMs): every split
program writes its fp32 partial tile to a workspace and bumps a per-tile counter; the program that
arrives last sums the partials in split order (deterministic: same bits every replay), applies the
epilogue, writes the output and resets the counter to 0. One launch, no memset node, replay-safe, and
correct with `residual is out` because only that last program reads the residual and writes out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._utils import (
    activation_code,
    apply_activation,
    device_smem_bytes,
    is_interpreter,
    num_sms,
)

__all__ = ["LinearProblem", "GroupedLinear", "grouped_linear"]

# ---------------------------------------------------------------------------------------------------
# metadata table: one int64 row per problem (rows sorted by work per program, heaviest first)
# ---------------------------------------------------------------------------------------------------
# (tl.constexpr globals: kernels may only read constexpr globals; the host uses .value)
_F_X, _F_W, _F_OUT, _F_BIAS, _F_RES = (tl.constexpr(i) for i in range(5))  # data_ptr()s (0 = no bias/residual)
_F_M, _F_N, _F_K = tl.constexpr(5), tl.constexpr(6), tl.constexpr(7)
_F_SXM, _F_SOM, _F_SRM = tl.constexpr(8), tl.constexpr(9), tl.constexpr(10)  # row strides (elements): x, out, res
_F_ACT = tl.constexpr(11)  # activation code (see _utils.ACTIVATIONS)
_F_START = tl.constexpr(12)  # first program id of this problem
_F_SPLIT = tl.constexpr(13)  # number of K splits S (1 = no split-K)
_F_IPS = tl.constexpr(14)  # K iterations (of BLOCK_K) per split
_F_WS = tl.constexpr(15)  # fp32 element offset of this problem's split-K workspace
_F_CNT = tl.constexpr(16)  # offset of this problem's tile counters
_NF = tl.constexpr(17)


@triton.jit
def _grouped_linear_kernel(
    meta_ptr,  # int64 [G, _NF] per-problem table, see _F_* above
    ws_ptr,  # fp32 split-K workspace: per split problem [tiles, S, BLOCK_M, BLOCK_N]
    cnt_ptr,  # int32 per split tile arrival counters; 0 between launches (the last arrival resets)
    x_ref,  # problem 0's x: only its dtype is used (the real pointers come from meta)
    out_ref,  # problem 0's out: dtype of every out / residual
    bias_ref,  # a bias (or x when no problem has one): dtype of every bias
    NUM_PROBLEMS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,  # every K % BLOCK_K == 0: no K masks in the main loop
    ALIGNED: tl.constexpr,  # all pointers 16-byte aligned; row strides and N multiples of 16 bytes
    VEC_IN: tl.constexpr,  # 16 // sizeof(input element)
    VEC_OUT: tl.constexpr,  # 16 // sizeof(output element)
    HAS_BIAS: tl.constexpr,  # some problem has a bias (each problem still checks its own pointer)
    HAS_ACT: tl.constexpr,  # some problem has an activation
    HAS_RES: tl.constexpr,  # some problem has a residual
    ANY_SPLIT: tl.constexpr,  # some problem uses split-K
    INPUT_PRECISION: tl.constexpr,  # tl.dot input_precision ("ieee" for fp32 inputs by default)
):
    pid = tl.program_id(0)

    # ---- which problem: count the problems whose first program id is <= pid ----
    g = 0
    for i in tl.static_range(1, NUM_PROBLEMS):
        g += (pid >= tl.load(meta_ptr + i * _NF + _F_START)).to(tl.int32)
    row = meta_ptr + g * _NF

    in_ty = x_ref.dtype.element_ty
    x_ptr = tl.load(row + _F_X).to(tl.pointer_type(in_ty))  # [M, K], row stride stride_xm
    w_ptr = tl.load(row + _F_W).to(tl.pointer_type(in_ty))  # [N, K] contiguous (nn.Linear layout)
    out_ptr = tl.load(row + _F_OUT).to(tl.pointer_type(out_ref.dtype.element_ty))  # [M, N]
    M = tl.load(row + _F_M).to(tl.int32)
    N = tl.load(row + _F_N).to(tl.int32)
    K = tl.load(row + _F_K).to(tl.int32)
    stride_xm = tl.load(row + _F_SXM)
    stride_om = tl.load(row + _F_SOM)
    S = tl.load(row + _F_SPLIT).to(tl.int32)
    ips = tl.load(row + _F_IPS).to(tl.int32)
    if ALIGNED:  # lets the compiler use 16-byte loads/stores (values loaded from memory carry no hints)
        x_ptr = tl.multiple_of(x_ptr, 16)
        w_ptr = tl.multiple_of(w_ptr, 16)
        out_ptr = tl.multiple_of(out_ptr, 16)
        stride_xm = tl.multiple_of(stride_xm, VEC_IN)
        stride_om = tl.multiple_of(stride_om, VEC_OUT)
        K = tl.multiple_of(K, VEC_IN)
        N = tl.multiple_of(N, VEC_IN if VEC_IN > VEC_OUT else VEC_OUT)  # n masks constant over 16 bytes

    # ---- (tile, split) of this program; tiles in GROUP_M-grouped order for L2 reuse ----
    local = pid - tl.load(row + _F_START).to(tl.int32)
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
    # x rows past M are masked: at batch 1 a BLOCK_M tile is mostly padding and masked lanes cost no
    # memory traffic. Weight rows past N wrap around instead (in bounds, no mask); never stored.
    rm = tl.where(m_mask, offs_m, 0)
    rn = offs_n % N

    k_lo = split * ips
    k_hi = tl.minimum(k_lo + ips, tl.cdiv(K, BLOCK_K))
    x_ptrs = x_ptr + rm[:, None] * stride_xm + (k_lo * BLOCK_K + offs_k)[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + rn[None, :].to(tl.int64) * K + (k_lo * BLOCK_K + offs_k)[:, None]  # [BLOCK_K, BLOCK_N] = w.T
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
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
    if ANY_SPLIT:
        is_last = S == 1
        if S > 1:
            offs_tile = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
            ws_off = tl.multiple_of(tl.load(row + _F_WS), BLOCK_M * BLOCK_N)  # true by construction
            ws_tile = ws_ptr + ws_off + tile.to(tl.int64) * S * (BLOCK_M * BLOCK_N)
            # only rows < M: at batch 1 most of a BLOCK_M tile is padding
            tl.store(ws_tile + split * (BLOCK_M * BLOCK_N) + offs_tile, acc, mask=m_mask[:, None])
            tl.debug_barrier()  # all threads' partial stores happen before the (single-thread) release
            cnt = cnt_ptr + tl.load(row + _F_CNT) + tile
            arrived = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
            is_last = arrived == S - 1
            if is_last:
                # fixed order 0..S-1 whoever arrives last -> bitwise reproducible. .cg: read at L2
                acc = tl.load(ws_tile + offs_tile, mask=m_mask[:, None], other=0.0, cache_modifier=".cg")
                for t in range(1, S):
                    acc += tl.load(
                        ws_tile + t * (BLOCK_M * BLOCK_N) + offs_tile,
                        mask=m_mask[:, None],
                        other=0.0,
                        cache_modifier=".cg",
                    )
                tl.atomic_xchg(cnt, 0)  # ready for the next launch / graph replay
    else:
        is_last = True

    # ---- epilogue: bias -> activation -> residual -> store ----
    if is_last:
        if HAS_BIAS:
            bias_addr = tl.load(row + _F_BIAS)
            if bias_addr != 0:
                bias_ptr = bias_addr.to(tl.pointer_type(bias_ref.dtype.element_ty))  # [N]
                if ALIGNED:
                    bias_ptr = tl.multiple_of(bias_ptr, 16)
                bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)
                acc += bias.to(tl.float32)[None, :]
        if HAS_ACT:
            acc = apply_activation(acc, tl.load(row + _F_ACT))
        out_mask = m_mask[:, None] & n_mask[None, :]
        if HAS_RES:
            res_addr = tl.load(row + _F_RES)
            if res_addr != 0:
                res_ptr = res_addr.to(tl.pointer_type(out_ref.dtype.element_ty))  # [M, N], may be out itself
                stride_rm = tl.load(row + _F_SRM)
                if ALIGNED:
                    res_ptr = tl.multiple_of(res_ptr, 16)
                    stride_rm = tl.multiple_of(stride_rm, VEC_OUT)
                # read before this program's store of the same elements: in-place `hidden += proj` is safe
                res = tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], mask=out_mask, other=0.0)
                acc += res.to(tl.float32)
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(out_ptrs, acc.to(out_ref.dtype.element_ty), mask=out_mask)


# ---------------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------------
@dataclass
class LinearProblem:
    x: torch.Tensor  # [M, K]; last dim contiguous, row stride may be > K
    weight: torch.Tensor  # [N, K] contiguous (nn.Linear layout): out = x @ weight.T
    out: torch.Tensor  # [M, N] written by the kernel; last dim contiguous, row stride may be > N
    bias: torch.Tensor | None = None  # [N]
    activation: str | None = None  # None | "quick_gelu" | "gelu" (exact erf) | "gelu_tanh"
    residual: torch.Tensor | None = None  # [M, N]; may be the same tensor as out (in-place add)


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CONFIG_KEYS = {
    "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages",
    "num_sms",  # SMs the split-K heuristic aims to fill (e.g. a green context's count)
    "programs_per_sm",  # split-K aims for num_sms * this many programs
    "min_k_iters",  # a split gets at least this many BLOCK_K iterations
    "input_precision",  # tl.dot input_precision for fp32 inputs ("ieee" default, "tf32", "tf32x3")
}


def _shape(t) -> str:
    return f"{tuple(t.shape)} {t.dtype} stride={t.stride()} on {t.device}"


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    if t.numel() == 0:
        return (t.data_ptr(), t.data_ptr())
    last = sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    return (t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size())


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
        if out.dim() != 2 or tuple(out.shape) != (M, N):
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
        if N > 1 and out.stride(1) != 1:
            raise ValueError(f"{where}: out must have a contiguous last dim (stride 1), got {_shape(out)}")
        if p.bias is not None:
            b = p.bias
            if not isinstance(b, torch.Tensor) or b.dim() != 1 or b.shape[0] != N or not b.is_contiguous():
                raise ValueError(f"{where}: bias must be a contiguous [N={N}] tensor, got "
                                 f"{_shape(b) if isinstance(b, torch.Tensor) else type(b).__name__}")
            if b.dtype != x.dtype:
                raise ValueError(f"{where}: bias dtype must equal x dtype {x.dtype}, got {b.dtype}")
        activation_code(p.activation)  # raises ValueError on an unknown name
        if p.residual is not None:
            r = p.residual
            if not isinstance(r, torch.Tensor) or r.dim() != 2 or tuple(r.shape) != (M, N):
                raise ValueError(f"{where}: residual must be [M={M}, N={N}], got "
                                 f"{_shape(r) if isinstance(r, torch.Tensor) else type(r).__name__}")
            if N > 1 and r.stride(1) != 1:
                raise ValueError(f"{where}: residual must have a contiguous last dim, got {_shape(r)}")
            if r.dtype != out.dtype:
                raise ValueError(f"{where}: residual dtype must equal out dtype {out.dtype}, got {r.dtype}")
            same_view = r.data_ptr() == out.data_ptr() and r.stride() == out.stride()
            ro, oo = _byte_range(r), _byte_range(out)
            if not same_view and ro[0] < oo[1] and oo[0] < ro[1]:
                raise ValueError(f"{where}: residual overlaps out without being the same view "
                                 f"(residual {_shape(r)}, out {_shape(out)}); pass out itself or a disjoint tensor")
        tensors = [("x", x), ("weight", w), ("out", out), ("bias", p.bias), ("residual", p.residual)]
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


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _smem_bytes(cfg: dict, elt: int) -> int:
    """Shared memory a config needs: pipelined A/B tiles, or the fp32 epilogue tile if larger."""
    pipe = cfg["num_stages"] * (cfg["BLOCK_M"] + cfg["BLOCK_N"]) * cfg["BLOCK_K"] * elt
    return max(pipe, cfg["BLOCK_M"] * cfg["BLOCK_N"] * 4)


def _default_config(problems, device) -> dict:
    """Heuristic block config. Small fixed tiles under the interpreter (fast tests)."""
    elt = problems[0].x.element_size()
    max_m = max(p.x.shape[0] for p in problems)
    if device.type != "cuda":
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
    bk = 64 if elt <= 2 else 32
    if elt == 4:  # fp32 inputs ("ieee" dot = FMA path): correctness use, keep tiles modest
        cfg = dict(BLOCK_M=min(64, max(16, _next_pow2(max_m))), BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4,
                   num_stages=3)
    elif max_m <= 128:
        # skinny: one M tile covers all rows so each weight byte is read once; weights stream at bandwidth
        cfg = dict(BLOCK_M=max(16, _next_pow2(max_m)), BLOCK_N=64, BLOCK_K=bk, GROUP_M=8, num_warps=4, num_stages=4)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=bk, GROUP_M=8, num_warps=8, num_stages=4)
    limit = device_smem_bytes(device)
    while cfg["num_stages"] > 2 and _smem_bytes(cfg, elt) > limit:
        cfg["num_stages"] -= 1
    while _smem_bytes(cfg, elt) > limit and cfg["BLOCK_N"] > 32:
        cfg["BLOCK_N"] //= 2
    return cfg


def _choose_splits(dims, cfg, device, split_k) -> list[int]:
    """K splits per problem. dims: [(M, N, K)]. split_k: None (auto), int (all), or list (per problem).

    Auto: no split while the output tiles of all problems fill the SMs; below that (skinny M), split so
    the launch has ~num_sms * programs_per_sm programs of about equal K work: a problem with 4x the K
    gets 4x the splits (work-proportional), and no split gets fewer than min_k_iters BLOCK_K steps."""
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    tiles = [triton.cdiv(m, bm) * triton.cdiv(n, bn) for m, n, _ in dims]
    iters = [max(1, triton.cdiv(k, bk)) for _, _, k in dims]
    if split_k is not None:
        ks = [split_k] * len(dims) if isinstance(split_k, int) else list(split_k)
        if len(ks) != len(dims) or any(not isinstance(s, int) or s < 1 for s in ks):
            raise ValueError(f"split_k must be None, an int >= 1 or one int >= 1 per problem, got {split_k!r}")
        return [min(s, it) for s, it in zip(ks, iters)]
    sms = cfg.get("num_sms") or num_sms(device)
    if sum(tiles) >= sms:
        return [1] * len(dims)
    target = sms * cfg.get("programs_per_sm", 2)
    work = sum(t * it for t, it in zip(tiles, iters))
    per_split = max(cfg.get("min_k_iters", 4), triton.cdiv(work, target))
    return [max(1, round(it / per_split)) for it in iters]


class _Plan:
    """Everything one launch needs: metadata, workspace, grid, constexprs. Built once."""

    def __init__(self, problems, cfg: dict, splits: list[int], outs=None):
        device = problems[0].x.device
        outs = outs if outs is not None else [p.out for p in problems]
        bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
        x_dtype = problems[0].x.dtype

        rows = []
        for i, (p, out) in enumerate(zip(problems, outs)):
            M, K = p.x.shape
            N = p.weight.shape[0]
            iters = triton.cdiv(K, bk)
            s = max(1, min(splits[i], iters)) if iters > 0 else 1
            ips = triton.cdiv(iters, s) if iters > 0 else 0
            s = triton.cdiv(iters, ips) if iters > 0 else 1  # drop empty splits
            tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
            rows.append(dict(i=i, p=p, out=out, M=M, N=N, K=K, S=s, ips=ips, tiles=tiles))
        # heaviest programs get the lowest ids: they start first (longest-processing-time-first)
        rows.sort(key=lambda r: -r["ips"])
        self.splits = [0] * len(rows)
        meta, start, ws_off, cnt_off = [], 0, 0, 0
        for r in rows:
            p, out = r["p"], r["out"]
            self.splits[r["i"]] = r["S"]
            m = [0] * _NF.value
            m[_F_X.value], m[_F_W.value], m[_F_OUT.value] = p.x.data_ptr(), p.weight.data_ptr(), out.data_ptr()
            m[_F_BIAS.value] = p.bias.data_ptr() if p.bias is not None else 0
            m[_F_RES.value] = p.residual.data_ptr() if p.residual is not None else 0
            m[_F_M.value], m[_F_N.value], m[_F_K.value] = r["M"], r["N"], r["K"]
            m[_F_SXM.value], m[_F_SOM.value] = p.x.stride(0), out.stride(0)
            m[_F_SRM.value] = p.residual.stride(0) if p.residual is not None else 0
            m[_F_ACT.value] = activation_code(p.activation)
            m[_F_START.value], m[_F_SPLIT.value], m[_F_IPS.value] = start, r["S"], r["ips"]
            m[_F_WS.value], m[_F_CNT.value] = ws_off, cnt_off
            start += r["tiles"] * r["S"]
            if r["S"] > 1:
                ws_off += r["tiles"] * r["S"] * bm * bn
                cnt_off += r["tiles"]
            meta.append(m)
        self.num_programs = start
        self.meta = torch.tensor(meta, dtype=torch.int64, device=device)
        self.ws = torch.empty(max(ws_off, 1), dtype=torch.float32, device=device)
        self.cnt = torch.zeros(max(cnt_off, 1), dtype=torch.int32, device=device)  # last arrival resets

        ptrs = [t for p, out in zip(problems, outs) for t in (p.x, p.weight, out, p.bias, p.residual) if t is not None]
        strides = [(p.x.stride(0), p.x.element_size()) for p in problems]
        strides += [(p.weight.shape[1], p.weight.element_size()) for p in problems]
        strides += [(o.stride(0), o.element_size()) for o in outs]
        strides += [(o.shape[1], e) for o in outs for e in (o.element_size(), problems[0].x.element_size())]
        strides += [(p.residual.stride(0), p.residual.element_size()) for p in problems if p.residual is not None]
        aligned = all(t.data_ptr() % 16 == 0 for t in ptrs) and all((s * e) % 16 == 0 for s, e in strides)
        bias_ref = next((p.bias for p in problems if p.bias is not None), problems[0].x)
        self.args = (self.meta, self.ws, self.cnt, problems[0].x, outs[0], bias_ref)
        self.constexprs = dict(
            NUM_PROBLEMS=len(rows),
            BLOCK_M=bm,
            BLOCK_N=bn,
            BLOCK_K=bk,
            GROUP_M=cfg["GROUP_M"],
            EVEN_K=all(r["K"] % bk == 0 for r in rows),
            ALIGNED=aligned,
            VEC_IN=16 // problems[0].x.element_size(),
            VEC_OUT=16 // outs[0].element_size(),
            HAS_BIAS=any(p.bias is not None for p in problems),
            HAS_ACT=any(p.activation is not None for p in problems),
            HAS_RES=any(p.residual is not None for p in problems),
            ANY_SPLIT=any(r["S"] > 1 for r in rows),
            INPUT_PRECISION=cfg.get("input_precision", "ieee") if x_dtype == torch.float32 else "tf32",
        )
        self.launch_opts = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
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

    Built once (validates, builds device-side metadata, picks config, allocates any split-K workspace);
    calling it only launches — no host<->device sync, no allocation, so a CUDA graph can capture
    __call__ and replay it. Pointers are baked in: the tensors in the problems must stay alive and be
    reused (static buffers).

    split_k: None = heuristic; an int forces that many K splits on every problem (clamped to its K
    iterations); a list gives one per problem. config: overrides of the heuristic block config, keys
    in _CONFIG_KEYS. tune=True (CUDA only): time a few candidate configs once, on scratch outputs, and
    keep the fastest (cached per shape signature).

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
        if tune and device.type == "cuda":
            cfg, split_k = _tune(self.problems, config or {}, split_k)
        else:
            cfg = {**_default_config(self.problems, device), **(config or {})}
        for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
            v = cfg[k]
            if not isinstance(v, int) or v < 16 or v & (v - 1):
                raise ValueError(f"config {k} must be a power of two >= 16, got {v!r}")
        dims = [(p.x.shape[0], p.weight.shape[0], p.x.shape[1]) for p in self.problems]
        self.config = cfg
        self._plan = _Plan(self.problems, cfg, _choose_splits(dims, cfg, device, split_k))
        self.splits = self._plan.splits  # K splits per problem, in the caller's order
        self.num_programs = self._plan.num_programs
        self._plan.warmup()

    @property
    def outputs(self) -> list[torch.Tensor]:
        return [p.out for p in self.problems]

    def __call__(self) -> None:
        self._plan.launch()


def grouped_linear(xs, weights, biases=None, activations=None, residuals=None, out_dtype=None,
                   **kwargs) -> list[torch.Tensor]:
    """Convenience: allocate outputs, build a GroupedLinear, run it once, return outputs."""
    if not isinstance(xs, (list, tuple)) or not isinstance(weights, (list, tuple)):
        raise ValueError("xs and weights must be lists of tensors")
    n = len(xs)
    biases = [None] * n if biases is None else list(biases)
    activations = [activations] * n if activations is None or isinstance(activations, str) else list(activations)
    residuals = [None] * n if residuals is None else list(residuals)
    if not (len(weights) == len(biases) == len(activations) == len(residuals) == n):
        raise ValueError(f"xs, weights, biases, activations, residuals must have equal lengths, got "
                         f"{n}, {len(weights)}, {len(biases)}, {len(activations)}, {len(residuals)}")
    if out_dtype is not None and out_dtype not in _DTYPES:
        raise ValueError(f"out_dtype must be None or one of fp16/bf16/fp32, got {out_dtype}")
    problems = []
    for x, w, b, a, r in zip(xs, weights, biases, activations, residuals):
        if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor) or x.dim() != 2 or w.dim() != 2:
            raise ValueError(f"each x must be a 2-D [M, K] tensor and each weight a 2-D [N, K] tensor, got "
                             f"{getattr(x, 'shape', type(x).__name__)} and {getattr(w, 'shape', type(w).__name__)}")
        out = torch.empty((x.shape[0], w.shape[0]), dtype=out_dtype or x.dtype, device=x.device)
        problems.append(LinearProblem(x, w, out, bias=b, activation=a, residual=r))
    GroupedLinear(problems, **kwargs)()
    return [p.out for p in problems]


# ---------------------------------------------------------------------------------------------------
# optional one-time tuning (CUDA): time candidates inside a CUDA graph on scratch outputs
# ---------------------------------------------------------------------------------------------------
_TUNE_CACHE: dict = {}


def _candidates(problems, device, base: dict) -> list[dict]:
    """A few block configs x split-K settings around the heuristic (split settings don't recompile)."""
    elt = problems[0].x.element_size()
    max_m = max(p.x.shape[0] for p in problems)
    bk = 64 if elt <= 2 else 32
    cands = [_default_config(problems, device)]
    if max_m <= 128:
        bm = max(16, _next_pow2(max_m))
        splits = ((1, 4), (2, 4), (2, 2), (4, 2), (1, 8))  # (programs_per_sm, min_k_iters)
        for bn, warps in ((64, 4), (128, 8)):
            for stages in (3, 4):
                for pps, mki in splits:
                    cands.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps,
                                      num_stages=stages, programs_per_sm=pps, min_k_iters=mki))
        for pps, mki in ((2, 2), (4, 2)):
            cands.append(dict(BLOCK_M=bm, BLOCK_N=32, BLOCK_K=bk, GROUP_M=8, num_warps=4, num_stages=4,
                              programs_per_sm=pps, min_k_iters=mki))
    else:
        for bm, bn, warps in ((128, 128, 8), (128, 256, 8), (64, 128, 4), (128, 64, 4), (64, 256, 8)):
            for stages in (3, 4):
                cands.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps,
                                  num_stages=stages))
    limit = device_smem_bytes(device)
    out = []
    for c in cands:
        c = {**c, **base}
        if _smem_bytes(c, elt) <= limit and c not in out:
            out.append(c)
    return out


def _tune(problems, base: dict, split_k):
    device = problems[0].x.device
    key = (
        torch.cuda.get_device_name(device), problems[0].x.dtype, problems[0].out.dtype, repr(sorted(base.items())),
        repr(split_k),
        tuple((p.x.shape[0], p.weight.shape[0], p.x.shape[1], p.bias is not None, p.activation,
               p.residual is not None) for p in problems),
    )
    if key in _TUNE_CACHE:
        return _TUNE_CACHE[key]
    outs = [torch.empty_like(p.out) for p in problems]  # scratch: the real out (maybe = residual) is untouched
    dims = [(p.x.shape[0], p.weight.shape[0], p.x.shape[1]) for p in problems]
    best = (math.inf, None)
    stream = torch.cuda.Stream(device)
    for cfg in _candidates(problems, device, base):
        try:
            plan = _Plan(problems, cfg, _choose_splits(dims, cfg, device, split_k), outs=outs)
            plan.warmup()
            with torch.cuda.stream(stream):
                plan.launch()  # first run outside capture (module load)
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                for _ in range(10):
                    plan.launch()
            graph.replay()
            times = []
            for _ in range(5):
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                graph.replay()
                e1.record()
                e1.synchronize()
                times.append(e0.elapsed_time(e1))
            t = sorted(times)[len(times) // 2]
        except Exception:  # e.g. out of resources for this config on this card: skip it
            continue
        if t < best[0]:
            best = (t, (cfg, plan.splits))
    if best[1] is None:
        best = (0.0, ({**_default_config(problems, device), **base}, split_k))
    _TUNE_CACHE[key] = best[1]
    return best[1]

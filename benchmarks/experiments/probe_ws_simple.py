"""Does Triton's automatic warp specialization (tl.range(..., warp_specialize=True)) work on this Hopper card, and
does it pay? Standalone matmul kernels (only dualfuse's PDL helpers), ViT-B/32 batch-32 FC1 shapes, fp16, bias + quick_gelu:

  host-desc   one problem (vision FC1 1600x768 @ 3072x768^T), host TensorDescriptors, WS off / on
  dev-desc    both towers in one launch (vision + text FC1), device-side descriptors, WS off / on, PDL off / on

Each variant: max relative error against torch (fp32 from the same fp16 inputs) and the median µs of
triton.testing.do_bench_cudagraph. torch.matmul (cuBLAS) of the same problems for reference.

    python benchmarks/experiments/probe_ws_simple.py [--json PATH]
"""
import argparse
import json
import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from dualfuse.kernels._utils import gdc_launch, gdc_wait


@triton.jit
def _k_loop_and_epilogue(x_desc, w_desc, b_ptr, c_ptr, pid_m, pid_n, M, N, K, BM: tl.constexpr, BN: tl.constexpr,
                         BK: tl.constexpr, WS: tl.constexpr, STAGES: tl.constexpr):
    """c[tile] = quick_gelu(x @ w.T + b) for one [BM, BN] tile: the K loop (warp-specialized or not) at top level."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in tl.range(0, tl.cdiv(K, BK), num_stages=STAGES, warp_specialize=WS):
        a = x_desc.load([pid_m * BM, k * BK])
        b = w_desc.load([pid_n * BN, k * BK])
        acc = tl.dot(a, b.T, acc)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    acc = acc * tl.sigmoid(1.702 * acc)
    tl.store(c_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(tl.float16),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def host_desc_mm(a_desc, b_desc, bias_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 WS: tl.constexpr, STAGES: tl.constexpr):
    pid = tl.program_id(0)
    pid_m = pid % tl.cdiv(M, BM)
    pid_n = pid // tl.cdiv(M, BM)
    _k_loop_and_epilogue(a_desc, b_desc, bias_ptr, c_ptr, pid_m, pid_n, M, N, K, BM, BN, BK, WS, STAGES)


@triton.jit
def dev_desc_mm(xa0, xa1, wa0, wa1, ba0, ba1, ca0, ca1, M0, M1, N0, N1, K0, K1, st1, BM: tl.constexpr, BN: tl.constexpr,
                BK: tl.constexpr, WS: tl.constexpr, PDL: tl.constexpr, STAGES: tl.constexpr):
    pid = tl.program_id(0)
    if PDL:
        gdc_launch()
    g = (pid >= st1).to(tl.int32)
    M = tl.where(g == 0, M0, M1)
    N = tl.where(g == 0, N0, N1)
    K = tl.where(g == 0, K0, K1)
    local = pid - g * st1
    pid_m = local % tl.cdiv(M, BM)
    pid_n = local // tl.cdiv(M, BM)
    x_ptr = tl.multiple_of(tl.where(g == 0, xa0, xa1).to(tl.pointer_type(tl.float16)), 16)
    w_ptr = tl.multiple_of(tl.where(g == 0, wa0, wa1).to(tl.pointer_type(tl.float16)), 16)
    b_ptr = tl.where(g == 0, ba0, ba1).to(tl.pointer_type(tl.float16))
    c_ptr = tl.where(g == 0, ca0, ca1).to(tl.pointer_type(tl.float16))
    K = tl.multiple_of(K, 16)
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[K, 1], block_shape=[BN, BK])
    if PDL:
        gdc_wait()
    _k_loop_and_epilogue(x_desc, w_desc, b_ptr, c_ptr, pid_m, pid_n, M, N, K, BM, BN, BK, WS, STAGES)


def ref(x, w, b):
    y = x.float() @ w.float().T + b.float()
    return y * torch.sigmoid(1.702 * y)


def rel(out, r):
    return ((out.float() - r).norm() / r.norm()).item()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    dev = "cuda"
    shapes = [(1600, 3072, 768), (2464, 2048, 512)]
    xs = [torch.randn(m, k, device=dev, dtype=torch.float16) for m, n, k in shapes]
    ws = [torch.randn(n, k, device=dev, dtype=torch.float16) / k**0.5 for m, n, k in shapes]
    bs = [torch.randn(n, device=dev, dtype=torch.float16) for m, n, k in shapes]
    refs = [ref(x, w, b) for x, w, b in zip(xs, ws, bs)]
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=dev))
    rows = []

    def record(name, fn, outs, problems):
        try:
            for o in outs:
                o.fill_(float("nan"))
            fn()
            torch.cuda.synchronize()
            err = max((rel(outs[i], refs[i]) for i in problems), default=float("nan"))
            us = triton.testing.do_bench_cudagraph(fn, rep=200) * 1e3
            rows.append(dict(variant=name, us=us, max_rel_err=err))
            print(f"{name:<34} {us:8.1f} us  rel err {err:.2e}", flush=True)
        except Exception as e:  # compile failure etc.
            rows.append(dict(variant=name, error=f"{type(e).__name__}: {str(e)[:300]}"))
            print(f"{name:<34} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)

    outs = [torch.empty(m, n, device=dev, dtype=torch.float16) for m, n, k in shapes]
    record("cuBLAS (torch, no activation) both", lambda: [torch.addmm(b, x, w.T, out=o) for x, w, b, o in zip(xs, ws, bs, outs)],
           [], [])
    for bm, bn, warps, stages in ((128, 256, 4, 3), (128, 128, 4, 4), (128, 256, 8, 3)):
        for wsp in (False, True):
            x, w, b, o = xs[0], ws[0], bs[0], outs[0]
            M, N, K = x.shape[0], w.shape[0], x.shape[1]
            ad = TensorDescriptor.from_tensor(x, [bm, 64])
            bd = TensorDescriptor.from_tensor(w, [bn, 64])
            grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
            record(f"host-desc {bm}x{bn} w{warps} s{stages} ws={int(wsp)}",
                   lambda: host_desc_mm[grid](ad, bd, b, o, M, N, K, BM=bm, BN=bn, BK=64, WS=wsp, STAGES=stages,
                                              num_warps=warps, num_stages=stages), [o], [0])
    for bm, bn, warps, stages in ((128, 256, 4, 3), (128, 128, 4, 4)):
        for wsp in (False, True):
            for pdl in (False, True):
                t0 = triton.cdiv(shapes[0][0], bm) * triton.cdiv(shapes[0][1], bn)
                t1 = triton.cdiv(shapes[1][0], bm) * triton.cdiv(shapes[1][1], bn)
                a = [xs[0].data_ptr(), xs[1].data_ptr(), ws[0].data_ptr(), ws[1].data_ptr(), bs[0].data_ptr(),
                     bs[1].data_ptr(), outs[0].data_ptr(), outs[1].data_ptr(), shapes[0][0], shapes[1][0],
                     shapes[0][1], shapes[1][1], shapes[0][2], shapes[1][2], t0]
                record(f"dev-desc 2 problems {bm}x{bn} w{warps} ws={int(wsp)} pdl={int(pdl)}",
                       lambda: dev_desc_mm[(t0 + t1,)](*a, BM=bm, BN=bn, BK=64, WS=wsp, PDL=pdl, STAGES=stages,
                                                       num_warps=warps, num_stages=stages, launch_pdl=pdl),
                       outs, [0, 1])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(card=torch.cuda.get_device_name(), triton=triton.__version__, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

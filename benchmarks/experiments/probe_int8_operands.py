"""Which tensor-core path does Triton compile for a weight-only int8 matmul, by operand order? Compile only (no GPU
needed): a minimal int8-weight matmul in two operand orders, compiled for sm_90 (H100/H200) and sm_87 (Jetson Orin);
prints, for each, whether the K loop's dot is wgmma or mma.sync and whether the widened int8 tile is an operand in
registers or written back to shared memory.

  plain    y = x @ w.T             x [BM, BK] fp16, w.T [BK, BN] int8 widened: the grouped GEMM's order today
  swap_ab  y.T = w @ x.T           w [BN, BK] int8 widened first: N fills wgmma's 64 rows even at M = 16

    python benchmarks/experiments/probe_int8_operands.py
"""
import os

os.environ.pop("TRITON_INTERPRET", None)  # real JITFunctions for triton.compile

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402


@triton.jit
def int8_matmul(x_ptr, w_ptr, y_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                SWAP_AB: tl.constexpr):
    # x_ptr: [M, K] fp16; w_ptr: [N, K] int8; y_ptr: [M, N] fp16. One program: all M rows, BN columns.
    pid_n = tl.program_id(0)
    rn = pid_n * BN + tl.arange(0, BN)
    rm = tl.arange(0, BM)
    rk = tl.arange(0, BK)
    if SWAP_AB:  # y.T = w @ x.T: the widened weight is the dot's first operand
        acc = tl.zeros((BN, BM), tl.float32)
        for k0 in range(0, K, BK):
            w = tl.load(w_ptr + rn[:, None] * K + (k0 + rk)[None, :])  # [BN, BK] int8
            x = tl.load(x_ptr + rm[None, :] * K + (k0 + rk)[:, None], mask=rm[None, :] < M, other=0.0)  # [BK, BM]
            acc = tl.dot(w.to(tl.float16), x, acc)
        tl.store(y_ptr + rm[None, :] * N + rn[:, None], acc.to(tl.float16), mask=rm[None, :] < M)
    else:  # y = x @ w.T: the grouped GEMM's order
        acc = tl.zeros((BM, BN), tl.float32)
        for k0 in range(0, K, BK):
            x = tl.load(x_ptr + rm[:, None] * K + (k0 + rk)[None, :], mask=rm[:, None] < M, other=0.0)  # [BM, BK]
            w = tl.load(w_ptr + rn[None, :] * K + (k0 + rk)[:, None])  # [BK, BN] int8 (w.T)
            acc = tl.dot(x, w.to(tl.float16), acc)
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(tl.float16), mask=rm[:, None] < M)


SIGNATURE = {"x_ptr": "*fp16", "w_ptr": "*i8", "y_ptr": "*fp16", "M": "i32", "N": "i32", "K": "i32",
             "BM": "constexpr", "BN": "constexpr", "BK": "constexpr", "SWAP_AB": "constexpr"}
CASES = [(False, (16, 128, 64)), (False, (64, 128, 64)), (True, (16, 64, 128)), (True, (64, 128, 64))]


def describe(swap_ab, bm, bn, bk, cc) -> str:
    out = triton.compile(ASTSource(int8_matmul, SIGNATURE, {"BM": bm, "BN": bn, "BK": bk, "SWAP_AB": swap_ab}),
                         target=GPUTarget("cuda", cc, 32), options={"num_warps": 4, "num_stages": 4})
    loop = out.asm["ttgir"].split("scf.for", 1)[1]
    dots = [line for line in loop.splitlines() if "warp_group_dot " in line or "tt.dot " in line]
    kind = "wgmma" if "warp_group_dot " in dots[0] else "mma.sync"
    types = dots[0][min(i for i in (dots[0].find(" : tensor<"), dots[0].find(" : !ttg.memdesc<")) if i >= 0) + 3:]
    first, second = types.split(" * ")[:2]  # the operand types: "tensor<...>" in registers, "!ttg.memdesc<...>" not
    where = lambda t: "registers" if t.strip().startswith("tensor") else "shared memory"  # noqa: E731
    widened = "first" if swap_ab else "second"
    name = "swap_ab" if swap_ab else "plain"
    return (f"{name:8s} BM={bm:<3d} BN={bn:<3d} BK={bk:<3d} sm_{cc}: {kind:8s} first operand in "
            f"{where(first)}, second in {where(second)} (the widened int8 tile is the {widened})")


def main():
    print(f"Triton {triton.__version__}")
    for swap_ab, (bm, bn, bk) in CASES:
        for cc in (90, 87):
            print(describe(swap_ab, bm, bn, bk, cc))


if __name__ == "__main__":
    main()

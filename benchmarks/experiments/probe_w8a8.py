"""Does a skinny GEMM with int8 weights AND int8 activations (W8A8, int8 tensor cores) stream weight bytes as fast as
fp16, where weight-only int8 (W8A16) does not?

Why: W8A16 loads an int8 weight tile, widens it to fp16 in registers and does an fp16 dot. On sm_90 Triton compiles
a 64-row fp16 dot to wgmma, whose B operand must come from shared memory, so the widened tile goes registers ->
shared memory -> wgmma: an extra round trip per K step, and W8A16 reaches only 0.25-0.55 of fp16's weight bytes/s.
W8A8 feeds the int8 weight tile to the dot unchanged (int8 x int8 -> int32): no widening. The activations are
quantized on the fly instead: a pre-pass over K takes each row's absmax, then every x tile is rounded to int8 with
its row's scale before the dot. What Triton 3.8 makes of it (compiled for sm_90 and sm_80): the int8 weight tile
goes from its cp.async shared buffer straight into wgmma (BM 64 on sm_90: m64nNk32 s8) or ldmatrix + mma.sync
m16n8k32 s8; the quantized x tile, though, reaches the dot-operand layout through shared memory (BM x BK bytes per
K step, against W8A16's BK x BN x 2), and on sm_90 each step's wgmma is waited for (as W8A16's; fp16 keeps one in
flight).

One kernel, y[M, N] = x[M, K] @ w[N, K].T, x and y fp16, one program per (M tile, N tile), pointer loads:
  fp16   w fp16, fp32 accumulator
  w8a16  w int8 + per-output-channel fp32 scale, widened exactly to fp16 by integer ops (as the grouped GEMM does)
  w8a8   w int8 + scale, x quantized per row (symmetric, absmax / 127), int32 accumulator, both scales in the epilogue

Weight streaming (GPU): the ViT-B/32 layer steps (N, K) qkv (2304, 768), out (768, 768), fc1 (3072, 768),
fc2 (768, 3072) at M = 16, 50, 77. Each mode gets its own best config from a small sweep (BM, BN, BK, stages).
Cold L2: one CUDA graph launches the kernel once per weight set over enough distinct weight sets to move >= 3x the
L2 size per replay; µs per launch = replay time / sets, median of the replays. Reported: µs, weight bytes (fp16
2NK, int8 NK + 4N) and GB/s, int8/fp16 ratios of time and of weight bytes/s. Target: bytes/s ratio >= 0.85.
Accuracy (M = 50): relative Frobenius error and min per-row cosine vs a float64 reference with the dequantized
weight, for plain randn activations and for activations with 2 outlier channels (x 50, as real CLIP activations
have), which is what per-row activation quantization is weakest at.

    python benchmarks/experiments/probe_w8a8.py [--sms 8] [--json P]    # GPU (H100: under ~2 minutes)
    python benchmarks/experiments/probe_w8a8.py --smoke                 # CPU, Triton interpreter: correctness only

--sms N runs inside an N-SM green context. Green contexts limit SMs only: memory bandwidth and clocks stay the full
card's (an 8-SM run is not a Jetson Orin's 68-102 GB/s).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent / "src"))  # dualfuse.green for --sms
# The interpreter has to be chosen before triton is imported: --smoke, or no CUDA. With --sms nothing may touch CUDA
# before the green context is entered in main(), so that case is not checked here (it needs a GPU anyway).
if "--smoke" in sys.argv[1:] or (not any(a.startswith("--sms") for a in sys.argv[1:])
                                  and not torch.cuda.is_available()):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

MODES = ("fp16", "w8a16", "w8a8")  # MODE 0, 1, 2 of the kernel
SHAPES = {"qkv": (2304, 768), "out": (768, 768), "fc1": (3072, 768), "fc2": (768, 3072)}  # step: (N, K), ViT-B/32
ROWS = (16, 50, 77)
# (BM, BN, BK, num_stages), num_warps 4. BM 64 is the one that compiles to wgmma on sm_90 (16 / 32: mma.sync).
CONFIGS = [(bm, bn, bk, st) for bm in (16, 32, 64) for bn in (32, 64, 128) for bk in (64, 128) for st in (3, 4)]
SMOKE_SHAPES = [(3, 40, 96), (20, 64, 128)]  # (M, N, K): masked rows, columns and K steps
SMOKE_CONFIG = (16, 32, 32, 1)
SMOKE_MAX_ERR = {"fp16": 1e-2, "w8a16": 1e-2, "w8a8": 3e-2}


@triton.jit(do_not_specialize=["M"])  # M changes per row case: no recompile for it
def skinny_gemm(
    x_ptr,  # fp16 [M, K], row-major
    w_ptr,  # [N, K], row-major: fp16 (MODE 0) or int8 (MODE 1, 2)
    s_ptr,  # fp32 [N], per-output-channel weight scale (MODE 1, 2; MODE 0 ignores it)
    y_ptr,  # fp16 [M, N], row-major
    M, N, K,
    MODE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = rm < M
    n_ok = rn < N
    x_rows = x_ptr + rm[:, None] * K  # [BM, 1]
    w_cols = w_ptr + rn[None, :] * K  # [1, BN]: tiles of w.T, K contiguous in each column
    if MODE == 2:
        # Per-row activation scale first: the whole K range of the program's rows (x is small and stays in L2).
        amax = tl.zeros((BM,), tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + rk
            a = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & (kk[None, :] < K), other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(a.to(tl.float32)), axis=1))
        s_row = tl.maximum(amax, 1e-8) / 127.0
        inv_s = 1.0 / s_row  # a multiply per element in the K loop, not a divide
        acc = tl.zeros((BM, BN), tl.int32)
    else:
        acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        a = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & (kk[None, :] < K), other=0.0)  # [BM, BK] fp16
        b = tl.load(w_cols + kk[:, None], mask=(kk[:, None] < K) & n_ok[None, :], other=0)  # [BK, BN]
        if MODE == 0:
            acc = tl.dot(a, b, acc)
        elif MODE == 1:
            # Exact widening by integer ops: the byte q xor 0x80 is q + 128; under the fp16 exponent bits 0x64 it
            # reads 1024 + q + 128.
            u = b.to(tl.uint8, bitcast=True).to(tl.uint16) ^ 0x6480
            acc = tl.dot(a, u.to(tl.float16, bitcast=True) - 1152.0, acc)
        else:
            v = tl.minimum(tl.maximum(a.to(tl.float32) * inv_s[:, None], -127.0), 127.0)
            # Round half away from zero by plain arithmetic (float -> int truncates): same in the interpreter and
            # on every GPU, unlike the tl.math / libdevice rounding functions across Triton versions.
            q = tl.where(v >= 0, v + 0.5, v - 0.5).to(tl.int8)
            acc = tl.dot(q, b, acc, out_dtype=tl.int32)  # int8 x int8 -> int32, the weight tile as loaded
    if MODE == 0:
        out = acc
    else:
        scale = tl.load(s_ptr + rn, mask=n_ok, other=0.0)
        if MODE == 1:
            out = acc * scale[None, :]
        else:
            out = acc.to(tl.float32) * s_row[:, None] * scale[None, :]
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], out.to(tl.float16), mask=m_ok[:, None] & n_ok[None, :])


def launch(mode, cfg, x, w, s, y):
    m, k = x.shape
    n = w.shape[0]
    bm, bn, bk, stages = cfg
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    skinny_gemm[grid](x, w, s, y, m, n, k, MODE=MODES.index(mode), BM=bm, BN=bn, BK=bk, num_warps=4,
                   num_stages=stages)


def quantize(w):
    """Symmetric per-output-channel int8: (q int8 [N, K], scale fp32 [N]), w ~= q * scale[:, None]."""
    scale = w.abs().amax(dim=1).clamp_min(1e-8) / 127
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale.float()


def weight_bytes(mode, n, k):
    return 2 * n * k if mode == "fp16" else n * k + 4 * n


# ---------------------------------------------------------------------------------------------------------------
# accuracy
# ---------------------------------------------------------------------------------------------------------------
def accuracy(q, scale, x, cfgs):
    """{mode: (relative Frobenius error, min per-row cosine)} vs float64 x @ (q * scale).T; fp16 gets the
    dequantized weight in fp16, so every mode is measured against the same reference."""
    w_deq = q.double() * scale.double()[:, None]
    ref = x.double() @ w_deq.T
    out = {}
    for mode in MODES:
        w, s = (w_deq.half(), scale) if mode == "fp16" else (q, scale)
        y = torch.empty(x.shape[0], q.shape[0], device=x.device, dtype=torch.float16)
        launch(mode, cfgs[mode], x, w, s, y)
        y = y.double()
        rel = ((y - ref).norm() / ref.norm()).item()
        cos = torch.nn.functional.cosine_similarity(y, ref, dim=-1).min().item()
        out[mode] = (rel, cos)
    return out


def with_outliers(x, gen, channels=2, factor=50.0):
    """x with `channels` of its K columns scaled by `factor` (real CLIP activations have a few such channels)."""
    cols = torch.randperm(x.shape[1], generator=gen)[:channels].to(x.device)
    x = x.clone()
    x[:, cols] *= factor
    return x


def smoke() -> int:
    gen = torch.Generator().manual_seed(0)
    cfgs = {mode: SMOKE_CONFIG for mode in MODES}
    ok = True
    for m, n, k in SMOKE_SHAPES:
        q, s = quantize(torch.randn(n, k, generator=gen) / k ** 0.5)
        x = torch.randn(m, k, generator=gen).half()
        for case, xs in (("randn", x), ("2 outlier channels", with_outliers(x, gen))):
            res = accuracy(q, s, xs, cfgs)
            print(f"  M={m:<3d} N={n:<3d} K={k:<4d} {case:19s} "
                  + "  ".join(f"{mode} rel {rel:.2e} cos {cos:.5f}" for mode, (rel, cos) in res.items()))
            if case == "randn":
                for mode, (rel, _) in res.items():
                    if not rel <= SMOKE_MAX_ERR[mode]:
                        print(f"smoke FAILED: M={m} N={n} K={k} {mode} rel err {rel:.3g} > {SMOKE_MAX_ERR[mode]}")
                        ok = False
    if ok:
        print("smoke ok")
    return 0 if ok else 1


# ---------------------------------------------------------------------------------------------------------------
# weight streaming (GPU)
# ---------------------------------------------------------------------------------------------------------------
def time_graph(mode, cfg, x, wsets, y, reps):
    """µs per launch: one CUDA graph launching the kernel once per weight set, replayed; median over `reps`."""
    for w, s in wsets:  # compile and load outside the capture
        launch(mode, cfg, x, w, s, y)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w, s in wsets:
            launch(mode, cfg, x, w, s, y)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / len(wsets))
    del graph
    return statistics.median(times)


def cfg_name(cfg):
    bm, bn, bk, st = cfg
    return f"{bm}x{bn}x{bk} s{st}"


def bench(args, device) -> tuple[list[dict], list[dict]]:
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    gen = torch.Generator(device=device).manual_seed(0)
    rows, acc_rows = [], []
    for step, (n, k) in SHAPES.items():
        # Distinct weight sets per format (w8a16 and w8a8 read the same int8 sets).
        wsets = {}
        ones = torch.ones(n, device=device)  # fp16 ignores the scale
        for fmt in ("fp16", "int8"):
            sets = min(256, max(2, math.ceil(3 * l2 / weight_bytes("fp16" if fmt == "fp16" else "w8a8", n, k))))
            ws = []
            for _ in range(sets):
                w = torch.randn(n, k, device=device, generator=gen) / k ** 0.5
                ws.append((w.half(), ones) if fmt == "fp16" else quantize(w))
            wsets[fmt] = ws
        for m in ROWS:
            x = torch.randn(m, k, device=device, generator=gen).half()
            y = torch.empty(m, n, device=device, dtype=torch.float16)
            row, best_cfgs = dict(step=step, N=n, K=k, M=m), {}
            for mode in MODES:
                ws = wsets["fp16" if mode == "fp16" else "int8"]
                sweep = {}
                for cfg in CONFIGS:
                    try:
                        sweep[cfg] = time_graph(mode, cfg, x, ws, y, args.sweep_reps)
                    except Exception as e:  # e.g. out of shared memory: skip the config, say so
                        print(f"  {step} M={m} {mode} {cfg_name(cfg)} skipped: {type(e).__name__}: {e}"[:200])
                        torch.cuda.synchronize()
                if not sweep:
                    raise SystemExit(f"{step} M={m} {mode}: no config ran")
                best = best_cfgs[mode] = min(sweep, key=sweep.get)
                us = time_graph(mode, best, x, ws, y, args.reps)  # the best config again, more replays
                wb = weight_bytes(mode, n, k)
                row[mode] = dict(us=us, config=cfg_name(best), weight_bytes=wb, weight_gbps=wb / us / 1e3,
                                 sets=len(ws), sweep={cfg_name(c): t for c, t in sweep.items()})
            f16 = row["fp16"]
            for mode in MODES[1:]:
                row[f"{mode}_time_ratio"] = row[mode]["us"] / f16["us"]
                row[f"{mode}_bytes_per_s_ratio"] = row[mode]["weight_gbps"] / f16["weight_gbps"]
            rows.append(row)
            print(f"  {step:4s} M={m:<3d} " + "  ".join(f"{mode} {row[mode]['us']:7.2f} µs ({row[mode]['config']})"
                                                      for mode in MODES)
                  + f"  bytes/s vs fp16: w8a16 {row['w8a16_bytes_per_s_ratio']:.2f} "
                    f"w8a8 {row['w8a8_bytes_per_s_ratio']:.2f}", flush=True)
            if m == 50:  # accuracy with this row case's best configs and the first int8 weight set
                q, s = wsets["int8"][0]
                cpu_gen = torch.Generator().manual_seed(1)
                xa = torch.randn(m, k, generator=cpu_gen).half().to(device)
                for case, xs in (("randn", xa), ("2 outlier channels", with_outliers(xa, cpu_gen))):
                    res = accuracy(q, s, xs, best_cfgs)
                    acc_rows.append(dict(step=step, N=n, K=k, M=m, x=case, **{
                        mode: dict(rel_err=rel, min_cosine=cos) for mode, (rel, cos) in res.items()}))
        del wsets
        torch.cuda.empty_cache()
    return rows, acc_rows


def environment(device) -> dict:
    p = torch.cuda.get_device_properties(device)
    return dict(card=p.name, capability=f"sm_{p.major}{p.minor}", sms_total=p.multi_processor_count,
                l2_bytes=p.L2_cache_size, torch=torch.__version__, triton=triton.__version__,
                date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))


def print_table(doc: dict) -> None:
    env = doc["environment"]
    print(f"\nW8A8 vs W8A16 vs fp16 skinny GEMM, cold L2 — {env['card']}, Triton {env['triton']}"
          + (f", {doc['sms']} SMs (green context; bandwidth and clocks of the full card)" if doc.get("sms") else ""))
    print("step  M     fp16 µs  w8a16 µs  w8a8 µs   fp16 GB/s w8a16 GB/s w8a8 GB/s   "
          "w8a16/fp16 time bytes/s   w8a8/fp16 time bytes/s   best configs fp16 / w8a16 / w8a8")
    for r in doc["rows"]:
        print(f"{r['step']:5s} {r['M']:<3d} " + "".join(f"{r[mode]['us']:9.2f} " for mode in MODES)
              + " " + "".join(f"{r[mode]['weight_gbps']:10.0f} " for mode in MODES)
              + f"  {r['w8a16_time_ratio']:14.2f} {r['w8a16_bytes_per_s_ratio']:7.2f}"
              + f"  {r['w8a8_time_ratio']:13.2f} {r['w8a8_bytes_per_s_ratio']:7.2f}   "
              + " / ".join(r[mode]["config"] for mode in MODES))
    print("target: bytes/s ratio >= 0.85 (int8 streams weight bytes at >= 85% of fp16's rate)")
    print("accuracy (M=50) vs float64 with the dequantized weight: relative error / min per-row cosine")
    for r in doc["accuracy"]:
        print(f"{r['step']:5s} {r['x']:19s} " + "  ".join(
            f"{mode} {r[mode]['rel_err']:.2e} / {r[mode]['min_cosine']:.5f}" for mode in MODES))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write every row here")
    ap.add_argument("--sms", type=int, default=None, help="run inside a green context of N SMs")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU / Triton interpreter: correctness only on tiny shapes (also when CUDA is unavailable)")
    ap.add_argument("--reps", type=int, default=30, help="timed graph replays of each mode's best config")
    ap.add_argument("--sweep-reps", type=int, default=5, dest="sweep_reps",
                    help="timed graph replays of each config in the sweep")
    args = ap.parse_args(argv)
    green = None
    if args.sms is not None and not args.smoke:
        from dualfuse.green import enter

        green = enter(args.sms)  # before anything touches CUDA (also torch.cuda.is_available)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if args.smoke or not torch.cuda.is_available():
        if not interpreted:  # only when main() is called from another module that imported triton first
            print("smoke runs need TRITON_INTERPRET=1 before triton is imported", file=sys.stderr)
            return 2
        print("smoke: Triton interpreter, tiny shapes, correctness only", flush=True)
        return smoke()
    if interpreted:
        print("TRITON_INTERPRET=1 with a GPU: unset it to time the kernels, or run --smoke", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    t0 = time.perf_counter()
    doc = dict(schema="dualfuse.probe-w8a8/1", command=" ".join(["python", "benchmarks/experiments/probe_w8a8.py",
                                                                 *(argv if argv is not None else sys.argv[1:])]),
               environment=environment(device), sms=args.sms, green_context=green,
               configs=[cfg_name(c) + " w4" for c in CONFIGS], reps=args.reps, sweep_reps=args.sweep_reps)
    doc["rows"], doc["accuracy"] = bench(args, device)
    doc["seconds"] = time.perf_counter() - t0
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1, default=str)
    print_table(doc)
    print(f"{doc['seconds']:.0f} s" + (f"; results written to {args.json}" if args.json else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

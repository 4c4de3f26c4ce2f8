"""Weight-only int8 vs fp16: the grouped GEMM streaming weights, and the fused executor end to end.

    python benchmarks/int8.py --json int8.json                 # both parts, on a GPU (under a minute each on an H100)
    python benchmarks/int8.py --part gemm --sms 16 --json g.json   # inside a 16-SM green context (one count a process)
    python benchmarks/int8.py --smoke                           # CPU: correctness only, tiny shapes, the interpreter
    python benchmarks/int8.py --widen-convert --json w.json     # also int8 widened by the int-to-float instruction
    python benchmarks/int8.py --int8-block-m 16,32              # also int8 with every GEMM's tiles of 16 / 32 rows

(1) Weight streaming (``gemm``): one grouped launch per step of a ViT-B/32 layer (QKV, out-proj, FC1, FC2; the
vision and the text problem of the step in one launch, the real N and K from benchmarks/_shapes.py), at M = 16 rows
per tower and at the model's own rows at batch 1 (50 image / 77 text), fp16 weights vs int8 weights (+ fp32 scales),
fp16 activations, each with the default config the executor would get. Cold L2: each timed graph replays one launch
per weight set over enough distinct weight sets to move >= 3x the L2 size per replay, so every launch reads its
weights from DRAM; time per launch = replay time / sets (median of the replays). Reported: µs per launch, weight
bytes per launch and bytes/s, int8/fp16 time and int8/fp16 bytes-per-second. Target: int8 streams weight bytes at
>= 85% of fp16's bytes/s (at M = 16: <= ~0.6x the fp16 time), and is never slower than fp16 where compute dominates.

(2) End to end (``e2e``): ``fused`` fp16, ``fused`` int8 and the two-branch CUDA ``graph`` executor for ViT-B/32
1 image + 1 text, image-only batch 1 and 8, SigLIP B/16 1 + 1 (random seeded weights), all built in one process;
alternating rounds (every executor once per round, rounds x calls >= 50 timed calls each), CUDA events per call,
median and p90; parity per row: min per-embedding cosine (and relative error) vs the fp32 reference forward of the
same weights; weight bytes per call (dualfuse.quantize.weight_bytes); on the full card of a known target
(dualfuse.targets: H100, H200, Orin) the floor of the call at the executor's weight format (dualfuse.floors) and the
share of it the median reached (floor / median).

JSON (``--json P``): card, versions, every row. The short table is printed last. Green contexts limit SMs only:
memory bandwidth and clocks stay those of the big card (an 8-SM run is not a Jetson Orin's 68-102 GB/s).
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
if "--smoke" in sys.argv[1:]:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernels through the CPU interpreter
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.append(str(HERE))  # _shapes (appended: benchmarks/ must not shadow packages, see _shapes.spec)

E2E_CASES = {  # name: (preset, images, texts)
    "b32 1+1": ("clip-vit-b-32", 1, 1),
    "b32 img 1": ("clip-vit-b-32", 1, 0),
    "b32 img 8": ("clip-vit-b-32", 8, 0),
    "siglip-b16 1+1": ("siglip-base-patch16-224", 1, 1),
}
SMOKE_CASES = {"clip-tiny 1+1": ("clip-tiny", 1, 1), "siglip-tiny img 2": ("siglip-tiny", 2, 0)}
STEPS = ("qkv", "out", "fc1", "fc2")


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def _p90(xs):
    s = sorted(xs)
    return s[min(len(s) - 1, int(math.ceil(0.9 * len(s))) - 1)] if s else float("nan")


# ---------------------------------------------------------------------------------------------------------------
# (1) weight streaming
# ---------------------------------------------------------------------------------------------------------------
def layer_steps(label: str, smoke: bool):
    """[(step, [(N, K, activation, residual) vision, text])] of one layer."""
    if smoke:
        (dv, fv), (dt, ft), act = (40, 72), (24, 48), "quick_gelu"
    else:
        from _shapes import gemm_shapes

        (dv, _, fv), (dt, _, ft), act = gemm_shapes(label)
    out = []
    for step in STEPS:
        probs = []
        for d, f in ((dv, fv), (dt, ft)):
            n, k = {"qkv": (3 * d, d), "out": (d, d), "fc1": (f, d), "fc2": (d, f)}[step]
            probs.append((n, k, act if step == "fc1" else None, step in ("out", "fc2")))
        out.append((step, probs))
    return out


def _problems(dims, rows, fmt, device, gen):
    """One weight set: a LinearProblem per tower (fresh weights, shared activations per tower index)."""
    from dualfuse.kernels.gemm import LinearProblem
    from dualfuse.quantize import quantize_weight

    probs = []
    for (n, k, act, res), m in zip(dims, rows):
        x = torch.randn(m, k, generator=gen).to(device, torch.float16)
        w = torch.randn(n, k, generator=gen).to(device) / k ** 0.5
        b = torch.randn(n, generator=gen).to(device, torch.float16) * 0.1
        if fmt == "int8":
            w, s = quantize_weight(w, "int8")
        else:
            w, s = w.half(), None
        r = torch.randn(m, n, generator=gen).to(device, torch.float16) if res else None
        out = r if res else torch.empty(m, n, device=device, dtype=torch.float16)
        probs.append(LinearProblem(x, w, out, bias=b, activation=act, residual=r, weight_scale=s))
    return probs


def int8_variants(args) -> dict[str, dict]:
    """The int8 variants asked for beside the default: column name -> GroupedLinear config (the fused executor's
    gemm_config end to end). --widen-convert: the int-to-float instruction; --int8-block-m N: N-row tiles."""
    out = {"int8-convert": {"widen": "convert"}} if args.widen_convert else {}
    for bm in args.int8_block_m:
        out[f"int8-bm{bm}"] = {"BLOCK_M": bm}
    return out


def bench_gemm(args, device) -> list[dict]:
    from dualfuse.kernels._utils import l2_cache_bytes
    from dualfuse.kernels.gemm import GroupedLinear
    from dualfuse.quantize import dequantize_weight

    gen = torch.Generator().manual_seed(0)
    cuda = device.type == "cuda"
    extra = int8_variants(args)  # more int8 columns: name -> GEMM config
    rows_cases = {"M=16": (16, 16), "model M (50/77)": (50, 77)} if not args.smoke else {"M=3/50": (3, 50)}
    l2 = l2_cache_bytes(device)
    results = []
    for step, dims in layer_steps("ViT-B/32", args.smoke):
        for rows_name, rows in rows_cases.items():
            row = dict(model="ViT-B/32" if not args.smoke else "smoke", step=step, rows=rows_name,
                       N_K=[(n, k) for n, k, _, _ in dims])
            for fmt in ("fp16", "int8") + tuple(extra):
                quant = fmt.startswith("int8")
                wbytes = sum(n * k * (1 if quant else 2) + (4 * n if quant else 0) for n, k, _, _ in dims)
                sets = 1 if not cuda else max(2, math.ceil(3 * l2 / wbytes))
                sets = min(sets, args.max_sets)
                ops, probsets = [], []
                for _ in range(sets):
                    ps = _problems(dims, rows, "int8" if quant else "fp16", device, gen)
                    probsets.append(ps)
                    ops.append(GroupedLinear(ps, config=extra.get(fmt)))
                if not cuda:  # smoke: correctness only
                    for ps in probsets:
                        refs = []
                        for p in ps:
                            w = dequantize_weight(p.weight, p.weight_scale) if p.weight_scale is not None else p.weight
                            y = p.x.double() @ w.double().T + p.bias.double()
                            if p.activation == "quick_gelu":
                                y = y * torch.sigmoid(1.702 * y)
                            refs.append(y + (p.residual.double() if p.residual is not None else 0))
                        for op in ops[:1]:
                            op()
                        for p, ref in zip(ps, refs):
                            err = ((p.out.double() - ref).norm() / ref.norm()).item()
                            if not err <= 1e-2:
                                raise SystemExit(f"smoke: {step} {fmt} rel err {err:.3g} > 1e-2")
                        break
                    row[fmt] = dict(us=None, weight_bytes=wbytes, sets=sets, config=_cfg(ops[0]), ok=True)
                    continue
                graph = torch.cuda.CUDAGraph()
                for op in ops:  # load outside the capture
                    op()
                torch.cuda.synchronize()
                with torch.cuda.graph(graph):
                    for op in ops:
                        op()
                for _ in range(3):
                    graph.replay()
                torch.cuda.synchronize()
                times = []
                for _ in range(args.gemm_reps):
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    graph.replay()
                    b.record()
                    b.synchronize()
                    times.append(a.elapsed_time(b) * 1e3 / sets)  # µs per launch
                us = _median(times)
                row[fmt] = dict(us=us, p90_us=_p90(times), weight_bytes=wbytes, sets=sets,
                                weight_gbps=wbytes / us / 1e3, config=_cfg(ops[0]))
                del graph, ops, probsets
                torch.cuda.empty_cache()
            if cuda:
                f, q = row["fp16"], row["int8"]
                row["int8_time_ratio"] = q["us"] / f["us"]
                row["int8_bytes_per_s_ratio"] = q["weight_gbps"] / f["weight_gbps"]
                for fmt in extra:
                    row[f"{fmt.replace('-', '_')}_time_ratio"] = row[fmt]["us"] / f["us"]
            results.append(row)
            print(f"  gemm {step:4s} {rows_name:16s} " + (
                f"fp16 {row['fp16']['us']:7.2f} µs  int8 {row['int8']['us']:7.2f} µs  "
                f"x{row['int8_time_ratio']:.2f}  bytes/s {row['int8_bytes_per_s_ratio']:.2f}"
                + "".join(f"  {fmt} {row[fmt]['us']:7.2f} µs" for fmt in extra)
                if cuda else "ok"),
                flush=True)
    return results


def _cfg(op) -> str:
    c = op.config
    return (f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']} w{c['num_warps']} s{c['num_stages']} "
            f"splits {op.splits}")


# ---------------------------------------------------------------------------------------------------------------
# (2) end to end
# ---------------------------------------------------------------------------------------------------------------
def bench_e2e(args, device) -> list[dict]:
    import dualfuse
    from dualfuse import executors, presets, reference
    from dualfuse.adapters import to_spec
    from dualfuse.bench import random_inputs
    from dualfuse.quantize import weight_bytes

    cuda = device.type == "cuda"
    dtype = torch.float16
    cases = SMOKE_CASES if args.smoke else E2E_CASES
    results = []
    models: dict[str, tuple] = {}
    for case, (preset, ni, nt) in cases.items():
        if preset not in models:
            model = presets.load(preset, seed=0)
            models[preset] = (model, to_spec(model))
        model, spec = models[preset]
        towers = tuple(t for t, n in (("vision", ni), ("text", nt)) if n)
        inputs = random_inputs(spec, ni, nt, sets=4, seed=1, device=device, dtype=dtype)
        ref_spec = spec.to(device=device, dtype=torch.float32)
        with torch.no_grad():
            refs = [(reference.encode_image(ref_spec, px.float()) if ni else None,
                     reference.encode_text(ref_spec, ids) if nt else None) for px, ids in inputs]
        del ref_spec
        variants = {"fused fp16": ("fused", {}), "fused int8": ("fused", {"weights": "int8"})}
        for fmt, cfg in int8_variants(args).items():  # "int8-convert" -> "fused int8 convert"
            variants["fused " + fmt.replace("-", " ")] = ("fused", {"weights": "int8", "gemm_config": cfg})
        if cuda:
            variants["graph"] = ("graph", {})
        built = {}
        for name, (ex_name, kw) in variants.items():
            ex = executors.get(ex_name, model, dtype=dtype, device=device, spec=spec, **kw)
            built[name] = ex

        def call(ex, i):
            px, ids = inputs[i % len(inputs)]
            if ni and nt:
                return ex.encode(px, ids)
            if ni:
                return ex.encode_image(px), None
            return None, ex.encode_text(ids)

        row = dict(case=case, model=preset, images=ni, texts=nt, executors={})
        for name, ex in built.items():
            cos, rel = [], []
            with torch.no_grad():
                for i in range(len(inputs)):
                    outs = call(ex, i)
                    for o, r in zip(outs, refs[i]):
                        if r is None:
                            continue
                        o, r = o.double().cpu(), r.double().cpu()
                        cos.append(torch.nn.functional.cosine_similarity(o, r, dim=-1).min().item())
                        rel.append(((o - r).norm() / r.norm()).item())
            fmt = getattr(ex, "weight_format", "fp16") if name != "graph" else "fp16"
            wb = weight_bytes(spec, fmt, dtype, towers)
            row["executors"][name] = dict(min_cosine=min(cos), max_rel_err=max(rel), weight_bytes=wb["total"],
                                          weights=fmt, notes=getattr(ex, "notes", ""), samples_ms=[])
        if cuda:
            for i in range(args.warmup):
                for ex in built.values():
                    call(ex, i)
            torch.cuda.synchronize()
            for rnd in range(args.rounds):
                for name, ex in built.items():
                    samples = row["executors"][name]["samples_ms"]
                    for i in range(args.calls):
                        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        a.record()
                        call(ex, rnd * args.calls + i)
                        b.record()
                        b.synchronize()
                        samples.append(a.elapsed_time(b))
            for name, r in row["executors"].items():
                r["median_ms"], r["p90_ms"] = _median(r["samples_ms"]), _p90(r["samples_ms"])
            _floor_shares(row, spec, ni, nt, torch.cuda.get_device_name(device), args.sms)
            f16, q8 = row["executors"]["fused fp16"], row["executors"]["fused int8"]
            row["int8_vs_fp16"] = q8["median_ms"] / f16["median_ms"]
            row["int8_vs_graph"] = q8["median_ms"] / row["executors"]["graph"]["median_ms"]
        results.append(row)
        summary = "  ".join(f"{n}: cos {r['min_cosine']:.5f}" + (f" {r['median_ms']:.3f} ms" if cuda else "")
                            for n, r in row["executors"].items())
        print(f"  e2e {case:16s} {summary}", flush=True)
        del built
        if cuda:
            torch.cuda.empty_cache()
    _ = dualfuse  # the package is what is measured
    return results


def _floor_shares(row: dict, spec, images: int, texts: int, card: str, sms: int | None) -> None:
    """Beside each executor's median: the floor of this call shape on the card at its weight format
    (dualfuse.floors: max(bytes / bandwidth, FLOPs / peak)) and the share of it reached (floor / median). Only on
    the full card of a known target: a green context keeps the card's DRAM but not its copy rate or peak."""
    from dualfuse.floors import card_floor, floor_share

    if sms is not None:
        row["floor_note"] = f"no floor in a {sms}-SM green context (its copy rate and peak are not the card's)"
        return
    for e in row["executors"].values():
        found = card_floor(spec, card, images, texts, None, e["weights"])
        if found is None:
            row["floor_note"] = f"no floor: {card!r} is not a known target (dualfuse.targets)"
            return
        target, f = found
        e.update(floor_target=target.name, floor_ms=f.floor_ms, floor_bound=f.bound,
                 floor_share=floor_share(f.floor_ms, e["median_ms"]))


# ---------------------------------------------------------------------------------------------------------------
def environment(device) -> dict:
    import triton

    env = dict(torch=torch.__version__, triton=triton.__version__, device=str(device),
               date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(card=p.name, capability=f"sm_{p.major}{p.minor}", sms=p.multi_processor_count,
                   l2_bytes=getattr(p, "L2_cache_size", None))
    else:
        env.update(card="CPU (Triton interpreter)")
    return env


def print_table(doc: dict) -> None:
    cuda = doc["environment"]["device"].startswith("cuda")
    print(f"\nint8 weights vs fp16 — {doc['environment'].get('card')}"
          + (f", {doc['sms']} SMs (green context; bandwidth and clocks of the full card)" if doc.get("sms") else ""))
    if doc.get("gemm"):
        extra = [k for k in doc["gemm"][0] if k.startswith("int8-")]  # int8_variants' columns, in order
        print("GEMM step (both towers, one launch)   fp16 µs   int8 µs  int8/fp16  bytes/s int8/fp16  int8 GB/s"
              + "".join(f"  {k:>14s} µs  /fp16" for k in extra))
        for r in doc["gemm"]:
            if cuda:
                print(f"  {r['step']:5s} {r['rows']:28s} {r['fp16']['us']:8.2f}  {r['int8']['us']:8.2f}  "
                      f"{r['int8_time_ratio']:9.2f}  {r['int8_bytes_per_s_ratio']:17.2f}  {r['int8']['weight_gbps']:9.0f}"
                      + "".join(f"  {r[k]['us']:17.2f}  {r[k.replace('-', '_') + '_time_ratio']:5.2f}" for k in extra))
            else:
                print(f"  {r['step']:5s} {r['rows']:28s} correct (no timing on CPU)")
    if doc.get("e2e"):
        print("end to end                 executor              median ms   p90 ms  min cos    MB weights/call"
              "  floor ms  share of floor")
        for r in doc["e2e"]:
            for name, e in r["executors"].items():
                t = f"{e['median_ms']:9.3f} {e['p90_ms']:8.3f}" if cuda else f"{'—':>9s} {'—':>8s}"
                fl = (f"  {e['floor_ms']:8.3f}  {100 * e['floor_share']:13.1f}%" if "floor_share" in e
                      else f"  {'—':>8s}  {'—':>14s}")
                print(f"  {r['case']:24s} {name:19s} {t}  {e['min_cosine']:.5f}  {e['weight_bytes'] / 1e6:8.1f}{fl}")
            if r.get("floor_note"):
                print(f"  {'':24s} {r['floor_note']}")
            if cuda:
                f16 = r["executors"]["fused fp16"]["median_ms"]
                more = [(n[len("fused "):], e) for n, e in r["executors"].items() if n.startswith("fused int8 ")]
                print(f"  {'':24s} int8 / fp16 fused {r['int8_vs_fp16']:.2f}x, int8 / graph {r['int8_vs_graph']:.2f}x"
                      + "".join(f", {n} / fp16 fused {e['median_ms'] / f16:.2f}x" for n, e in more))


def _block_rows(v: str) -> list[int]:
    try:
        rows = [int(x) for x in v.split(",") if x.strip()]
    except ValueError:
        rows = None
    if not rows or any(r < 16 or r & (r - 1) for r in rows):
        raise argparse.ArgumentTypeError(f"expected a comma list of powers of two >= 16 (e.g. 16,32), got {v!r}")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["all", "gemm", "e2e"], default="all")
    ap.add_argument("--json", help="write every row here")
    ap.add_argument("--sms", type=int, default=None, help="run inside a green context of N SMs (one count a process)")
    ap.add_argument("--smoke", action="store_true", help="CPU / interpreter: correctness only on tiny shapes")
    ap.add_argument("--widen-convert", action="store_true", dest="widen_convert",
                    help="also int8 with the GEMM config widen='convert' (the int-to-float instruction, not bit ops)")
    ap.add_argument("--int8-block-m", type=_block_rows, default=[],
                    dest="int8_block_m", metavar="N[,N]",
                    help="also int8 with every GEMM's tiles of N rows (e.g. 16,32: on sm_90 these compile to mma.sync, "
                         "64 rows to wgmma)")
    ap.add_argument("--gemm-reps", type=int, default=30, help="timed graph replays per GEMM row (default 30)")
    ap.add_argument("--max-sets", type=int, default=256, help="at most this many weight sets per GEMM row")
    ap.add_argument("--rounds", type=int, default=5, help="alternating e2e rounds (default 5)")
    ap.add_argument("--calls", type=int, default=12, help="timed calls per executor per round (default 12)")
    ap.add_argument("--warmup", type=int, default=10, help="e2e warm-up calls per executor (default 10)")
    args = ap.parse_args(argv)
    green = None
    if args.sms is not None and not args.smoke:
        from dualfuse.green import enter

        green = enter(args.sms)  # before anything touches CUDA (also torch.cuda.is_available)
    cuda = torch.cuda.is_available()
    if args.smoke and cuda:
        print("--smoke is the CPU correctness pass; on a GPU run without it", file=sys.stderr)
        return 2
    if not args.smoke and not cuda:
        print("no CUDA GPU: run with --smoke (CPU interpreter, correctness only)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    t0 = time.perf_counter()
    doc = dict(schema="dualfuse.int8-bench/1", command=" ".join(["python", "benchmarks/int8.py", *(argv or
                                                                                                  sys.argv[1:])]),
               environment=environment(device), sms=args.sms, green_context=green, smoke=args.smoke)
    if args.part in ("all", "gemm"):
        print("(1) weight streaming, grouped GEMM, cold L2", flush=True)
        doc["gemm"] = bench_gemm(args, device)
    if args.part in ("all", "e2e"):
        print("(2) end to end", flush=True)
        doc["e2e"] = bench_e2e(args, device)
    doc["seconds"] = time.perf_counter() - t0
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1, default=str)
    print_table(doc)
    if args.json:
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

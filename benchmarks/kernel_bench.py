"""Kernel benchmark: the four GEMM steps of one transformer layer of BOTH towers, inside CUDA graphs.

Steps per layer and tower (D = width, F = mlp width, M = batch * tokens):
    QKV      [M, D] @ [3D, D]^T + b
    out-proj [M, D] @ [D, D]^T + b, + residual (in place: hidden += proj(attn))
    FC1      [M, D] @ [F, D]^T + b, activation
    FC2      [M, F] @ [D, F]^T + b, + residual (in place)
Variants, each captured in its own torch.cuda.CUDAGraph and timed by CUDA events (median, p90):
    fused     one GroupedLinear launch per step covering both towers (4 launches per layer)
    torch     the two towers' torch calls: addmm (cuBLAS, = F.linear) + activation + residual add
              (8 calls per layer as counted in the table, 14-18 kernel launches)
    separate  our kernel, one launch per tower per step (8 launches per layer)
    hot       like fused, but every layer uses layer 0's weights: they stay in L2 (what a perfect weight
              prefetch could give at best)
    before    (--before PATH) like fused with the GroupedLinear of another gemm.py (e.g. the previous
              commit's: `git show HEAD~1:src/dualfuse/kernels/gemm.py > .bench_before/gemm.py`), so a
              before/after pair comes from the same run and card
The graph walks over enough distinct layers (separate weights) that the weights do not stay in L2, as in
a real 12..24-layer tower; time per layer = replay time / layers. Every variant is checked against an fp32
torch reference before timing (raises on mismatch). Ceilings measured in the same run: device-to-device
copy bandwidth ((read + write) bytes / time) and a big matmul (8192^3 in --dtype).

    python benchmarks/kernel_bench.py [--dtype fp16|bf16] [--json out.json] [--quick] [--before PATH]

Without CUDA it runs only the correctness path on tiny shapes through the Triton interpreter.

If benchmarks/kernels_attention.py exists, its `run(args)` (args: this script's argparse namespace) is
called after the GEMM part; whatever it returns (JSON-serialisable) goes under "attention" in the JSON.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import traceback
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))  # kernels_attention.py
if (_HERE.parent / "src" / "dualfuse").is_dir():
    sys.path.insert(0, str(_HERE.parent / "src"))  # run from a checkout without `pip install -e .`

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit is created

import _shapes  # noqa: E402  (benchmarks/_shapes.py)

from dualfuse import timing  # noqa: E402

# name: (vision (width, tokens, mlp), text (width, tokens, mlp), activation), read from the dualfuse presets
# (_shapes.PRESETS: clip-vit-b-32, clip-vit-b-16, clip-vit-l-14, siglip-base-patch16-224) on the meta device
MODELS = {name: _shapes.gemm_shapes(name) for name in _shapes.PRESETS}
TOY = {"toy": ((64, 50, 128), (32, 77, 96), "quick_gelu")}  # CPU interpreter: correctness only
BATCHES = (1, 32)
STEPS = ("qkv", "out", "fc1", "fc2")
TARGET_B32_B1_US = 12.0  # ViT-B/32 batch 1: all GEMM steps of one layer, both towers
TARGET_B32_PEAK_FRAC = 0.60  # batch 32: fused GEMMs at >= 60% of the measured matmul peak
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--json", metavar="PATH", default=None, help="write all results to this JSON file")
    p.add_argument("--quick", action="store_true", help="fewer replays (GPU); tiny shapes, correctness only (CPU)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    p.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma-separated batch sizes")
    p.add_argument("--replays", type=int, default=None, help="timed graph replays per variant (default 200, quick 30)")
    p.add_argument("--variants", default=None,
                   help="comma-separated subset of fused,torch,separate,before,hot (default: the first five that apply)")
    p.add_argument("--extra", action="append", default=[], metavar="NAME:JSON",
                   help="another variant: fused with GroupedLinear(config=JSON), e.g. 'pdl:{\"pdl\": true}'; "
                        "a JSON keyed by step names (qkv, out, fc1, fc2) gives those steps their own config")
    p.add_argument("--sms", type=int, default=None,
                   help="run inside a CUDA green context of this many SMs (dualfuse.green; kernels plan for it)")
    p.add_argument("--gemm-only", action="store_true", help="skip the attention/layernorm part (kernels_attention.py)")
    p.add_argument("--before", metavar="PATH", default=None,
                   help="a gemm.py to time as variant 'before' (loaded as dualfuse.kernels._gemm_before)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------
# one layer of one tower: static buffers + per-layer weights
# ---------------------------------------------------------------------------------------------------
class Tower:
    def __init__(self, width, tokens, mlp, activation, batch, n_layers, dtype, device, gen):
        D, F, M = width, mlp, batch * tokens
        self.D, self.F, self.M, self.act = D, F, M, activation

        def rnd(*shape, scale=1.0):
            return (torch.randn(*shape, generator=gen, device="cpu") * scale).to(device=device, dtype=dtype)

        # activations (shared by all layers; hidden is the residual stream, updated in place)
        self.ln1, self.attn, self.ln2 = rnd(M, D), rnd(M, D), rnd(M, D)
        self.hidden = rnd(M, D)
        self.qkv = torch.empty(M, 3 * D, device=device, dtype=dtype)
        self.mlp = torch.empty(M, F, device=device, dtype=dtype)
        self.fc1_pre = torch.empty(M, F, device=device, dtype=dtype)  # torch variant: addmm output before act
        self.layers = []
        for _ in range(n_layers):
            self.layers.append(dict(
                qkv=(rnd(3 * D, D, scale=D**-0.5), rnd(3 * D, scale=0.1)),
                out=(rnd(D, D, scale=D**-0.5), rnd(D, scale=0.1)),
                fc1=(rnd(F, D, scale=D**-0.5), rnd(F, scale=0.1)),
                fc2=(rnd(D, F, scale=F**-0.5), rnd(D, scale=0.1)),
            ))

    def problems(self, layer: int):
        """step -> LinearProblem, as the fused executor builds them."""
        from dualfuse.kernels.gemm import LinearProblem

        w = self.layers[layer]
        return {
            "qkv": LinearProblem(self.ln1, w["qkv"][0], self.qkv, w["qkv"][1]),
            "out": LinearProblem(self.attn, w["out"][0], self.hidden, w["out"][1], residual=self.hidden),
            "fc1": LinearProblem(self.ln2, w["fc1"][0], self.mlp, w["fc1"][1], activation=self.act),
            "fc2": LinearProblem(self.mlp, w["fc2"][0], self.hidden, w["fc2"][1], residual=self.hidden),
        }

    def torch_steps(self, layer: int):
        """The same four steps in plain torch, as HF runs them (cuBLAS addmm == F.linear for 2-D input)."""
        import torch.nn.functional as F

        w = self.layers[layer]

        def qkv():
            torch.addmm(w["qkv"][1], self.ln1, w["qkv"][0].t(), out=self.qkv)

        def out():
            self.hidden.add_(F.linear(self.attn, *w["out"]))

        def fc1():
            torch.addmm(w["fc1"][1], self.ln2, w["fc1"][0].t(), out=self.fc1_pre)
            if self.act == "quick_gelu":  # HF QuickGELUActivation: x * sigmoid(1.702 x)
                torch.mul(self.fc1_pre, torch.sigmoid(1.702 * self.fc1_pre), out=self.mlp)
            else:
                torch._C._nn.gelu(self.fc1_pre, approximate="tanh" if self.act == "gelu_tanh" else "none",
                                  out=self.mlp)

        def fc2():
            self.hidden.add_(F.linear(self.mlp, *w["fc2"]))

        return {"qkv": qkv, "out": out, "fc1": fc1, "fc2": fc2}

    def reference(self, layer: int, hidden0):
        """fp32 reference of the four outputs of one layer from the current inputs and hidden0."""
        import torch.nn.functional as F

        w = {k: (a.float(), b.float()) for k, (a, b) in self.layers[layer].items()}
        qkv = F.linear(self.ln1.float(), *w["qkv"])
        h = hidden0.float() + F.linear(self.attn.float(), *w["out"])
        pre = F.linear(self.ln2.float(), *w["fc1"])
        if self.act == "quick_gelu":
            mlp = pre * torch.sigmoid(1.702 * pre)
        else:
            mlp = F.gelu(pre, approximate="tanh" if self.act == "gelu_tanh" else "none")
        h = h + F.linear(mlp, *w["fc2"])
        return {"qkv": qkv, "mlp": mlp, "hidden": h}

    def flops_bytes(self):
        esz = self.ln1.element_size()
        D, F, M = self.D, self.F, self.M
        gemms = [(M, 3 * D, D, False), (M, D, D, True), (M, F, D, False), (M, D, F, True)]  # (M, N, K, residual)
        flops = sum(2 * m * n * k for m, n, k, _ in gemms)
        byts = sum((n * k + n + m * k + m * n + (m * n if r else 0)) * esz for m, n, k, r in gemms)
        wbytes = sum((n * k + n) * esz for _, n, k, _ in gemms)
        return flops, byts, wbytes


# ---------------------------------------------------------------------------------------------------
# variants: a list (per layer) of callables that launch the layer's four steps
# ---------------------------------------------------------------------------------------------------
_BEFORE = {}


def load_before(path):
    """The GroupedLinear of another gemm.py, imported inside the dualfuse.kernels package (relative imports)."""
    if path not in _BEFORE:
        import importlib.util

        import dualfuse.kernels

        name = "dualfuse.kernels._gemm_before"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        mod.__package__ = "dualfuse.kernels"
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        _BEFORE[path] = mod
    return _BEFORE[path]


def build_variant(name, towers, n_layers, before=None, extras=None):
    from dualfuse.kernels.gemm import GroupedLinear, LinearProblem

    layers, info = [], {}
    extras = extras or {}
    for layer in range(n_layers):
        probs = [t.problems(0 if name == "hot" else layer) for t in towers]
        if name in ("fused", "hot") or name in extras:
            cfg = extras.get(name)
            per_step = isinstance(cfg, dict) and set(cfg) <= set(STEPS) and bool(cfg)
            ops = [GroupedLinear([p[s] for p in probs], config=cfg.get(s) if per_step else cfg)
                   for s in STEPS]
            if layer == 0:
                info = {s: dict(config=op.config, splits=op.splits, programs=op.num_programs)
                        for s, op in zip(STEPS, ops)}
        elif name == "before":
            mod = load_before(before)
            conv = [{s: mod.LinearProblem(**{f: getattr(q, f) for f in LinearProblem.__dataclass_fields__})
                     for s, q in p.items()} for p in probs]
            ops = [mod.GroupedLinear([p[s] for p in conv]) for s in STEPS]
            if layer == 0:
                info = {s: dict(config=op.config, splits=op.splits, programs=op.num_programs)
                        for s, op in zip(STEPS, ops)}
        elif name == "separate":
            ops = [GroupedLinear([p[s]]) for s in STEPS for p in probs]
            if layer == 0:
                info = {f"{s}.{i}": dict(config=op.config, splits=op.splits, programs=op.num_programs)
                        for (s, i), op in zip([(s, i) for s in STEPS for i in range(len(probs))], ops)}
        elif name == "torch":
            steps = [t.torch_steps(layer) for t in towers]
            ops = [st[s] for s in STEPS for st in steps]
        else:
            raise ValueError(name)
        layers.append(ops)
    return layers, info


def check_variant(name, towers, layers, tol=1e-2):
    """Run layer 0 once (eagerly) and compare with the fp32 reference. Raises on mismatch."""
    gen = torch.Generator().manual_seed(1234)
    h0s = []
    for t in towers:  # fresh inputs, poisoned outputs
        for buf in (t.ln1, t.attn, t.ln2, t.hidden):
            buf.copy_(torch.randn(buf.shape, generator=gen))
        t.qkv.fill_(float("nan"))
        t.mlp.fill_(float("nan"))
        h0s.append(t.hidden.clone())
    refs = [t.reference(0, h0) for t, h0 in zip(towers, h0s)]
    for op in layers[0]:
        op()
    if HAS_CUDA:
        torch.cuda.synchronize()
    errs = {}
    for i, (t, ref) in enumerate(zip(towers, refs)):
        for key, got in (("qkv", t.qkv), ("mlp", t.mlp), ("hidden", t.hidden)):
            err = ((got.float() - ref[key]).norm() / ref[key].norm()).item()
            errs[f"{('vision', 'text')[i]}.{key}"] = err
            if not err <= tol:  # also catches NaN (unwritten output)
                raise AssertionError(f"{name}: {('vision', 'text')[i]} {key} rel err {err:.3g} > {tol}")
    return errs


def ceilings(dtype, quick):
    """Measured device ceilings: copy bandwidth (bytes read + written per s) and matmul FLOP rate."""
    n = (256 if quick else 1024) * 2**20
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    n_mm = 8192
    a = torch.randn(n_mm, n_mm, device="cuda", dtype=dtype)
    b = torch.randn(n_mm, n_mm, device="cuda", dtype=dtype)
    c = torch.empty(n_mm, n_mm, device="cuda", dtype=dtype)

    def med(fn, reps):  # seconds, median of reps after one untimed call
        fn()
        return timing.stats(timing.time_calls(lambda i: fn(), reps, "cuda"))["median_ms"] * 1e-3

    t_copy = med(lambda: dst.copy_(src), 10 if quick else 30)
    t_mm = med(lambda: torch.mm(a, b, out=c), 5 if quick else 20)
    del src, dst, a, b, c
    torch.cuda.empty_cache()
    return {"copy_GBps": 2 * n / t_copy / 1e9, "matmul_TFLOPs": 2 * n_mm**3 / t_mm / 1e12,
            "copy_bytes": n, "matmul_n": n_mm}


# ---------------------------------------------------------------------------------------------------
def run_case(model, spec, batch, dtype, args, ceil, variants):
    device = "cuda" if HAS_CUDA else "cpu"
    (vis, txt, act) = spec
    gen = torch.Generator().manual_seed(0)
    per_layer_w = sum((3 * d * d + d * d + 2 * d * f) for d, _, f in (vis, txt)) * torch.finfo(dtype).bits // 8
    if HAS_CUDA:
        l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
        n_layers = max(12, math.ceil(3 * l2 / per_layer_w))  # weights of the graph >> L2, like a real model
        n_layers = min(n_layers, 48)
    else:
        n_layers = 1
    towers = [Tower(*vis, act, batch, n_layers, dtype, device, gen), Tower(*txt, act, batch, n_layers, dtype, device, gen)]
    flops = sum(t.flops_bytes()[0] for t in towers)
    byts = sum(t.flops_bytes()[1] for t in towers)
    rows = []
    for name in variants:
        t0 = datetime.datetime.now()
        try:
            layers, info = build_variant(name, towers, n_layers, before=args.before, extras=args.extra_cfg)
            errs = check_variant(name, towers, layers)
        except Exception as e:  # reported (FAILED row), but one broken variant must not cost the rest of the run
            traceback.print_exc()
            rows.append(dict(model=model, batch=batch, variant=name, error=f"{type(e).__name__}: {e}"))
            continue
        row = dict(model=model, batch=batch, variant=name, M=(towers[0].M, towers[1].M), layers_in_graph=n_layers,
                   flops_per_layer=flops, bytes_per_layer=byts, max_rel_err=max(errs.values()), rel_errs=errs,
                   kernel_info=info, launches_per_layer=sum(1 for _ in layers[0]))
        if HAS_CUDA:
            replays = args.replays or (30 if args.quick else 200)
            try:
                ts = [ms * 1e3 / n_layers for ms in timing.time_graph(layers, replays)]  # µs per layer
            except Exception as e:
                traceback.print_exc()
                rows.append(dict(row, error=f"{type(e).__name__}: {e}"))
                continue
            ts.sort()
            us = statistics.median(ts)
            row.update(us_median=us, us_p90=ts[int(0.9 * (len(ts) - 1))], us_min=ts[0], samples_us=ts,
                       tflops=flops / us / 1e6, gbps=byts / us / 1e3)
            row["peak_frac"] = row["tflops"] / ceil["matmul_TFLOPs"]
            row["bw_frac"] = row["gbps"] / ceil["copy_GBps"]
        row["wall_s"] = (datetime.datetime.now() - t0).total_seconds()
        print(f"   {name:<9} {row.get('us_median', float('nan')):8.1f} us/layer  ({row['wall_s']:.0f} s to build,"
              f" check, time)", flush=True)
        rows.append(row)
        del layers
    del towers
    if HAS_CUDA:
        torch.cuda.empty_cache()
    return rows


def target_note(row):
    if row["variant"] != "fused" or "us_median" not in row:
        return ""
    if row["model"] == "ViT-B/32" and row["batch"] == 1:
        ok = row["us_median"] <= TARGET_B32_B1_US
        return f"target <= {TARGET_B32_B1_US:.0f} us: {'PASS' if ok else 'FAIL'}"
    if row["batch"] >= 32:
        ok = row["peak_frac"] >= TARGET_B32_PEAK_FRAC
        return f"target >= {TARGET_B32_PEAK_FRAC:.0%} peak: {'PASS' if ok else 'FAIL'}"
    return ""


def print_table(rows, ceil):
    if ceil:
        print(f"\nceilings: copy {ceil['copy_GBps']:.0f} GB/s, matmul {ceil['matmul_TFLOPs']:.0f} TFLOP/s")
    hdr = f"{'model':<12}{'B':>3} {'variant':<9}{'calls':>7}{'us/layer':>10}{'p90':>8}{'TFLOP/s':>9}{'%peak':>7}" \
          f"{'GB/s':>8}{'%bw':>6}{'vs torch':>9}  note"
    print(hdr)
    print("-" * len(hdr))
    base = {(r["model"], r["batch"]): r for r in rows if r["variant"] == "torch"}
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<12}{r['batch']:>3} {r['variant']:<9}  FAILED: {r['error'][:150]}")
            continue
        if "us_median" not in r:
            print(f"{r['model']:<12}{r['batch']:>3} {r['variant']:<9}{r['launches_per_layer']:>7}"
                  f"  correctness ok (max rel err {r['max_rel_err']:.2e}); timing needs CUDA")
            continue
        b = base.get((r["model"], r["batch"]))
        speed = f"{b['us_median'] / r['us_median']:.2f}x" if b else "-"
        print(f"{r['model']:<12}{r['batch']:>3} {r['variant']:<9}{r['launches_per_layer']:>7}{r['us_median']:>10.1f}"
              f"{r['us_p90']:>8.1f}{r['tflops']:>9.1f}{r['peak_frac']:>7.0%}{r['gbps']:>8.0f}{r['bw_frac']:>6.0%}"
              f"{speed:>9}  {target_note(r)}")


def _cfg_str(c):
    s = f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']} w{c['num_warps']} s{c['num_stages']}"
    if "programs_per_sm" in c:
        s += f" pps{c['programs_per_sm']} mk{c.get('min_k_iters')} cap{c.get('max_split')}"
    if c.get("split_reduce") == "atomic":
        s += " atomic"
    if c.get("prefetch"):
        s += f" pf{c['prefetch']}"
    if "early_epilogue" in c:
        s += f" early{int(bool(c['early_epilogue']))}"
    return s


def any_failed(rows) -> bool:
    return any("error" in r for r in rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    dtype = DTYPES[args.dtype]
    import triton

    green = None
    if args.sms is not None:
        if not HAS_CUDA:
            raise SystemExit("--sms needs a CUDA GPU")
        from dualfuse import green as green_ctx

        green = green_ctx.enter(args.sms)  # before anything else touches CUDA
    if HAS_CUDA:
        models = {m: MODELS[m] for m in (s.strip() for s in args.models.split(",")) if m}
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
        card = torch.cuda.get_device_name(0)
    else:
        print("no CUDA: correctness only, tiny shapes, Triton interpreter (fp16 dot; bf16 dot is broken there)")
        models, batches, card = TOY, [1], "cpu (TRITON_INTERPRET=1)"
        dtype = torch.float16
    args.extra_cfg = {}
    for e in args.extra:
        name, _, cfg = e.partition(":")
        args.extra_cfg[name] = json.loads(cfg)
    variants = (["fused", "torch", "separate"] + (["before"] if args.before else []) + list(args.extra_cfg))
    if args.variants:
        keep = {v.strip() for v in args.variants.split(",")} | set(args.extra_cfg)
        optional = ["hot"]  # only when asked for
        unknown = keep - set(variants) - set(optional) - {"before"}
        if unknown:
            raise SystemExit(f"unknown variants {sorted(unknown)}")
        variants = [v for v in variants + optional if v in keep]
    ceil = ceilings(dtype, args.quick) if HAS_CUDA else None
    rows = []
    attention, rc = None, 0

    def write_json():
        if not args.json:
            return
        record = dict(
            benchmark="kernels", card=card, dtype=str(dtype).replace("torch.", ""),
            date=datetime.datetime.now().isoformat(timespec="seconds"),
            torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
            green_context=green, ceilings=ceil, targets=dict(vit_b32_b1_us=TARGET_B32_B1_US, b32_peak_frac=TARGET_B32_PEAK_FRAC),
            gemm=rows, attention=attention,
        )
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1, default=str)

    for model, spec in models.items():
        for batch in batches:
            print(f"== {model} batch {batch}", flush=True)
            rows += run_case(model, spec, batch, dtype, args, ceil, variants)
            write_json()  # after every case: a run cut short still leaves its results

    run_attention = None
    if not args.gemm_only:
        try:
            from kernels_attention import run as run_attention
        except ModuleNotFoundError as e:
            if e.name != "kernels_attention":
                raise
    if run_attention is not None:
        try:
            attention = run_attention(args)
        except Exception:
            traceback.print_exc()
            attention, rc = {"error": traceback.format_exc()}, 1

    if args.json:
        write_json()
        print(f"wrote {args.json}")
    print(f"\nGEMM steps of one layer, both towers ({card}, {args.dtype if HAS_CUDA else 'fp16'}, CUDA graphs)")
    print_table(rows, ceil)
    return 1 if any_failed(rows) else rc


if __name__ == "__main__":
    sys.exit(main())

"""Kernel benchmark: attention and LayerNorm of BOTH towers, fused (one launch) vs torch, in CUDA graphs.

Real shapes (one layer): ViT-B/32 (vision 50 tokens, 12 heads; text 77 tokens, 8 heads, causal), ViT-B/16
(197 vision tokens), ViT-L/14 (257 tokens, 16 heads; text 77, 12 heads, causal), SigLIP-B/16 (196 tokens,
12 heads; text 64 tokens, 12 heads, bidirectional); head dim 64; batch 1 and 32.

Attention variants (input: each tower's packed QKV GEMM output [B, S, 3*W]; output [B, S, W], the layout the
out-projection GEMM reads):
    fused     one GroupedAttention launch for both towers (strided q/k/v views, no copies)
    sdpa      per tower F.scaled_dot_product_attention on the head-transposed views, plus the copy that
              puts the [B, H, S, Dh] result back into [B, S, W] (2 towers x (SDPA + copy))
    separate  GroupedAttention, one launch per tower
LayerNorm variants (input: each tower's hidden states [B*S, W]):
    fused     one GroupedLayerNorm launch for both towers
    torch     two F.layer_norm calls
    separate  GroupedLayerNorm, one launch per tower
Every variant is checked against an fp32 torch reference before it is timed. Each variant is captured in
its own torch.cuda.CUDAGraph holding `inner` iterations that alternate between two input sets (so batch-32
inputs do not all sit in L2); a replay is timed with CUDA events; reported: time per iteration, median and
p90 over the replays. `--sweep` also times other block configurations of the fused attention.

    python benchmarks/kernels_attention.py [--dtype fp16|bf16] [--quick] [--sweep] [--json out.json]

Without CUDA it runs only the correctness path on tiny shapes through the Triton interpreter.
`benchmarks/kernel_bench.py` calls `run(args)` with its own argparse namespace; `run(dtype, quick)` works too.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
if (_HERE.parent / "src" / "dualfuse").is_dir():
    sys.path.insert(0, str(_HERE.parent / "src"))  # run from a checkout without `pip install -e .`

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit is created

import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(_HERE))  # benchmarks/_shapes.py
import _shapes  # noqa: E402

# name: [(tokens, heads, head_dim, causal, ln_eps) for vision, text], read from the dualfuse presets
# (_shapes.PRESETS) on the meta device
MODELS = {name: _shapes.attention_shapes(name) for name in _shapes.PRESETS}
TOY = {"toy": [(50, 2, 16, False, 1e-5), (77, 2, 32, True, 1e-5)]}  # CPU interpreter: correctness only
BATCHES = (1, 32)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
TOL = {torch.float16: 2e-2, torch.bfloat16: 6e-2}  # max abs error vs the fp32 reference
SWEEP = [(bm, bn, nw, ns) for bm in (32, 64, 128) for bn in (32, 64) for nw in (4, 8) for ns in (2, 3)
         if not (bm == 128 and nw == 4)]


# ---------------------------------------------------------------------------------------------------
# problems
# ---------------------------------------------------------------------------------------------------
class TowerBuffers:
    """Static buffers of one tower for one input set."""

    def __init__(self, batch, tokens, heads, dh, causal, eps, dtype, device):
        self.B, self.S, self.H, self.Dh, self.causal, self.eps = batch, tokens, heads, dh, causal, eps
        self.W = heads * dh
        self.qkv = (torch.randn(batch, tokens, 3 * self.W, device=device) * 1.5).to(dtype)
        self.attn_out = torch.empty(batch, tokens, self.W, device=device, dtype=dtype)
        self.hidden = (torch.randn(batch * tokens, self.W, device=device) * 2 + 0.3).to(dtype)
        self.ln_w = (torch.randn(self.W, device=device) * 0.3 + 1).to(dtype)
        self.ln_b = torch.randn(self.W, device=device).to(dtype) * 0.1
        self.ln_out = torch.empty(batch * tokens, self.W, device=device, dtype=dtype)

    def attention_problem(self):
        from dualfuse.kernels.attention import AttentionProblem, split_packed_qkv

        q, k, v = split_packed_qkv(self.qkv, self.W)
        return AttentionProblem(q, k, v, self.attn_out, self.H, self.causal)

    def ln_problem(self):
        from dualfuse.kernels.layernorm import LayerNormProblem

        return LayerNormProblem(self.hidden, self.ln_w, self.ln_b, self.ln_out, self.eps)

    def sdpa(self):
        B, S, H, Dh, W = self.B, self.S, self.H, self.Dh, self.W
        q, k, v = (self.qkv[..., i * W:(i + 1) * W].view(B, S, H, Dh).transpose(1, 2) for i in range(3))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        self.attn_out.view(B, S, H, Dh).copy_(o.transpose(1, 2))

    def torch_ln(self):
        # F.layer_norm allocates its output (from the graph's pool when captured): no extra copy
        self.ln_torch_out = F.layer_norm(self.hidden, (self.W,), self.ln_w, self.ln_b, self.eps)

    def attention_reference(self):
        B, S, H, Dh, W = self.B, self.S, self.H, self.Dh, self.W
        q, k, v = (self.qkv[..., i * W:(i + 1) * W].float().reshape(B, S, H, Dh).transpose(1, 2) for i in range(3))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return o.transpose(1, 2).reshape(B, S, W)

    def ln_reference(self):
        return F.layer_norm(self.hidden.float(), (self.W,), self.ln_w.float(), self.ln_b.float(), self.eps)


def _check(name, got, ref, tol):
    if got.isnan().any():
        raise AssertionError(f"{name}: output has NaN (not fully written?)")
    err = (got.float() - ref).abs().max().item()
    if not err <= tol:
        raise AssertionError(f"{name}: max abs error {err:.3e} > {tol:.1e}")
    return err


# ---------------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------------
def _time_graph(step_fns, inner, replays, warmup=10):
    """Capture `inner` iterations (alternating over step_fns) in one CUDA graph; ms per iteration."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for fn in step_fns:
            for _ in range(2):
                fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(inner):
            step_fns[i % len(step_fns)]()
    for _ in range(warmup):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        st.record()
        g.replay()
        en.record()
        en.synchronize()
        times.append(st.elapsed_time(en) / inner)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(0.9 * len(times)))]


def _time_cpu(step_fns, reps=2):
    t = time.perf_counter()
    for _ in range(reps):
        for fn in step_fns:
            fn()
    return (time.perf_counter() - t) / (reps * len(step_fns)) * 1e3


# ---------------------------------------------------------------------------------------------------
# one case
# ---------------------------------------------------------------------------------------------------
def run_case(model, towers_spec, batch, dtype, replays, inner, sweep):
    from dualfuse.kernels.attention import GroupedAttention
    from dualfuse.kernels.layernorm import GroupedLayerNorm

    device = "cuda" if HAS_CUDA else "cpu"
    sets = [[TowerBuffers(batch, *t, dtype=dtype, device=device) for t in towers_spec] for _ in range(2 if HAS_CUDA else 1)]
    tol = TOL[dtype]
    rows = []

    def record(op, variant, launches, fns, extra=None):
        # correctness of this variant on every input set, outputs poisoned first
        errs = []
        for set_i, towers in enumerate(sets):
            for t in towers:
                t.attn_out.fill_(float("nan"))
                t.ln_out.fill_(float("nan"))
            fns[set_i]()
            if HAS_CUDA:
                torch.cuda.synchronize()
            for j, t in enumerate(towers):
                if op == "attention":
                    errs.append(_check(f"{model} B={batch} {op} {variant} tower {j}", t.attn_out,
                                       t.attention_reference(), tol))
                else:
                    out = t.ln_torch_out if variant == "torch" else t.ln_out
                    errs.append(_check(f"{model} B={batch} {op} {variant} tower {j}", out, t.ln_reference(), tol))
        row = dict(op=op, model=model, batch=batch, variant=variant, launches=launches, max_abs_err=max(errs))
        if HAS_CUDA:
            med, p90 = _time_graph(fns, inner, replays)
            row.update(us_median=med * 1e3, us_p90=p90 * 1e3)
        else:
            row.update(cpu_interpreter_ms=_time_cpu(fns))
        row.update(extra or {})
        rows.append(row)
        return row

    # --- attention ---
    fused = [GroupedAttention([t.attention_problem() for t in towers]) for towers in sets]
    record("attention", "fused", 1, fused)
    sdpa = [(lambda towers=towers: [t.sdpa() for t in towers]) for towers in sets]
    record("attention", "sdpa", "2x(sdpa+copy)", sdpa)
    sep_ops = [[GroupedAttention([t.attention_problem()]) for t in towers] for towers in sets]
    sep = [(lambda ops=ops: [op() for op in ops]) for ops in sep_ops]
    record("attention", "separate", 2, sep)
    if sweep and HAS_CUDA:
        best = None
        for bm, bn, nw, ns in SWEEP:
            try:
                ops = [GroupedAttention([t.attention_problem() for t in towers], block_m=bm, block_n=bn,
                                        num_warps=nw, num_stages=ns) for towers in sets]
                r = record("attention", f"fused[{bm}x{bn} w{nw} s{ns}]", 1, ops)
            except Exception as e:  # a config that does not compile / fit: skip it
                print(f"  sweep {bm}x{bn} w{nw} s{ns}: {type(e).__name__}: {str(e)[:100]}")
                continue
            if best is None or r["us_median"] < best["us_median"]:
                best = r
        if best is not None:
            print(f"  best attention config: {best['variant']} {best['us_median']:.1f} us")

    # --- LayerNorm ---
    ln_fused = [GroupedLayerNorm([t.ln_problem() for t in towers]) for towers in sets]
    record("layernorm", "fused", 1, ln_fused)
    ln_torch = [(lambda towers=towers: [t.torch_ln() for t in towers]) for towers in sets]
    record("layernorm", "torch", 2, ln_torch)
    ln_sep_ops = [[GroupedLayerNorm([t.ln_problem()]) for t in towers] for towers in sets]
    ln_sep = [(lambda ops=ops: [op() for op in ops]) for ops in ln_sep_ops]
    record("layernorm", "separate", 2, ln_sep)
    return rows


def print_table(rows, card, dtype_name):
    print(f"\nattention + LayerNorm of one layer, both towers ({card}, {dtype_name}, CUDA graphs, us per step)")
    hdr = f"{'op':<10}{'model':<12}{'B':>3} {'variant':<24}{'launches':>14}{'us':>9}{'p90':>9}{'vs torch':>9}" \
          f"{'max err':>10}"
    print(hdr)
    print("-" * len(hdr))
    base = {(r["op"], r["model"], r["batch"]): r for r in rows if r["variant"] in ("sdpa", "torch")}
    for r in rows:
        if "us_median" not in r:
            print(f"{r['op']:<10}{r['model']:<12}{r['batch']:>3} {r['variant']:<24}{str(r['launches']):>14}"
                  f"  correctness ok (max abs err {r['max_abs_err']:.2e}); timing needs CUDA "
                  f"(interpreter {r['cpu_interpreter_ms']:.0f} ms)")
            continue
        b = base.get((r["op"], r["model"], r["batch"]))
        speed = f"{b['us_median'] / r['us_median']:.2f}x" if b else "-"
        print(f"{r['op']:<10}{r['model']:<12}{r['batch']:>3} {r['variant']:<24}{str(r['launches']):>14}"
              f"{r['us_median']:>9.1f}{r['us_p90']:>9.1f}{speed:>9}{r['max_abs_err']:>10.1e}")
    # the target: fused attention for both towers beats the two towers' SDPA calls
    verdicts = []
    for (op, model, batch), b in base.items():
        if op != "attention" or "us_median" not in b:
            continue
        f = next(r for r in rows if (r["op"], r["model"], r["batch"], r["variant"]) == (op, model, batch, "fused"))
        ok = f["us_median"] < b["us_median"]
        verdicts.append(ok)
        print(f"target fused attention < 2x SDPA  {model:<12} B={batch:<3}: {f['us_median']:.1f} vs "
              f"{b['us_median']:.1f} us  {'MET' if ok else 'NOT MET'}")
    if verdicts:
        print(f"target met in {sum(verdicts)}/{len(verdicts)} cases")


def _resolve(dtype, quick, models, batches, replays, sweep):
    """Accept run(dtype, quick) or run(argparse.Namespace) (benchmarks/kernel_bench.py passes its args)."""
    if isinstance(dtype, argparse.Namespace):
        ns = dtype
        quick = bool(getattr(ns, "quick", quick))
        models = getattr(ns, "models", models)
        batches = getattr(ns, "batches", batches)
        replays = getattr(ns, "replays", replays)
        sweep = bool(getattr(ns, "sweep", sweep))
        dtype = getattr(ns, "dtype", "fp16")
    if isinstance(dtype, str):
        dtype = DTYPES[dtype.replace("torch.", "").replace("float16", "fp16").replace("bfloat16", "bf16")]
    if isinstance(models, str):
        models = [m.strip() for m in models.split(",") if m.strip()]
    if isinstance(batches, str):
        batches = [int(b) for b in batches.split(",") if b.strip()]
    return dtype, quick, models, batches, replays, sweep


def run(dtype=torch.float16, quick: bool = False, *, models=None, batches=None, replays=None,
        sweep: bool = False) -> list[dict]:
    """Run the attention + LayerNorm benchmark, print the table, return one dict per (op, model, batch, variant)."""
    dtype, quick, models, batches, replays, sweep = _resolve(dtype, quick, models, batches, replays, sweep)
    if HAS_CUDA:
        names = [m for m in (models or MODELS) if m in MODELS]
        if quick and models is None:
            names = ["ViT-B/32", "ViT-L/14"]
        cases = {m: MODELS[m] for m in names}
        batches = list(batches or BATCHES)
        replays = replays or (50 if quick else 200)
        replays = max(replays, 50)
        inner = 20
        card = torch.cuda.get_device_name(0)
    else:
        print("no CUDA: correctness only, tiny shapes, Triton interpreter (fp16; bf16 dot is broken there)")
        cases, batches, replays, inner, card = TOY, [2], 0, 0, "cpu (TRITON_INTERPRET=1)"
        dtype = torch.float16
    rows = []
    for model, spec in cases.items():
        for batch in batches:
            print(f"== attention/layernorm {model} batch {batch}", flush=True)
            rows += run_case(model, spec, batch, dtype, replays, inner, sweep)
    for r in rows:
        r.update(card=card, dtype=str(dtype).replace("torch.", ""))
    print_table(rows, card, str(dtype).replace("torch.", ""))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--quick", action="store_true", help="ViT-B/32 and ViT-L/14 only, 50 replays")
    p.add_argument("--sweep", action="store_true", help="also time other attention block configurations")
    p.add_argument("--models", default=None, help=f"comma-separated subset of {', '.join(MODELS)}")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,32)")
    p.add_argument("--replays", type=int, default=None, help="timed graph replays per variant (>= 50)")
    p.add_argument("--json", metavar="PATH", default=None, help="write the results to this JSON file")
    args = p.parse_args(argv)
    rows = run(args)
    if args.json:
        import triton

        record = dict(benchmark="kernels_attention", date=datetime.datetime.now().isoformat(timespec="seconds"),
                      torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda, rows=rows)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1, default=str)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

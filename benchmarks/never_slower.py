"""Never slower than the best stock executor: the model x shape matrix, every executor per cell, in one process.

    python benchmarks/never_slower.py --models b32 --shapes all --out benchmarks/results/<card>-<date>/never-slower/
    python benchmarks/never_slower.py --models bigg14 --shapes 1+1,img1 --no-max-autotune bigg14 --out ...

Models: b32 (CLIP ViT-B/32), l14, h14, bigg14, siglip-b16 (SigLIP B/16 224), so400m (SigLIP so400m/14-384). Shapes:
1+1 (one image + one text), img1 (image only, 1), 32+32, img256 (image only, 256), txt1024 (text only, 1024); texts
at the model's context length. Rows per cell: fused (gemm_impl="auto": library GEMMs / SDPA where the calibration
made below says they win; without the auto row no calibration is made here, and the fused row reads whatever this
card's cache holds: each fused row records the calibration file it used, None for none), fused-triton (every stage
on Triton, the behaviour without calibration), auto (after this card's calibration of the model's shapes, whose
seconds are reported; its decisions and reasons are printed and recorded), graph, compile (reduce-overhead),
compile-max (max-autotune; skip it per model with --no-max-autotune, minutes per shape on large models), eager (only
at batches <= 32), onnxruntime (the CUDA EP where onnxruntime-gpu imports, else an 'unavailable' row saying why).
Each executor is built once per model and runs every shape of the invocation; each cell checks its output on the
first input set against the fp32 reference forward (per-embedding cosine >= 0.999), then times ``--iters`` calls
(CUDA events, synchronized per call, 4 input sets rotated) after ``--warmup``. A cell that does not fit in memory
says so; one that fails says why; the others still run.

Printed at the end: per cell the median ms of every row and fused / best stock and auto / best stock (time
ratios: <= 1.00 = never slower). JSON (``--out`` folder): one file per invocation with the environment, the
calibration's seconds and path, every cell's rows. Run it in parts (``--models``, ``--shapes``) so that each
invocation fits in a few minutes.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

MODELS = {
    "b32": "clip-vit-b-32", "l14": "clip-vit-l-14", "h14": "clip-vit-h-14", "bigg14": "clip-vit-bigg-14",
    "siglip-b16": "siglip-base-patch16-224", "so400m": "siglip-so400m-patch14-384",
}
SHAPES = {"1+1": (1, 1), "img1": (1, 0), "32+32": (32, 32), "img256": (256, 0), "txt1024": (0, 1024)}
EXECUTORS = ("fused", "fused-triton", "auto", "graph", "compile", "compile-max", "eager", "onnxruntime")
STOCK = ("graph", "compile", "compile-max", "eager", "onnxruntime")
EAGER_MAX_BATCH = 32
INPUT_SETS = 4


def _pick(arg: str, table: dict, what: str) -> list[str]:
    if arg == "all":
        return list(table)
    names = [x.strip() for x in arg.split(",") if x.strip()]
    bad = [x for x in names if x not in table]
    if bad or not names:
        raise SystemExit(f"never_slower: unknown {what}: {', '.join(bad) or '(none)'}; known: {', '.join(table)}")
    return names


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".replace("\n", " ")[:240]


def run_model(key: str, shape_names: list[str], executors: list[str], args) -> dict:
    import torch

    from dualfuse import executors as registry
    from dualfuse import presets, reference
    from dualfuse.adapters import to_spec
    from dualfuse.bench import call_towers, cosine_check, random_inputs
    from dualfuse.executors.base import ExecutorUnavailable
    from dualfuse.timing import stats, sync, time_calls

    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    source = presets.load(MODELS[key], device=device)
    spec = to_spec(source)
    ctx = spec.text.context_length
    out = dict(model=MODELS[key], key=key, load_s=time.perf_counter() - t0, cells={}, calibration=None)
    shapes = {s: (*SHAPES[s], ctx) for s in shape_names}
    inputs, refs = {}, {}
    ref_spec = spec.to(device=device, dtype=torch.float32)
    for s, (bi, bt, n) in shapes.items():
        inputs[s] = random_inputs(spec, bi, bt, n, sets=INPUT_SETS, device=device, dtype=dtype)
        try:
            with torch.no_grad():
                px, ids = inputs[s][0]
                refs[s] = (reference.encode_image(ref_spec, px.float()) if bi else None,
                           reference.encode_text(ref_spec, ids) if bt else None)
        except torch.OutOfMemoryError as e:
            refs[s] = None
            print(f"  {key} {s}: no fp32 reference (out of memory: {_short(e)[:80]}); cells unchecked", flush=True)
        out["cells"][s] = dict(shape=list(shapes[s]), rows={})
        torch.cuda.empty_cache()
    del ref_spec
    torch.cuda.empty_cache()

    if "auto" in executors:  # calibrate this card for the model's shapes first (its time is part of the story)
        from dualfuse.executors.fused.calibrate import calibrate

        t1 = time.perf_counter()
        try:
            res = calibrate(source, list(shapes.values()), dtype=dtype, device=device,
                            log=lambda m: print("  " + m, flush=True))
            out["calibration"] = dict(res.to_dict(), wall_s=time.perf_counter() - t1)
            print(f"  {key}: calibration {res.seconds:.1f} s -> {res.path}", flush=True)
        except Exception as e:  # noqa: BLE001 - auto then runs uncalibrated (fused everywhere), and says so
            out["calibration"] = dict(error=_short(e), wall_s=time.perf_counter() - t1)
            print(f"  {key}: calibration failed: {_short(e)}", flush=True)
        gc.collect()
        torch.cuda.empty_cache()

    for name in executors:
        if name == "compile-max" and key in args.no_max_autotune:
            for s in shapes:
                out["cells"][s]["rows"][name] = dict(status="skipped", message="--no-max-autotune")
            continue
        ex, t1 = None, time.perf_counter()
        try:
            kw = dict(verbose=False) if name == "auto" else dict(gemm_impl="triton") if name == "fused-triton" else {}
            ex = registry.get(name.removesuffix("-triton"), source, dtype=dtype, device=device, spec=spec, **kw)
            build_s, build_err = time.perf_counter() - t1, None
            if name == "auto":
                print(f"  {key}: {ex.notes.split(';')[0]}", flush=True)
                for c, why in ex.decisions.values():
                    print(f"    {why} -> {c}", flush=True)
        except torch.OutOfMemoryError as e:
            build_err = dict(status="does not fit", message=_short(e))
        except ExecutorUnavailable as e:
            build_err = dict(status="unavailable", message=str(e))
        except Exception as e:  # noqa: BLE001
            build_err = dict(status="error", message=_short(e))
        for s, (bi, bt, n) in shapes.items():
            rows = out["cells"][s]["rows"]
            if build_err is not None:
                rows[name] = dict(build_err)
                continue
            if name == "eager" and max(bi, bt) > EAGER_MAX_BATCH:
                rows[name] = dict(status="skipped", message=f"eager only at batches <= {EAGER_MAX_BATCH}")
                continue
            row = dict(status="ok", build_s=build_s, notes=getattr(ex, "notes", ""))
            try:
                t2 = time.perf_counter()
                with torch.no_grad():
                    outs = call_towers(ex, *inputs[s][0])
                sync(device)
                row["first_call_s"] = time.perf_counter() - t2
                if refs[s] is not None:
                    row.update(cosine_check(outs, refs[s]))
                del outs
                with torch.no_grad():
                    for i in range(args.warmup):
                        call_towers(ex, *inputs[s][i % INPUT_SETS])
                    sync(device)
                    samples = time_calls(lambda i: call_towers(ex, *inputs[s][i % INPUT_SETS]), args.iters, device)
                row.update(stats(samples))
                row["notes"] = getattr(ex, "notes", "")
                if hasattr(ex, "calibration"):  # fused rows: which calibration chose their stages (None: all Triton)
                    cal = ex.calibration
                    row["calibration"] = (cal.path or "given") if cal is not None else None
                if getattr(ex, "compiles_on_first_call", False):
                    row["compile_s"] = row["first_call_s"]  # compile + autotune of this shape (first call)
                if name == "auto":  # where this call went, and every family's decision with its reason
                    row["route"] = ex.route(bi, bt)
                    row["decisions"] = {fam: dict(choice=c, why=why) for fam, (c, why) in ex.decisions.items()}
            except torch.OutOfMemoryError as e:
                row = dict(status="does not fit", message=_short(e))
            except Exception as e:  # noqa: BLE001 - one failing cell must not stop the others
                row = dict(status="error", message=_short(e))
            rows[name] = row
            print(f"  {key} {s:>8} {name:<12} " + (f"{row['median_ms']:9.3f} ms" if row["status"] == "ok" else
                                                    f"{row['status']}: {row.get('message', '')[:100]}")
                  + (f" (compile {row['compile_s']:.1f} s)" if "compile_s" in row else "")
                  + (f" -> {row['route']}" if "route" in row else ""), flush=True)
            gc.collect()
            torch.cuda.empty_cache()
        ex = None
        gc.collect()
        torch.cuda.empty_cache()
    for cell in out["cells"].values():
        ok = {k: r for k, r in cell["rows"].items() if r.get("status") == "ok" and r.get("cosine_ok", True)}
        stock = {k: r["median_ms"] for k, r in ok.items() if k in STOCK}
        best = min(stock, key=stock.get) if stock else None
        cell["best_stock"] = best
        for k in ("fused", "auto"):
            cell[f"{k}_vs_best_stock"] = ok[k]["median_ms"] / stock[best] if best and k in ok else None
    return out


def print_table(results: list[dict], env: dict) -> None:
    print()
    print(f"{env['card']} · torch {env['torch']} · triton {env['triton']} · commit {env['commit']} · {env['date']} "
          f"(every row: this card, this run)")
    head = f"{'model':<10} {'shape':<8} " + " ".join(f"{e[:11]:>11}" for e in EXECUTORS) + \
        f" {'best stock':>12} {'fused/best':>10} {'auto/best':>9}"
    print(head)
    print("-" * len(head))
    for m in results:
        for s, cell in m["cells"].items():
            vals = []
            for e in EXECUTORS:
                r = cell["rows"].get(e)
                if r is None:
                    vals.append("")
                elif r.get("status") == "ok":
                    vals.append(f"{r['median_ms']:.3f}" + ("!" if r.get("cosine_ok") is False else ""))
                elif r.get("status") == "does not fit":
                    vals.append("no fit")
                else:
                    vals.append(str(r.get("status"))[:11])
            ratio = lambda x: f"{x:.2f}" if x is not None else "—"  # noqa: E731
            print(f"{m['key']:<10} {s:<8} " + " ".join(f"{v:>11}" for v in vals) +
                  f" {cell['best_stock'] or '—':>12} {ratio(cell['fused_vs_best_stock']):>10} "
                  f"{ratio(cell['auto_vs_best_stock']):>9}")
    print("median ms per call; ratios = time / best stock time (<= 1.00: not slower); ! = failed the cosine check "
          "(excluded from ratios)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="all", help=f"comma-separated, from {', '.join(MODELS)} (default all)")
    p.add_argument("--shapes", default="all", help=f"comma-separated, from {', '.join(SHAPES)} (default all)")
    p.add_argument("--executors", default=",".join(EXECUTORS), help="rows to run (default all)")
    p.add_argument("--no-max-autotune", default="", metavar="MODELS",
                   help="models whose compile-max row is skipped (comma-separated keys, or 'all')")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", default="results", help="folder for the JSON")
    p.add_argument("--device", default="cuda", help="cuda (default); cpu only as a smoke test of the script with "
                                                     "--models clip-tiny (a preset name is accepted as a model)")
    args = p.parse_args(argv)
    for m in args.models.split(","):  # a preset name given directly (tiny models: smoke tests)
        if m and m not in MODELS and m != "all":
            from dualfuse.presets import PRESETS

            if m in PRESETS:
                MODELS[m] = m
    models = _pick(args.models, MODELS, "model(s)")
    shapes = _pick(args.shapes, SHAPES, "shape(s)")
    executors = _pick(args.executors, {e: e for e in EXECUTORS}, "executor(s)")
    args.no_max_autotune = set(MODELS) if args.no_max_autotune == "all" else \
        {x.strip() for x in args.no_max_autotune.split(",") if x.strip()}

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("never_slower: needs a CUDA GPU")
    from dualfuse.environment import environment

    env = environment(torch.device(args.device))
    # the commit as the caller names it (DUALFUSE_COMMIT, as gpu_figures.sh passes it): a copied work tree may carry
    # no .git, or an older one
    env["commit"] = os.environ.get("DUALFUSE_COMMIT") or "unknown"
    print(f"never_slower on {env['card']} · torch {env['torch']} · triton {env['triton']} · "
          f"commit {env['commit']} · {env['date']}", flush=True)
    t0 = time.perf_counter()
    results = []
    for m in models:
        print(f"{m} ({MODELS[m]})", flush=True)
        try:
            results.append(run_model(m, shapes, executors, args))
        except Exception as e:  # noqa: BLE001 - one model that cannot even load must not stop the others
            print(f"  {m}: failed: {_short(e)}", flush=True)
            results.append(dict(model=MODELS[m], key=m, error=_short(e), cells={}))
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print_table(results, env)
    os.makedirs(args.out, exist_ok=True)
    tag = "" if tuple(executors) == EXECUTORS else "-" + "_".join(executors)  # parts never overwrite each other
    path = os.path.join(args.out, f"never_slower-{'_'.join(models)}-{'_'.join(shapes).replace('+', 'p')}{tag}.json")
    with open(path, "w") as f:
        json.dump(dict(schema="dualfuse.never_slower/1", environment=env, command=" ".join(sys.argv),
                       wall_s=time.perf_counter() - t0, results=results), f, indent=1)
    print(f"written to {path} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

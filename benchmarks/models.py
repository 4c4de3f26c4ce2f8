"""The model table: for each published architecture, whether the fused executor covers it (or falls back, and
why), its parity with the fp32 source model, and fused vs the two-branch CUDA graph, all in one process.

    python benchmarks/models.py --out benchmarks/results/<card>-<date>/models    # every row (default out: ./results/models)
    python benchmarks/models.py --models clip-vit-b-32,open_clip:RN50 --iters 50

Weights are seeded random (built from the published configs, on the GPU); inputs are 1 image + 1 text of the
model's context length, fp16. Parity: per-embedding cosine of the fp16 executor vs the fp32 source model (its own
forward, not dualfuse's reference) on the same inputs. Timing: CUDA events per call, median over --iters calls
after a warm-up, 4 input sets rotated, graph and fused alternating in rounds. Writes <out>/<model>.json per row as
it goes, then <out>/models.json and the table as Markdown (<out>/models.md).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import warnings

import torch

MODELS = [  # (row label, dualfuse.load name)
    ("CLIP ViT-B/32", "clip-vit-b-32"),
    ("CLIP ViT-B/16", "clip-vit-b-16"),
    ("CLIP ViT-L/14", "clip-vit-l-14"),
    ("CLIP ViT-L/14-336", "clip-vit-l-14-336"),
    ("CLIP ViT-H/14", "clip-vit-h-14"),
    ("CLIP ViT-bigG/14", "clip-vit-bigg-14"),
    ("SigLIP B/16-224", "siglip-base-patch16-224"),
    ("SigLIP B/16-256", "siglip-base-patch16-256"),
    ("SigLIP B/16-384", "siglip-base-patch16-384"),
    ("SigLIP L/16-256", "siglip-large-patch16-256"),
    ("SigLIP so400m/14-384", "siglip-so400m-patch14-384"),
    ("SigLIP2 B/16 NaFlex", "siglip2-base-patch16-naflex"),
    ("MetaCLIP2 (worldwide H/14)", "metaclip2-worldwide-huge-quickgelu"),
    ("open_clip ViT-B-32", "open_clip:ViT-B-32"),
    ("open_clip ViT-B-16-SigLIP", "open_clip:ViT-B-16-SigLIP"),
    ("open_clip RN50 (convolutional)", "open_clip:RN50"),
]


def _load(name: str, device):
    from dualfuse import presets

    try:
        return presets.load(name, seed=0, device=device)
    except TypeError:  # a load without device support: build on the CPU, then move
        return presets.load(name, seed=0).to(device)


def _params_gb(model) -> float:
    return sum(p.numel() for p in model.parameters()) * 2 / 1e9  # fp16 bytes


def run_one(label: str, name: str, iters: int, device) -> dict:
    from dualfuse import executors
    from dualfuse.bench import cosine_check, random_inputs
    from dualfuse.timing import stats
    from dualfuse.adapters import family_of, model_io
    from dualfuse.executors.base import source_forward

    row = dict(label=label, model=name)
    t0 = time.perf_counter()
    src = _load(name, device).float().eval()
    row["build_s"] = time.perf_counter() - t0
    row["weights_gb_fp16"] = _params_gb(src)
    io = model_io(src)
    inputs = random_inputs(io, 1, 1, sets=4, seed=0, device=device, dtype=torch.float16)
    image_fn, text_fn = source_forward(src, family_of(src))

    def fp32(px):
        if hasattr(px, "pixel_values"):  # PatchSequence
            return type(px)(px.pixel_values.float(), px.spatial_shapes, px.pixel_attention_mask)
        return px.float()

    with torch.no_grad():
        px0, ids0 = inputs[0]
        refs = (image_fn(fp32(px0)), text_fn(ids0))
    del src
    gc.collect()
    torch.cuda.empty_cache()

    model = _load(name, device).eval()  # each executor reads its own copy (the graph executor copies it again)
    exs = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        exs["fused"] = executors.get("fused", model, dtype=torch.float16, device=device)
        row["fused_build_s"] = time.perf_counter() - t0
    fb = exs["fused"].fallback
    row["status"] = "fused" if fb is None else "fallback"
    row["reason"] = exs["fused"].notes if fb is not None else ""
    row["warnings"] = [str(w.message) for w in caught if "dualfuse" in str(w.message)]
    try:
        exs["graph"] = executors.get("graph", model, dtype=torch.float16, device=device)
    except Exception as e:  # noqa: BLE001 - recorded in the row
        row["graph_error"] = f"{type(e).__name__}: {e}"[:300]
    del model
    gc.collect()

    def call(ex, i):
        px, ids = inputs[i % len(inputs)]
        return ex.encode(px, ids)

    for key, ex in list(exs.items()):
        try:
            t0 = time.perf_counter()
            out = call(ex, 0)
            torch.cuda.synchronize()
            row[f"{key}_first_call_s"] = time.perf_counter() - t0
            row[f"{key}_parity"] = cosine_check(out, refs)
            for i in range(10):
                call(ex, i)
        except Exception as e:  # noqa: BLE001 - recorded in the row
            row[f"{key}_error"] = f"{type(e).__name__}: {e}"[:300]
            del exs[key]
    samples = {k: [] for k in exs}
    rounds = 5
    for _ in range(rounds):  # alternate, so both see the same card state
        for key, ex in exs.items():
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters // rounds)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters // rounds)]
            torch.cuda.synchronize()
            for i in range(iters // rounds):
                starts[i].record()
                call(ex, i)
                ends[i].record()
                ends[i].synchronize()
            samples[key] += [s.elapsed_time(e) for s, e in zip(starts, ends)]
    for key, xs in samples.items():
        row[f"{key}_ms"] = stats(xs)
    if "fused_ms" in row and "graph_ms" in row:
        row["fused_over_graph"] = row["fused_ms"]["median_ms"] / row["graph_ms"]["median_ms"]
    row["peak_gpu_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    del exs
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| model | fp16 weights GB | fused? | min cos vs fp32 source (fused) | graph ms | fused ms | fused / graph |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        f = lambda x, s="{:.3f}": "—" if x is None else s.format(x)  # noqa: E731
        status = r.get("status", "error")
        if status == "fallback":
            status = f"falls back: {r['reason'].split(': ', 1)[-1]}"
        if r.get("error"):
            status = f"error: {r['error']}"
        cos = (r.get("fused_parity") or {}).get("min_cosine")
        gm = (r.get("graph_ms") or {}).get("median_ms")
        fm = (r.get("fused_ms") or {}).get("median_ms")
        lines.append(f"| {r['label']} | {f(r.get('weights_gb_fp16'), '{:.2f}')} | {status} | {f(cos, '{:.6f}')} | "
                     f"{f(gm)}{' (' + r['graph_error'][:60] + ')' if r.get('graph_error') else ''} | {f(fm)} | "
                     f"{f(r.get('fused_over_graph'), '{:.2f}')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", help="comma-separated load names (default: every row)")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--out", default="results/models")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/models.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from dualfuse.environment import environment
    from dualfuse.util import slug

    device = torch.device("cuda", torch.cuda.current_device())
    wanted = [m.strip() for m in args.models.split(",")] if args.models else [n for _, n in MODELS]
    labels = dict((n, l) for l, n in MODELS)
    os.makedirs(args.out, exist_ok=True)
    env = environment(device)
    print(f"card: {env['card']} · torch {env['torch']} · triton {env['triton']} · transformers {env['transformers']}",
          flush=True)
    rows = []
    for name in wanted:
        t0 = time.time()
        try:
            row = run_one(labels.get(name, name), name, args.iters, device)
        except Exception as e:  # noqa: BLE001 - one row's failure must not lose the others
            row = dict(label=labels.get(name, name), model=name, error=f"{type(e).__name__}: {e}"[:300])
            gc.collect()
            torch.cuda.empty_cache()
        row["wall_s"] = time.time() - t0
        rows.append(row)
        with open(os.path.join(args.out, f"{slug(name, keep='_.-')}.json"), "w") as f:
            json.dump(dict(env=env, row=row), f, indent=1)
        print(f"{name}: {row.get('status', 'error')} {row.get('error', '')} in {row['wall_s']:.0f} s · "
              f"fused {(row.get('fused_ms') or {}).get('median_ms')} ms · graph {(row.get('graph_ms') or {}).get('median_ms')} ms"
              f" · cos {(row.get('fused_parity') or {}).get('min_cosine')}", flush=True)
    with open(os.path.join(args.out, "models.json"), "w") as f:
        json.dump(dict(env=env, command=" ".join(sys.argv), rows=rows), f, indent=1)
    md = table(rows)
    with open(os.path.join(args.out, "models.md"), "w") as f:
        f.write(f"{env['card']}, {env['date']}, torch {env['torch']}, triton {env['triton']}\n\n{md}\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

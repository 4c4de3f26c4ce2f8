"""`dualfuse embed --engine ray` on 1, 2, 4 and 8 GPUs of one host: images/s, per-GPU efficiency, where time
goes, and parity with the one-GPU run.

    python benchmarks/embed_scaling.py --out results/embed-scaling [--images 10000] [--gpus 1,2,4,8]
        [--models clip-vit-b-32,clip-vit-l-14]

One Ray is started in this process with every GPU and CPU of the host (NCCL_NVLS_ENABLE=0: no collective runs,
and NVLink multicast stays off). The corpus is embed_bench.py's (built once in ``--corpus``). For each model and
each GPU count N (counts above the host's GPUs are skipped), one ``run_embed(engine="ray", ray_gpus=N)`` into a
fresh folder: N model actors (one fused model, one GPU each, fp16, batch --batch), reading and decoding on Ray CPU
tasks. Each row reports:

- ``images/s``: images / the engine's wall time (actors' start-up and model load included), and ``steady``:
  images/s after the first batch came back (start-up excluded: what a long run converges to);
- ``eff``: steady images/s per GPU against the one-GPU run's (N GPUs: ``ips_N / (N * ips_1)``);
- seconds per stage summed over Ray tasks and actors (read, decode, model) and Ray's per-operator stats
  (``ds.stats()``: CPU time, object store use) in the JSON;
- ``cpu/gpu``: decode CPU-seconds per model GPU-second -- how many CPU cores one GPU needs at this model;
- parity: cosine of each path's embedding with the one-GPU run's (min over all paths) and the max abs difference.

Targets: >= 85% efficiency at 8 GPUs for ViT-L/14; ViT-B/32 as far as the host's CPUs decode. ``--smoke`` runs it
on CPU (clip-tiny, 64 images, one CPU actor, eager executor): a check of the script, no figure.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

os.environ["NCCL_NVLS_ENABLE"] = "0"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def parity(ref_dir: str, out_dir: str) -> dict:
    import numpy as np

    from dualfuse.embed.store import read_embeddings

    ka, va = read_embeddings(ref_dir)
    kb, vb = read_embeddings(out_dir)
    b = dict(zip(kb, vb))
    missing = [k for k in ka if k not in b]
    common = [i for i, k in enumerate(ka) if k in b]
    vb2 = np.stack([b[ka[i]] for i in common]) if common else np.zeros_like(va)
    cos = (va[common] * vb2).sum(1) if common else np.zeros(0)
    return dict(paths=len(common), missing=len(missing), extra=len(set(kb) - set(ka)),
                min_cosine=float(cos.min()) if len(cos) else None,
                max_abs_diff=float(abs(va[common] - vb2).max()) if common else None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--corpus", default="/tmp/dualfuse-embed-corpus")
    ap.add_argument("--models", default="clip-vit-b-32,clip-vit-l-14")
    ap.add_argument("--gpus", default="1,2,4,8")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--keep", action="store_true", help="keep the output folders (in --out)")
    ap.add_argument("--executor", default="fused")
    ap.add_argument("--smoke", action="store_true", help="CPU: clip-tiny, 64 images, one CPU actor (eager); no figure")
    args = ap.parse_args(argv)

    import ray
    import torch

    from dualfuse.embed import EmbedConfig, run_embed
    from dualfuse.environment import environment
    from embed_bench import build_corpus

    have = torch.cuda.device_count() if torch.cuda.is_available() and not args.smoke else 0
    if not have and not args.smoke:
        raise SystemExit("no CUDA device: run on a GPU host, or --smoke on CPU")
    counts = [0] if args.smoke else [g for g in (int(x) for x in args.gpus.split(",")) if g <= have]
    skipped = [] if args.smoke else [g for g in (int(x) for x in args.gpus.split(",")) if g > have]
    models = ["clip-tiny"] if args.smoke else args.models.split(",")
    n = 64 if args.smoke else args.images
    batch = 16 if args.smoke else args.batch
    corpus = args.corpus + ("-smoke" if args.smoke else "")
    info = build_corpus(corpus, n)
    print(f"corpus: {n} JPEGs in {corpus}; GPUs here: {have}; runs at {counts} GPUs"
          + (f" (skipped {skipped}: more than the host has)" if skipped else ""), flush=True)
    cpus = os.cpu_count() or 2
    ray.init(num_cpus=2 if args.smoke else cpus, num_gpus=have, include_dashboard=False, log_to_driver=False)
    doc = dict(environment=environment(torch.device("cuda" if have else "cpu")), corpus=dict(info, folder=corpus),
               host_cpus=cpus, gpus_here=have, skipped=skipped, batch=batch, results=[])
    work = os.path.join(args.out, "runs") if args.keep else tempfile.mkdtemp(prefix="dualfuse-embed-scaling-")
    try:
        for model in models:
            ref_dir, base = None, None
            for g in counts:
                out_dir = os.path.join(work, f"{model}-{g}gpu")
                shutil.rmtree(out_dir, ignore_errors=True)
                cfg = EmbedConfig(model=model, images=corpus, out=out_dir, batch=batch, engine="ray", ray_gpus=g,
                                  executor="eager" if args.smoke else args.executor,
                                  dtype="fp16" if g else "fp32")
                t0 = time.perf_counter()
                r = run_embed(cfg)
                row = dict(model=model, gpus=g, images=r.images, failures=r.failures, wall_s=r.wall_s,
                           setup_s=r.setup_s, total_s=time.perf_counter() - t0, images_per_s=r.images_per_s,
                           steady_images_per_s=r.steady_images_per_s, first_batch_s=r.first_batch_s,
                           stages=r.stages, ray_stats=r.details.get("ray_stats"), notes=r.notes)
                steady = r.steady_images_per_s or r.images_per_s
                if base is None:
                    base, ref_dir = steady, out_dir
                row["efficiency"] = steady / (max(g, 1) * base) if base else None
                row["decode_cpu_per_gpu_s"] = (r.stages["decode"] + r.stages["read"]) / r.stages["model"] \
                    if r.stages["model"] else None
                row["parity"] = parity(ref_dir, out_dir) if out_dir != ref_dir else None
                doc["results"].append(row)
                p = row["parity"]
                print(f"{model} {g} GPU: {r.images_per_s:.0f} images/s ({steady:.0f} steady), efficiency "
                      f"{row['efficiency']:.2f}, first batch after {r.first_batch_s or 0:.1f} s"
                      + (f", parity min cos {p['min_cosine']:.6f} over {p['paths']} paths" if p else ""), flush=True)
    finally:
        ray.shutdown()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "embed_scaling.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    print()
    print(f"{'model':<16} {'GPUs':>4} {'images/s':>9} {'steady':>8} {'eff':>5} {'read s':>7} {'decode s':>9} "
          f"{'model s':>8} {'cpu/gpu':>8} {'min cos vs 1 GPU':>17}")
    for row in doc["results"]:
        st, p = row["stages"], row["parity"]
        cos = "%.6f" % p["min_cosine"] if p and p["min_cosine"] is not None else "-"
        steady = row["steady_images_per_s"] or row["images_per_s"]
        print(f"{row['model']:<16} {row['gpus']:>4} {row['images_per_s']:>9.0f} {steady:>8.0f} "
              f"{row['efficiency']:>5.2f} {st['read']:>7.1f} {st['decode']:>9.1f} {st['model']:>8.1f} "
              f"{(row['decode_cpu_per_gpu_s'] or 0):>8.1f} {cos:>17}")
    print(f"host: {cpus} CPUs, {have} x {doc['environment'].get('card')}; JSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

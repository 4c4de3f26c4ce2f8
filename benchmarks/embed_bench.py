"""`dualfuse embed` on one GPU against a clip-retrieval-style baseline and the model-only ceiling.

    python benchmarks/embed_bench.py --out results/embed [--images 10000] [--models clip-vit-b-32,clip-vit-l-14]

1. The corpus (built once, kept in ``--corpus``, default /tmp/dualfuse-embed-corpus): ``--images`` JPEGs of photo
   sizes (longer side 400-1000 px, random aspect 3:4 .. 16:9), each a random crop of one of scikit-image's sample
   photos (astronaut, coffee, chelsea, rocket, Hubble deep field, IHC, retina, colorwheel; grayscale ones as RGB),
   scaled and re-encoded with PIL (quality 80-95), made by one process per CPU.
2. Per model (presets with random weights; fp16), all in this process, on one GPU:
   - ``dualfuse``: :func:`dualfuse.embed.run_embed` over the corpus (local engine, batch --batch, --workers decode
     threads; ``decode=cpu``, and ``decode=gpu`` (nvJPEG) where torchvision decodes JPEGs on CUDA). The model is
     built and warmed up (one batch: Triton compile, graph capture) before the timed run; the timed run includes
     everything after: reading, decoding, copies, model, writing Parquet.
   - ``baseline``: what clip-retrieval's ``clip inference`` does: a torch DataLoader with --workers PIL workers
     running the CLIP processor's transform (Resize(S, bicubic), CenterCrop(S), ToTensor, Normalize: torchvision
     transforms on PIL images), the HF model in fp16, ``get_image_features`` at batch --batch, embeddings
     normalized and copied to the host. Timed from the DataLoader's first batch request to the last embedding.
   - ``ceiling``: the fused executor on uint8 frames already on the device (the same ``Encoder.encode_frames``
     the run uses), N / batch calls, synchronized at the end: the model-only images/s.
   Parity: for --parity paths, run_embed's stored embedding against (a) the HF fp32 model on the same decoded
   frames (the model's parity) and (b) the baseline's embedding (its own decode and resize: PIL full-size decode
   vs dualfuse's reduced-scale JPEG decode), as cosine similarities.
3. A table (images/s, x baseline, share of ceiling, seconds per stage) and ``--out/embed_bench.json``.

Targets (for ViT-B/32 at batch 256): >= 3x the baseline; ViT-L/14: >= 1.5x; both >= 80% of the ceiling.
On CPU, ``--smoke`` runs the whole script on clip-tiny with 64 images and the eager executor (no figure).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "colorwheel", "camera", "coins", "horse", "moon", "brick", "grass")


def _photos():
    import numpy as np
    import skimage.data as d

    out = []
    for name in PHOTOS:
        try:
            x = np.asarray(getattr(d, name)())
        except Exception:  # noqa: BLE001 - not bundled with this scikit-image
            continue
        if x.ndim == 2:
            x = np.stack([x] * 3, -1)
        out.append(x[..., :3].astype(np.uint8))
    if not out:
        raise SystemExit("no scikit-image sample photos could be loaded (pip install scikit-image)")
    return out


def _make(args):
    """Write images [start, end) of the corpus."""
    from PIL import Image

    folder, start, end, seed = args
    photos = _photos()
    for i in range(start, end):
        rng = random.Random(seed * 1_000_003 + i)
        src = photos[rng.randrange(len(photos))]
        h, w = src.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
        y, x = rng.randrange(h - ch + 1), rng.randrange(w - cw + 1)
        long_side = rng.randint(400, 1000)
        aspect = rng.uniform(4 / 3, 16 / 9)
        size = (long_side, round(long_side / aspect)) if rng.random() < 0.7 else (round(long_side / aspect), long_side)
        im = Image.fromarray(src[y:y + ch, x:x + cw]).resize(size, Image.BICUBIC)
        sub = os.path.join(folder, f"{i // 1000:03d}")
        os.makedirs(sub, exist_ok=True)
        im.save(os.path.join(sub, f"{i:06d}.jpg"), quality=rng.randint(80, 95))
    return end - start


def build_corpus(folder: str, n: int, seed: int = 0) -> dict:
    from multiprocessing import Pool

    stamp = os.path.join(folder, "corpus.json")
    want = dict(images=n, seed=seed, photos=list(PHOTOS), version=1)
    if os.path.isfile(stamp):
        with open(stamp) as f:
            if json.load(f) == want:
                return dict(want, built_s=0.0, reused=True)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    t0 = time.perf_counter()
    step = 250
    with Pool(os.cpu_count() or 4) as pool:
        made = sum(pool.map(_make, [(folder, s, min(n, s + step), seed) for s in range(0, n, step)]))
    assert made == n
    with open(stamp, "w") as f:
        json.dump(want, f)
    return dict(want, built_s=time.perf_counter() - t0, reused=False)


def list_images(folder: str) -> list[str]:
    out = []
    for d, _, files in os.walk(folder):
        out += [os.path.join(d, f) for f in files if f.endswith(".jpg")]
    return sorted(out)


# ------------------------------------------------------------------------------------------------ baseline

class ClipRetrievalStyle:
    """A map-style dataset: file -> PIL -> the CLIP processor's transform (torchvision on PIL)."""

    def __init__(self, paths, size, mean, std):
        self.paths, self.size, self.mean, self.std = paths, size, mean, std
        self.tf = None

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image
        from torchvision import transforms as T

        if self.tf is None:
            self.tf = T.Compose([T.Resize(self.size, interpolation=T.InterpolationMode.BICUBIC),
                                 T.CenterCrop(self.size), T.ToTensor(), T.Normalize(self.mean, self.std)])
        with Image.open(self.paths[i]) as im:
            return self.tf(im.convert("RGB"))


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_baseline(model_name, paths, batch, workers, device):
    import torch
    import torch.nn.functional as F

    from dualfuse import load
    from dualfuse.adapters import image_normalization, model_io

    src = load(model_name, seed=0)
    io = model_io(src)
    mean, std = image_normalization(src)
    half = torch.float16 if device.type == "cuda" else torch.float32
    hf = src.to(device=device, dtype=half).eval()
    ds = ClipRetrievalStyle(paths, io.image_size, mean, std)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers, pin_memory=True, shuffle=False)

    def features(px):
        out = hf.get_image_features(pixel_values=px)
        out = out if isinstance(out, torch.Tensor) else out.pooler_output
        return F.normalize(out.float(), dim=-1)

    with torch.no_grad():
        features(torch.randn(batch, 3, io.image_size, io.image_size, device=device, dtype=half))
        _sync(device)
        t0 = time.perf_counter()
        embs = []
        for px in dl:
            embs.append(features(px.to(device, non_blocking=True).to(half)).cpu())
        _sync(device)
        wall = time.perf_counter() - t0
    return dict(images=len(paths), wall_s=wall, images_per_s=len(paths) / wall), torch.cat(embs), hf, ds


# ------------------------------------------------------------------------------------------------ ours

def run_ours(encoder, corpus, batch, workers, decode, out_dir):
    from dualfuse.embed import EmbedConfig, run_embed

    shutil.rmtree(out_dir, ignore_errors=True)
    cfg = EmbedConfig(model=encoder.name, images=corpus, out=out_dir, batch=batch, workers=workers, decode=decode,
                      dtype=encoder.dtype, device=str(encoder.device))
    r = run_embed(cfg, encoder=encoder)
    return r


def ceiling(encoder, n, batch, device):
    import torch

    calls = max(1, n // batch)
    x = torch.randint(0, 256, (batch, encoder.image_size, encoder.image_size, 3), dtype=torch.uint8, device=device)
    encoder.encode_frames(x)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        encoder.encode_frames(x)
    _sync(device)
    wall = time.perf_counter() - t0
    return dict(images=calls * batch, wall_s=wall, images_per_s=calls * batch / wall)


def parity(out_dir, paths, base_embs, all_paths, hf, image_size, device):
    import numpy as np
    import torch
    import torch.nn.functional as F

    from dualfuse.adapters import image_normalization
    from dualfuse.embed.decode import decode_frame
    from dualfuse.embed.store import read_embeddings
    from dualfuse.executors.base import normalize_frames

    keys, vecs = read_embeddings(out_dir)
    ours = dict(zip(keys, vecs))
    index = {p: i for i, p in enumerate(all_paths)}
    mean, std = image_normalization(hf)
    hf32 = hf.float()
    rows = []
    with torch.no_grad():
        for p in paths:
            with open(p, "rb") as f:
                frame = torch.from_numpy(decode_frame(f.read(), image_size).copy())[None].to(device)
            px = normalize_frames(frame.permute(0, 3, 1, 2), mean, std)
            out = hf32.get_image_features(pixel_values=px)
            out = out if isinstance(out, torch.Tensor) else out.pooler_output
            ref = F.normalize(out.float(), dim=-1)[0].cpu().numpy()
            o = ours[p]
            rows.append(dict(path=p, cos_same_frames_fp32=float(np.dot(o, ref)),
                             cos_baseline=float(np.dot(o, base_embs[index[p]].numpy()))))
    hf.to(torch.float16 if device.type == "cuda" else torch.float32)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for embed_bench.json")
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--corpus", default="/tmp/dualfuse-embed-corpus")
    ap.add_argument("--models", default="clip-vit-b-32,clip-vit-l-14")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 4))
    ap.add_argument("--decode", default="cpu,gpu", help="decoders of the dualfuse runs (cpu, gpu)")
    ap.add_argument("--parity", type=int, default=8, help="paths checked against the HF model")
    ap.add_argument("--executor", default="fused", help="executor of the dualfuse runs (default fused)")
    ap.add_argument("--smoke", action="store_true", help="CPU: clip-tiny, 64 images, eager executor; no figure")
    args = ap.parse_args(argv)

    import torch

    from dualfuse.embed.encoder import load_encoder
    from dualfuse.environment import environment

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        raise SystemExit("no CUDA device: run on a GPU, or --smoke on CPU")
    device = torch.device("cuda" if cuda else "cpu")
    models = ["clip-tiny"] if args.smoke else args.models.split(",")
    n = 64 if args.smoke else args.images
    batch = 16 if args.smoke else args.batch
    workers = min(args.workers, 4) if args.smoke else args.workers
    decoders = ["cpu"] if args.smoke else [d for d in args.decode.split(",") if d]
    corpus_info = build_corpus(args.corpus + ("-smoke" if args.smoke else ""), n)
    corpus = args.corpus + ("-smoke" if args.smoke else "")
    paths = list_images(corpus)
    how = "reused" if corpus_info["reused"] else "built in %.1f s" % corpus_info["built_s"]
    print(f"corpus: {len(paths)} JPEGs in {corpus} ({how})", flush=True)
    doc = dict(environment=environment(device), corpus=dict(corpus_info, folder=corpus), batch=batch, workers=workers,
               results=[])
    work = tempfile.mkdtemp(prefix="dualfuse-embed-bench-")
    try:
        for name in models:
            row = dict(model=name)
            t0 = time.perf_counter()
            executor = "eager" if args.smoke else args.executor
            enc = load_encoder(name, executor, "fp16" if cuda else "fp32", device)
            enc.encode_frames(torch.zeros((batch, enc.image_size, enc.image_size, 3), dtype=torch.uint8,
                                          device=device))  # compile + capture the batch's runner
            row["build_s"] = time.perf_counter() - t0
            row["fallback"] = getattr(enc.ex, "fallback", None) is not None
            print(f"{name}: model built and warmed up in {row['build_s']:.1f} s", flush=True)
            row["ceiling"] = ceiling(enc, n, batch, device)
            print(f"  ceiling {row['ceiling']['images_per_s']:.0f} images/s", flush=True)
            row["dualfuse"] = {}
            out_dirs = {}
            for dec in decoders:
                out_dirs[dec] = os.path.join(work, f"{name}-{dec}")
                try:
                    r = run_ours(enc, corpus, batch, workers, dec, out_dirs[dec])
                except ValueError as e:
                    print(f"  dualfuse decode={dec}: unavailable ({e})", flush=True)
                    row["dualfuse"][dec] = dict(error=str(e))
                    continue
                row["dualfuse"][dec] = dict(images=r.images, failures=r.failures, wall_s=r.wall_s,
                                            images_per_s=r.images_per_s, stages=r.stages,
                                            first_batch_s=r.first_batch_s, details=r.details)
                print(f"  dualfuse decode={dec}: {r.images_per_s:.0f} images/s ({r.images} images, "
                      f"{r.failures} failures, {r.wall_s:.2f} s; waited for decode "
                      f"{r.details.get('waited_for_decode_s', 0):.2f} s; stages "
                      f"{json.dumps({k: round(v, 2) for k, v in r.stages.items()})})",
                      flush=True)
            done = [d for d in decoders if "images_per_s" in row["dualfuse"][d]]
            if done:
                image_size = enc.image_size
                del enc
                if cuda:
                    torch.cuda.empty_cache()
                base, base_embs, hf, _ = run_baseline(name, paths, batch, workers, device)
                row["baseline"] = base
                print(f"  baseline: {base['images_per_s']:.0f} images/s ({base['wall_s']:.2f} s)", flush=True)
                rng = random.Random(0)
                sample = rng.sample(paths, min(args.parity, len(paths)))
                row["parity"] = parity(out_dirs[done[0]], sample, base_embs, paths, hf, image_size, device)
                worst = min(p["cos_same_frames_fp32"] for p in row["parity"])
                worst_b = min(p["cos_baseline"] for p in row["parity"])
                print(f"  parity ({len(sample)} paths): cosine vs HF fp32 on the same frames >= {worst:.5f}; "
                      f"vs the baseline's own preprocessing >= {worst_b:.4f}", flush=True)
                del hf
                if cuda:
                    torch.cuda.empty_cache()
            doc["results"].append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "embed_bench.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    print()
    print(f"{'model':<16} {'run':<16} {'images/s':>9} {'x base':>7} {'% ceil':>7}  "
          f"{'read':>6} {'decode':>7} {'h2d':>6} {'model':>6} {'write':>6}  (stage seconds; read/decode summed "
          f"over {workers} threads)")
    for row in doc["results"]:
        base = row.get("baseline", {}).get("images_per_s")
        ceil = row.get("ceiling", {}).get("images_per_s")
        runs = [(f"dualfuse/{d}", v) for d, v in row["dualfuse"].items() if "images_per_s" in v]
        runs += [("baseline", row["baseline"])] if "baseline" in row else []
        runs += [("ceiling", row["ceiling"])] if "ceiling" in row else []
        for label, v in runs:
            ips = v["images_per_s"]
            st = v.get("stages")
            stages = " ".join(f"{st[k]:>6.2f}" if k != "decode" else f"{st[k]:>7.2f}"
                              for k in ("read", "decode", "h2d", "model", "write")) if st else ""
            print(f"{row['model']:<16} {label:<16} {ips:>9.0f} "
                  f"{(f'{ips / base:.2f}x' if base else '-'):>7} {(f'{100 * ips / ceil:.0f}%' if ceil else '-'):>7}  {stages}")
    print(f"card: {doc['environment'].get('card')}; JSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

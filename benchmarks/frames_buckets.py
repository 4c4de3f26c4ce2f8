"""Text-length buckets and uint8 camera frames, measured on a GPU.

    python benchmarks/frames_buckets.py --model clip-vit-b-32 --out benchmarks/results/frames_buckets.json

(a) Text lengths: a stream of 1 image + --texts texts whose length cycles through 12 values (what ``padding=True``
    batches give: each padded to its longest text), with the default text buckets and with buckets off, next to
    the same call at one fixed length (the context length, and each bucket). Median wall time per call after a
    warm-up pass over the stream (target: the bucketed stream <= 1.1x the fixed length). Also the first-call
    (build + graph capture) time of each bucket's runner, from ``executor.build_times`` after ``warmup()``, and the
    wall time of a first call without warm-up.
(b) Camera frames: uint8 [B, H, W, 3] frames in host memory, at B=1 and B=32, three ways into the image tower:
    ``uint8``: the frames copied to the device as uint8 and passed as they are (mean/std folded into the patch
    embedding); ``host_float``: normalized on the host ((x / 255 - mean) / std, NCHW float) and copied to the device
    in the model dtype; ``device_float``: copied as uint8, normalized on the device with torch ops, then the
    float call. Median wall time per call (time.perf_counter around the whole pipeline, synchronized).

Wall times include host work, so no CUDA events. ``--device cpu --model clip-tiny`` runs the same code on CPU
(Triton interpreter, TRITON_INTERPRET=1; slow, for checking the script only).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def stream_lengths(ctx: int, n: int = 12) -> list[int]:
    """n distinct text lengths spread over [2, ctx] (fewer if ctx is small), in a fixed shuffled order."""
    n = min(n, max(ctx - 1, 1))
    if n == 1:
        return [min(2, ctx)]
    vals = sorted({round(2 + i * (ctx - 2) / (n - 1)) for i in range(n)})
    order = [vals[(i * 5) % len(vals)] for i in range(len(vals))]  # 5 is coprime with 12: a permutation
    return order if len(set(order)) == len(vals) else vals


def median_ms(fn, iters: int, sync) -> float:
    samples = []
    for i in range(iters):
        sync()
        t0 = time.perf_counter()
        fn(i)
        sync()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def text_ids(n: int, length: int, vocab: int, eos: int | None, device, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab - 1, (n, length), generator=g)
    eos = vocab - 1 if eos is None else eos
    ids[ids == eos] = 1
    ids[:, -1] = eos  # each text ends at its EOS (argmax pooling: the largest id)
    return ids.to(device)


def bench_buckets(model, args, device, dtype, sync) -> dict:
    import torch

    from dualfuse.executors.fused import FusedExecutor

    out = {}
    on = FusedExecutor(model, dtype=dtype, device=device)  # default buckets
    off = FusedExecutor(model, dtype=dtype, device=device, text_buckets=None)
    io, ctx = on.io, on.spec.text.context_length
    lengths = stream_lengths(ctx)
    out["context_length"], out["stream_lengths"], out["text_buckets"] = ctx, lengths, on.text_buckets
    out["text_buckets_off_reason"] = on.text_buckets_off
    s = io.image_size
    px = torch.randn(1, io.channels, s, s, device=device, dtype=dtype)
    stream = [text_ids(args.texts, n, io.vocab_size, io.eos_token_id, device, seed=i) for i, n in enumerate(lengths)]

    # first-call times: each bucket's runner built (and captured) by warmup()
    fresh = FusedExecutor(model, dtype=dtype, device=device)
    buckets = fresh.text_buckets or (ctx,)
    t0 = time.perf_counter()
    fresh.warmup([(1, args.texts, b) for b in buckets])
    out["warmup_total_s"] = time.perf_counter() - t0
    out["first_call_s_per_bucket"] = {str(k): v for k, v in fresh.build_times.items()}
    cold = FusedExecutor(model, dtype=dtype, device=device)
    sync()
    t0 = time.perf_counter()
    cold.encode(px, stream[0])
    sync()
    out["first_call_without_warmup_s"] = time.perf_counter() - t0
    out["first_call_note"] = ("the first bucket's warmup time includes compiling the kernels in this process; the "
                              "call without warm-up comes after it (kernels compiled, runner and graph not built)")

    for ex in (on, off):  # warm-up pass over the stream (on: builds every bucket once)
        for ids in stream:
            ex.encode(px, ids)
    n = len(stream)
    out["stream_buckets_ms"] = median_ms(lambda i: on.encode(px, stream[i % n]), args.iters, sync)
    out["stream_buckets_runners"] = len(on.runners)
    out["stream_exact_lengths_ms"] = median_ms(lambda i: off.encode(px, stream[i % n]), args.stream_off_iters, sync)
    fixed = text_ids(args.texts, ctx, io.vocab_size, io.eos_token_id, device)
    on.encode(px, fixed)
    out["fixed_context_length_ms"] = median_ms(lambda i: on.encode(px, fixed), args.iters, sync)
    per_bucket = {}
    for b in buckets:
        ids = text_ids(args.texts, b, io.vocab_size, io.eos_token_id, device)
        on.encode(px, ids)
        per_bucket[str(b)] = median_ms(lambda i: on.encode(px, ids), args.iters, sync)
    out["fixed_per_bucket_ms"] = per_bucket
    out["stream_vs_fixed"] = out["stream_buckets_ms"] / out["fixed_context_length_ms"]
    out["target_stream_vs_fixed"] = 1.1
    return out


def bench_frames(model, args, device, dtype, sync) -> dict:
    import torch

    from dualfuse.executors.fused import FusedExecutor

    ex = FusedExecutor(model, dtype=dtype, device=device)
    io = ex.io
    s = io.image_size
    mean = torch.tensor(ex.image_mean).view(1, -1, 1, 1)
    std = torch.tensor(ex.image_std).view(1, -1, 1, 1)
    mean_d, std_d = mean.to(device), std.to(device)
    pin = device.type == "cuda"
    out = {"image_mean": ex.image_mean, "image_std": ex.image_std}
    for b in args.frame_batches:
        frames = torch.randint(0, 256, (b, s, s, io.channels), dtype=torch.uint8)
        if pin:
            frames = frames.pin_memory()

        def uint8(i):
            return ex.encode_image(frames.to(device, non_blocking=True))

        def host_float(i):
            x = (frames.permute(0, 3, 1, 2).float() / 255 - mean) / std
            return ex.encode_image(x.to(device=device, dtype=dtype))

        def device_float(i):
            x = frames.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
            return ex.encode_image(((x / 255 - mean_d) / std_d).to(dtype))

        row = {}
        ref = host_float(0).float()
        for name, fn in (("uint8", uint8), ("host_float", host_float), ("device_float", device_float)):
            got = fn(0).float()  # builds the runner (uint8 calls have one of their own)
            row[f"{name}_rel_err_vs_host_float"] = ((got - ref).norm() / ref.norm()).item()
            row[f"{name}_ms"] = median_ms(fn, args.iters, sync)
        row["uint8_speedup_vs_host_float"] = row["host_float_ms"] / row["uint8_ms"]
        out[f"batch_{b}"] = row
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="clip-vit-b-32", help="preset name (default clip-vit-b-32)")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (interpreter: checks the script only)")
    p.add_argument("--dtype", default=None, help="fp16 (default on CUDA), bf16 or fp32 (default on CPU)")
    p.add_argument("--texts", type=int, default=4, help="texts per call in the length stream (default 4)")
    p.add_argument("--iters", type=int, default=200, help="timed calls per measurement (default 200)")
    p.add_argument("--stream-off-iters", type=int, default=24,
                   help="timed calls of the stream with buckets off (each may build a runner; default 24)")
    p.add_argument("--frame-batches", type=int, nargs="+", default=[1, 32], help="frame batch sizes (default 1 32)")
    p.add_argument("--only", choices=("buckets", "frames"), default=None, help="run one part only")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    for name in ("texts", "iters", "stream_off_iters"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if any(b < 1 for b in args.frame_batches):
        p.error("--frame-batches must be >= 1")

    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
    import torch

    from dualfuse import presets
    from dualfuse.executors.base import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    model = presets.load(args.model, seed=0, device=device)
    result = dict(model=args.model, device=str(device), dtype=str(dtype).removeprefix("torch."),
                  card=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  texts=args.texts, iters=args.iters)
    with torch.no_grad():
        if args.only in (None, "buckets"):
            result["buckets"] = bench_buckets(model, args, device, dtype, sync)
        if args.only in (None, "frames"):
            result["frames"] = bench_frames(model, args, device, dtype, sync)
    text = json.dumps(result, indent=1, default=str)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

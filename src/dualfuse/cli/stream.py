"""`dualfuse stream`: zero-shot labels for a video (or synthetic frames), frame by frame, with the latency of each
part of the loop. The command line of :func:`dualfuse.stream.run_stream`: parses the flags, shows a progress bar,
prints the per-part table, writes ``--json``. ``--sms N`` reruns the command in a process of its own inside a
green context."""
from __future__ import annotations

import os
import subprocess
import sys

from ..stream import PARTS, VIDEO_PACKAGES, FrameRecord, run_stream
from ..util import write_json
from . import fail

HELP = "zero-shot labels for a video (or synthetic frames), frame by frame: FPS and per-part latency p50/p99"


def add_arguments(parser) -> None:
    import argparse

    parser.description = (__doc__ or "").split("\n\n")[0] + "\n\n" + HELP
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--video", metavar="PATH", help=f"video file (decoded with {VIDEO_PACKAGES})")
    src.add_argument("--synthetic", type=int, metavar="N", help="N deterministic synthetic uint8 frames")
    parser.add_argument("--prompts", required=True, help='comma-separated labels, e.g. "a dog,a cat,a car"')
    parser.add_argument("--model", default="clip-vit-b-32", metavar="NAME|PATH",
                        help="preset name, HF model directory or open_clip:ARCH (default clip-vit-b-32)")
    parser.add_argument("--executor", default="fused", help="executor (default fused: takes uint8 frames)")
    parser.add_argument("--weights", default="fp16", choices=["fp16", "int8"],
                        help="weights (default fp16: the --dtype; int8: the fused executor's weight-only int8, "
                             "one scale per output channel, dualfuse.quantize)")
    parser.add_argument("--dtype", default=None, choices=["fp16", "bf16", "fp32"],
                        help="activation dtype (default fp16 on CUDA, fp32 on CPU)")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if present)")
    parser.add_argument("--top-k", type=int, default=3, dest="top_k", help="labels kept per frame (default 3)")
    parser.add_argument("--warmup", type=int, default=3, help="synthetic frames run before timing (default 3)")
    parser.add_argument("--max-frames", type=int, default=None, dest="max_frames", help="stop a video after N frames")
    parser.add_argument("--sms", type=int, default=None, metavar="N",
                        help="run inside a CUDA green context of N SMs (own process; SMs only, not bandwidth)")
    parser.add_argument("--out", default=None, metavar="DIR", help="write the latency-over-time PNG here")
    parser.add_argument("--json", default=None, metavar="PATH", help="write per-frame records and the summary here")
    from .bench import add_stand_in_arguments

    add_stand_in_arguments(parser)
    parser.add_argument("--_in-green-context", dest="_in_green_context", type=int, help=argparse.SUPPRESS)


def _child_argv(argv: list[str], n: int) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--sms":
            skip = True
            continue
        if a.startswith("--sms="):
            continue
        out.append(a)
    return out + ["--_in-green-context", str(n)]


def run(args) -> int:

    from .bench import stand_in_config

    try:
        stand_cfg = stand_in_config(args)
    except ValueError as e:
        return fail("stream", str(e))
    if stand_cfg is not None:
        from ..standin import StandInError, check

        try:
            if args.sms is not None:
                raise StandInError("--stand-in sets the SM count itself (the target's): drop --sms")
            check(stand_cfg)  # no CUDA / an SM count the card cannot give: exit 2 before anything runs
        except StandInError as e:
            return fail("stream", str(e))

    if args.sms is not None and args._in_green_context is None:
        # a green context must exist before anything touches CUDA: run the loop in a process of its own
        from .. import green

        dev = str(args.device or "cuda")
        if not dev.startswith("cuda") and not os.environ.get(green.FAKE_ENV):
            raise ValueError(f"--sms needs a CUDA device, got --device {dev}")
        green.validate([args.sms], int(dev.split(":", 1)[1]) if ":" in dev else 0)
        argv = list(getattr(args, "_argv", None) or [])
        if argv and argv[0] == "stream":
            argv = argv[1:]
        print(f"── {args.sms} SMs {green.JETSON_EQUIVALENTS.get(args.sms, '')} (own process; {green.NOT_EMULATED}) ──",
              flush=True)
        return subprocess.run([sys.executable, "-m", "dualfuse.cli", "stream"] + _child_argv(argv, args.sms)).returncode

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from ..executors.base import resolve_dtype

    console = Console()
    total = args.synthetic if args.synthetic is not None else args.max_frames
    dtype = resolve_dtype(args.dtype) if args.dtype else None
    with Progress(TextColumn("[bold]stream"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[label]}"), console=console, transient=True) as bar:
        task = bar.add_task("frames", total=total, label="")

        def progress(rec: FrameRecord):
            bar.update(task, advance=1, label=f"{rec.label} ({rec.score:.2f}) {rec.total_ms:.1f} ms")

        result = run_stream(args.model, args.prompts, video=args.video, synthetic=args.synthetic,
                            executor=args.executor, weights=args.weights, dtype=dtype, device=args.device,
                            top_k=args.top_k, warmup=args.warmup, max_frames=args.max_frames,
                            sms=args._in_green_context, out_dir=args.out, progress=progress, stand_in=stand_cfg)
    s = result.summary()
    table = Table(title=f"{result.model} · {result.executor} · {result.weights} weights · {result.dtype} activations · "
                        f"{result.card}{f' · {result.sms} SMs' if result.sms else ''} — {s['frames']} frames, "
                        f"{s['fps']:.1f} FPS")
    for col in ("part", "p50 ms", "p99 ms", "mean ms"):
        table.add_column(col, justify="left" if col == "part" else "right")
    for part in PARTS + ("total",):
        table.add_row(part, f"{s[part]['p50_ms']:.3f}", f"{s[part]['p99_ms']:.3f}", f"{s[part]['mean_ms']:.3f}")
    console.print(table)
    console.print(f"text embeddings of {len(result.prompts)} prompts: {result.text_ms:.2f} ms, once")
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(s["top1_counts"].items(), key=lambda kv: -kv[1]))
    console.print(f"top-1 labels: {counts}")
    for n in result.notes:
        console.print(f"note: {n}")
    if result.plot:
        console.print(f"latency over time: {result.plot}")
    if args.json:
        write_json(args.json, result.to_dict())
        console.print(f"per-frame records written to {args.json}")
    return 0

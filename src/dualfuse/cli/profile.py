"""`dualfuse profile`: show where GPU time goes: per tower, layer and kernel; timeline, roofline, Perfetto trace

The command line of :func:`dualfuse.profile.run_profile`: parses the flags, reports each executor's verdict on
stderr as it finishes, writes the report folder and prints its files.
"""
from __future__ import annotations

import argparse
import sys

from .. import profile as P
from ..profile import CPU_WARMUP, GPU_WARMUP
from ..util import Progress, slug
from . import fail, user_command

DESCRIPTION = P.__doc__


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="clip-vit-b-32", metavar="NAME|PATH",
                   help="preset name, open_clip:ARCH, HF model directory or open_clip checkpoint (default clip-vit-b-32)")
    p.add_argument("--arch", help="open_clip architecture of a checkpoint file given as --model (e.g. ViT-B-32)")
    p.add_argument("--executor", default="eager", help="executor to profile (default eager)")
    p.add_argument("--compare", metavar="A,B", help="profile these executors and write one side-by-side report")
    p.add_argument("--batch", type=int, default=1, help="image and text batch (default 1)")
    p.add_argument("--image-batch", type=int, help="image batch (default --batch; 0 = text tower only)")
    p.add_argument("--text-batch", type=int, help="text batch (default --batch; 0 = image tower only)")
    p.add_argument("--text-length", dest="text_length", type=int,
                   help="tokens per prompt (default the model's context length)")
    p.add_argument("--text-len", dest="text_length", type=int, help=argparse.SUPPRESS)  # old name, deprecated
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="default fp16 on CUDA, fp32 on CPU")
    p.add_argument("--device", help="default cuda if available, else cpu")
    p.add_argument("--iters", type=int, default=3, help="profiled forwards (default 3)")
    p.add_argument("--warmup", type=int, help=f"warm-up forwards (default {GPU_WARMUP} on CUDA, {CPU_WARMUP} on CPU)")
    p.add_argument("--latency-runs", type=int, help="unprofiled calls timed for the latency line "
                                                    "(default 20 on CUDA, 2 on CPU; 0 = skip)")
    p.add_argument("--out", metavar="DIR", help="output folder (default profile-<model>-<executor>)")
    p.add_argument("--top", type=int, default=10, help="kernels in the top-kernels table (default 10)")
    p.add_argument("--nvtx", action="store_true", help="NVTX ranges per tower/layer/op (for nsys profile)")
    p.add_argument("--ncu", action="store_true",
                   help="run Nsight Compute on the top kernels: achieved occupancy, SM and DRAM throughput")
    p.add_argument("--ncu-kernels", type=int, default=5, help="how many top kernels --ncu profiles (default 5)")
    p.add_argument("--no-ceilings", action="store_true",
                   help="do not measure bandwidth/matmul ceilings (use the cache if any; else no roofline tags)")
    p.add_argument("--seed", type=int, default=0, help="weights and inputs seed (default 0)")
    from .bench import add_stand_in_arguments

    add_stand_in_arguments(p)



def run(args) -> int:
    from ..executors.base import ExecutorUnavailable

    names = [n.strip() for n in (args.compare.split(",") if args.compare else [args.executor]) if n.strip()]
    if args.compare and len(names) < 2:
        return fail("profile", f"--compare needs two executors, e.g. --compare eager,fused (got {args.compare!r})")
    from ..standin import StandInError, check
    from .bench import stand_in_config

    try:
        stand_cfg = stand_in_config(args)
        if stand_cfg is not None:
            check(stand_cfg)
    except StandInError as e:
        return fail("profile", str(e))
    try:
        result = P.run_profile(
            args.model, names, arch=args.arch, batch=args.batch, image_batch=args.image_batch,
            text_batch=args.text_batch, text_len=args.text_length, dtype=args.dtype, device=args.device,
            iters=args.iters, warmup=args.warmup, latency_runs=args.latency_runs, nvtx=args.nvtx,
            measure_ceilings=not args.no_ceilings, top=args.top, seed=args.seed, ncu=args.ncu,
            ncu_kernels=args.ncu_kernels, command=user_command(getattr(args, "_argv", None), "profile"),
            progress=_Log(), stand_in=stand_cfg)
    except (ValueError, OSError, ExecutorUnavailable) as e:
        return fail("profile", str(e))
    for r in result.profiles[:1]:
        info = r.data.get("stand_in")
        if info:
            from .bench import stand_in_lines
            for line in stand_in_lines(info):
                print(line)
    files = result.write(args.out or f"profile-{slug(args.model, keep='_.')}-{'-vs-'.join(names)}")
    print(f"report: {files['report']}")
    for k, v in files.items():
        if k != "report":
            print(f"  {k}: {v}")
    return 0


class _Log(Progress):
    """One line on stderr when an executor starts and one (its verdict) when it is done."""

    def start(self, result) -> None:
        self.result = result
        if result.fused_config is not None:
            print(f"fused config: {result.fused_config.describe()}", file=sys.stderr)

    def begin(self, name, total=None) -> None:
        print(f"profiling {name} on {self.result.model} ({self.result.device}) ...", file=sys.stderr)

    def end(self, name, profile) -> None:
        if profile.data.get("ncu"):
            print(f"ncu: {profile.data['ncu']['message']}", file=sys.stderr)
        print(f"{name}: {profile.verdict}", file=sys.stderr)

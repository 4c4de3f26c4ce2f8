"""`dualfuse bench`: every executor on one model, side by side in one process, same inputs, one table.

The command line of :func:`dualfuse.bench.run_bench`: parses the flags, prints the header, progress bars and the
table, writes ``--json``. ``--sms`` runs one child process of this command per SM count, each inside a CUDA green
context (dualfuse.green), and merges their JSON.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

from .. import bench
from ..bench import COSINE_PASS, CPU_ITERS, CPU_WARMUP, DEFAULT_MODEL, GPU_ITERS, GPU_WARMUP
from ..util import Progress, write_json
from . import fail, user_command

DESCRIPTION = bench.__doc__
SWEEP_COMMAND_ENV = "DUALFUSE_SWEEP_COMMAND"  # set by the `bench --sms` parent for its children


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .. import executors

    p.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME|PATH",
                   help=f"preset name, open_clip:ARCH, HF model directory or open_clip checkpoint (default {DEFAULT_MODEL})")
    p.add_argument("--arch", help="open_clip architecture of a checkpoint file given as --model (e.g. ViT-B-32)")
    p.add_argument("--batch", type=int, default=1, help="image and text batch (default 1)")
    p.add_argument("--image-batch", type=int, help="image batch (default --batch; 0 = text tower only)")
    p.add_argument("--text-batch", type=int, help="text batch (default --batch; 0 = image tower only)")
    p.add_argument("--text-length", type=int, help="tokens per prompt (default the model's context length)")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="default fp16 on CUDA, fp32 on CPU")
    p.add_argument("--device", help="default cuda if available, else cpu")
    p.add_argument("--executors", "--executor", dest="executors", metavar="A,B,C",
                   help=f"comma-separated executors (default: {', '.join(executors.default_names())}; "
                        f"also: {', '.join(n for n in executors.names() if n not in executors.default_names()) or '—'})")
    p.add_argument("--iters", type=int, help=f"timed runs (default {GPU_ITERS} on CUDA, {CPU_ITERS} on CPU)")
    p.add_argument("--warmup", type=int, help=f"warm-up runs (default {GPU_WARMUP} on CUDA, {CPU_WARMUP} on CPU)")
    p.add_argument("--input-sets", type=int, default=4, help="distinct input sets rotated through (default 4)")
    p.add_argument("--seed", type=int, default=0, help="weights and inputs seed (default 0)")
    p.add_argument("--json", metavar="PATH", help="write machine-readable results here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    # ---- SM-limited runs and energy (dualfuse.green, dualfuse.energy; docs/evaluation.md)
    p.add_argument("--sms", metavar="N[,N...]",
                   help="time inside CUDA green contexts of N SMs, one process per count ('full' = whole GPU); "
                        "8 ≈ Jetson Orin Nano, 16 ≈ AGX Orin; Hopper allocates multiples of 8. Limits SMs only: "
                        "memory bandwidth and clocks stay the big card's")
    p.add_argument("--energy", action="store_true",
                   help="measure energy (NVML energy counter / power, Jetson rails): J/inference and images/s/W")
    p.add_argument("--energy-seconds", type=float, default=2.0,
                   help="length of the energy loop per executor (default 2 s)")
    p.add_argument("--weights", choices=["fp16", "int8", "fp8"], default=None,
                   help="weights of the fused executor: fp16 (default: the --dtype, unquantized), int8 or fp8 "
                        "(weight-only, one scale per output channel; fp8 needs compute capability >= 8.9); "
                        "its parity check then uses the quantized criterion")
    add_stand_in_arguments(p)
    p.add_argument("--_in-green-context", dest="_in_green_context", type=int, help=argparse.SUPPRESS)


def add_stand_in_arguments(p: argparse.ArgumentParser) -> None:
    """--stand-in / --stand-in-activations (dualfuse.standin), shared by bench, stream and profile."""
    from ..standin import ACTIVATIONS, STAND_INS

    p.add_argument("--stand-in", dest="stand_in", metavar="TARGET",
                   help=f"edge-regime stand-in for a Jetson ({', '.join(STAND_INS)}): the target's SMs in a green "
                        "context and every executor's weights in pinned host memory read over PCIe (zero-copy), "
                        "the bandwidth measured first; not the device itself (docs/edge-regime.md)")
    p.add_argument("--stand-in-activations", dest="stand_in_activations", choices=ACTIVATIONS, default="device",
                   help="with --stand-in: where the inputs live (default device: HBM; host: pinned host memory too)")


def stand_in_config(args):
    """The StandInConfig of --stand-in (None without it); StandInError (a ValueError) for bad values."""
    from ..standin import StandInConfig

    if not getattr(args, "stand_in", None):
        return None
    return StandInConfig(args.stand_in, activations=getattr(args, "stand_in_activations", "device"))


def enter_stand_in(command: str, args):
    """Validate --stand-in and enter its green context (before anything touches CUDA): (config, green info) or
    an int exit code (2, the error printed)."""
    from ..standin import StandInError, enter

    try:
        cfg = stand_in_config(args)
        if cfg is None:
            return None, None
        if getattr(args, "sms", None) or getattr(args, "_in_green_context", None) is not None:
            raise StandInError("--stand-in sets the SM count itself (the target's): drop --sms")
        return cfg, enter(cfg)
    except (StandInError, RuntimeError) as e:
        return fail(command, str(e))


def run(args: argparse.Namespace) -> int:
    stand = enter_stand_in("bench", args)
    if isinstance(stand, int):
        return stand
    stand_cfg, green_info = stand
    if stand_cfg is None and getattr(args, "sms", None) and getattr(args, "_in_green_context", None) is None:
        return _sweep(args)
    if getattr(args, "_in_green_context", None) is not None:
        # a `--sms` child: enter the green context before anything touches CUDA
        from ..green import enter

        dev = str(getattr(args, "device", None) or "cuda")
        try:
            green_info = enter(int(args._in_green_context), int(dev.split(":", 1)[1]) if ":" in dev else 0)
        except (ValueError, RuntimeError) as e:
            return fail("bench", str(e))
    from ..executors.base import ExecutorUnavailable

    out, progress = _consoles(args)
    try:
        result = bench.run_bench(
            args.model, executors=args.executors.split(",") if args.executors else None, arch=args.arch,
            batch=args.batch, image_batch=args.image_batch, text_batch=args.text_batch,
            text_length=args.text_length, dtype=args.dtype, device=args.device, iters=args.iters,
            warmup=args.warmup, input_sets=args.input_sets, seed=args.seed, energy=getattr(args, "energy", False),
            energy_seconds=args.energy_seconds, green_context=green_info, weights=getattr(args, "weights", None),
            stand_in=stand_cfg, progress=progress)
    except (ValueError, ExecutorUnavailable) as e:
        return fail("bench", str(e))
    finally:
        progress.close()
    print_table(out, result.rows, result.best_stock, result.cuda, result.iters, result.warmup, result.input_sets,
                energy=result.energy_meter is not None, quantized_cosine=result.quantized_cosine_pass,
                weights=result.weights, stand_in=result.stand_in)
    if args.json:
        result.command, result.args = _recorded_command(args), _recorded_args(args)
        write_json(args.json, result.to_dict())
        out.print(f"results written to {args.json}")
    return 1 if result.failed else 0


class _RichProgress(Progress):
    """The header on stdout once the run is set up; a progress bar per executor on stderr (gone when done)."""

    def __init__(self, out, err, enabled: bool):
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as Bars

        self.out = out
        self.bars = Bars(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                         console=err, transient=True, disable=not enabled)
        self.tasks: dict = {}

    def start(self, result) -> None:
        print_header(self.out, result)
        self.bars.start()

    def begin(self, name, total=None) -> None:
        self.tasks[name] = self.bars.add_task(name, total=total)

    def phase(self, name, text) -> None:
        self.bars.update(self.tasks[name], description=f"{name}: {text}")

    def advance(self, name) -> None:
        self.bars.advance(self.tasks[name])

    def end(self, name, row) -> None:
        self.bars.remove_task(self.tasks.pop(name))

    def close(self) -> None:
        self.bars.stop()


def _consoles(args):
    from rich.console import Console

    # Not a terminal (a pipe, a log file, CI): a fixed width wide enough that the table does not wrap.
    out = Console(width=None if sys.stdout.isatty() else 120)
    return out, _RichProgress(out, Console(stderr=True), enabled=not args.no_progress)


def print_header(out, result) -> None:
    v, t = result.summary["vision"], result.summary["text"]
    bi, bt = result.image_batch, result.text_batch
    shape = (f"image {bi}×{v['channels']}×{v['image_size']}² ({v['seq_len']} tokens)" if bi else "no images") + \
        " + " + (f"text {bt}×{result.text_length} tokens" if bt else "no text")
    towers = ", ".join(f"{name} {s['layers']}×{s['width']}" for name, s in (("vision", v), ("text", t)) if s)
    if not (v and t):
        towers += " tower alone"
    out.print(f"[bold]dualfuse bench[/] {result.model} ({result.family}; {towers}) · {result.dtype}"
              f"{f' (fused: {result.weights} weights)' if result.weights != 'fp16' else ''} · "
              f"{result.environment['card']}", highlight=False)
    out.print(f"inputs: {shape}", highlight=False)
    out.print(f"fused config: {result.fused_config.describe()}", highlight=False)
    green = result.green_context
    if green:
        out.print(f"green context: {green['sms']} SMs {green.get('equivalent', '')}"
                  f"{' (FAKE: test mode)' if green.get('fake') else ''}; {green['not_emulated']}", highlight=False)
    if result.energy_line:
        out.print(result.energy_line, highlight=False)
    for line in stand_in_lines(result.stand_in):
        out.print(line, highlight=False)


def stand_in_lines(info: dict | None) -> list[str]:
    """What a stand-in run prints about itself: target, SMs, its measured weight bandwidth, what it is not."""
    if not info:
        return []
    host = ", ".join(f"{p['reader']} {p['gbps']:.1f}" for p in info.get("probe", []) if p["memory"] == "host")
    return [f"stand-in for {info['target']} ({info['sms']} SMs, green context): weights host-mapped, measured "
            f"weight bandwidth {info['measured_bandwidth_gbps']:.1f} GB/s ({host}; the target's: "
            f"{info['target_bandwidth_gbps']:.0f} GB/s); inputs in {'host memory' if info['activations'] == 'host' else 'HBM'}",
            f"note: {info['is_not']}"]


# --------------------------------------------------------------------------------------------- --sms

def _sweep(args) -> int:
    """The ``--sms`` parent: validate, run one child per SM count, merge, summarize."""
    from .. import green

    try:
        sms = green.parse_sms(args.sms)
        dev = str(getattr(args, "device", None) or "cuda")
        if not dev.startswith("cuda") and not os.environ.get(green.FAKE_ENV):
            raise ValueError(f"--sms needs a CUDA device, got --device {dev}")
        green.validate(sms, int(dev.split(":", 1)[1]) if ":" in dev else 0)
    except ValueError as e:
        return fail("bench", str(e))
    argv = list(getattr(args, "_argv", None) or [])
    if argv and argv[0] == "bench":
        argv = argv[1:]
    old = os.environ.get(SWEEP_COMMAND_ENV)
    os.environ[SWEEP_COMMAND_ENV] = user_command(getattr(args, "_argv", None), "bench")  # the children record it
    try:
        rc, merged = green.run_sweep(argv, sms, getattr(args, "json", None))
    finally:
        if old is None:
            os.environ.pop(SWEEP_COMMAND_ENV, None)
        else:
            os.environ[SWEEP_COMMAND_ENV] = old
    print()
    print("median ms per SM count (each in its own process):")
    for line in green.summary_lines(merged):
        print("  " + line)
    print(f"note: {green.NOT_EMULATED}")
    if getattr(args, "json", None):
        print(f"merged results written to {args.json}")
    return rc


def _in_sweep_child(args) -> bool:
    return getattr(args, "_in_green_context", None) is not None or bool(os.environ.get(SWEEP_COMMAND_ENV))


def _recorded_command(args) -> str:
    """The command the user typed: private flags dropped; in an ``--sms`` child process, the parent's command
    (the child's own has a temporary --json path and a private flag)."""
    parent = os.environ.get(SWEEP_COMMAND_ENV)
    if parent and _in_sweep_child(args):
        return parent
    return user_command(getattr(args, "_argv", None), "bench")


def _recorded_args(args) -> dict:
    out = {k: val for k, val in vars(args).items() if not k.startswith("_")}
    if _in_sweep_child(args):
        out.pop("json", None)  # a temporary file of the parent's, not the user's
    return out


# --------------------------------------------------------------------------------------------- the table

def _fmt(x, spec="{:.3f}", none="—"):
    return none if x is None or (isinstance(x, float) and math.isnan(x)) else spec.format(x)


def _speedup(x) -> str:
    """A speedup with 2 decimals, or 2 significant digits below 0.1 (an interpreter run is 0.00064×, not 0.00×)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.2f}×" if x >= 0.1 else f"{x:.2g}×"


def print_table(console, rows, best, cuda, iters, warmup, sets, energy: bool = False,
                quantized_cosine: float | None = None, weights: str = "fp16", stand_in: dict | None = None):
    from rich.table import Table

    table = Table(show_edge=False, header_style="bold")
    table.add_column("executor")
    table.add_column("median ms", justify="right")
    table.add_column("p90 ms", justify="right")
    table.add_column("speedup vs eager ×", justify="right")
    table.add_column("speedup vs best stock ×", justify="right")
    table.add_column("min cos", justify="right")
    if stand_in:
        table.add_column("weight MB", justify="right")
        table.add_column("share of stand-in floor", justify="right")
    if energy:
        table.add_column("J/inf", justify="right")
        table.add_column("img/s/W", justify="right")
    table.add_column("notes", overflow="fold")
    for r in rows:
        extra = [_fmt(r.joules_per_inference, "{:.4g}"), _fmt(r.images_per_s_per_w, "{:.3g}")] if energy else []
        if stand_in:
            extra = [_fmt(r.weight_bytes / 1e6 if r.weight_bytes else None, "{:.1f}"),
                     _fmt(r.standin_share, "{:.0%}")] + extra
        name = r.executor + ("" if r.stock else " †")
        if r.status != "ok":
            style = "yellow" if r.status in ("needs CUDA", "unavailable") else "red"
            note = "needs CUDA" if r.status == "needs CUDA" else f"{r.status}: {r.message}"
            table.add_row(name, "—", "—", "—", "—", "—", *(["—", "—"] if stand_in else []),
                          *(["—", "—"] if energy else []), f"[{style}]{note}[/]")
            continue
        cos = _fmt(r.min_cosine, "{:.6f}")
        if r.cosine_ok is False:
            cos = f"[red]{cos} WRONG[/]"
        table.add_row(name, _fmt(r.median_ms), _fmt(r.p90_ms), _speedup(r.speedup_vs_eager),
                      _speedup(r.speedup_vs_best_stock), cos, *extra, r.notes)
    console.print(table)
    timer = "CUDA events, synchronized per call" if cuda else "perf_counter (CPU: a smoke test, not a figure)"
    lines = [f"median/p90 of {iters} runs after {warmup} warm-up · {sets} input sets rotated · timer: {timer}",
             "speedup × = baseline median / this median, bigger is better; baselines: eager, and the best stock "
             f"executor of this run (here: {best.executor if best else '—'}) · † = not stock",
             f"min cos = lowest per-embedding cosine vs the fp32 reference forward (pass ≥ {COSINE_PASS}"
             + (f"; fused with {weights} weights: ≥ {quantized_cosine}" if quantized_cosine is not None else "")
             + ")"]
    if stand_in:
        lines.append(f"share of stand-in floor = (weight bytes / {stand_in['measured_bandwidth_gbps']:.1f} GB/s, the "
                     f"measured host-mapped bandwidth) / median; {stand_in['is_not']}")
    for line in lines:
        console.print(line, style="dim", highlight=False)

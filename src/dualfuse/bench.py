"""`dualfuse bench`: every executor on one model, side by side in one process, same inputs, one table.

Protocol (see BENCHMARKS.md): build the model (a preset has the real architecture with seeded random weights;
nothing is downloaded), generate a few input sets once, and for each executor in turn: build it, check its
output on input set 0 against the fp32 reference forward (reference.py; per-embedding cosine), warm up, then
time ``iters`` calls of ``encode`` rotating over the input sets. On CUDA each call is timed with CUDA events
and the device is synchronized after every call (per-call latency); on CPU with ``time.perf_counter``.
Defaults: 100 timed runs after 10 warm-up runs on CUDA; 10 after 2 on CPU (CPU runs are slow and only a smoke
test of the pipeline). An executor that cannot run here gets a row saying why ("needs CUDA"); one that fails
gets a row with its error; the others still run. Ratios are speedups, baseline median / this median (bigger is
better), against eager and against the fastest stock executor of the same run (JSON: ``speedup_vs_eager``,
``speedup_vs_best_stock``; files written before the latter stored ``time_vs_best_stock``, the inverse).

Reusable pieces: :func:`random_inputs`, :func:`time_calls`, :func:`stats`, :func:`cosine_check`,
:func:`environment`.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

DEFAULT_MODEL = "clip-vit-b-32"
COSINE_PASS = 0.999  # parity criterion (stated in the README): per-embedding cosine >= 0.999 vs the fp32 reference
GPU_ITERS, GPU_WARMUP = 100, 10
CPU_ITERS, CPU_WARMUP = 10, 2


# --------------------------------------------------------------------------------------------- inputs

def random_inputs(io, image_batch: int, text_batch: int, text_length: int | None = None, *, sets: int = 4,
                  seed: int = 0, device="cpu", dtype=torch.float32):
    """``sets`` pairs ``(pixel_values [Bi, C, H, W] or None, input_ids [Bt, L] or None)``, deterministic in ``seed``.

    ``io``: the model's ModelIO (or its DualEncoderSpec). Pixels are standard normal (like normalized images);
    SigLIP2 NaFlex models get a PatchSequence of the native patch grid (no padding). Token ids look like
    tokenizer output: random ids, then the pooled token (the EOS id for first-EOS pooling, the largest id for
    argmax pooling) at a random position, zero padding after it. A batch of 0 gives None for that tower.
    """
    from .spec import DualEncoderSpec, PatchSequence

    if isinstance(io, DualEncoderSpec):
        io = io.io
    length = io.context_length if text_length is None else text_length
    vocab = io.vocab_size
    if io.text_pooling == "first_eos":
        eos = io.eos_token_id
    elif io.text_pooling == "argmax":
        eos = vocab - 1
    else:
        eos = None
    out = []
    for k in range(sets):
        g = torch.Generator().manual_seed(seed * 1000 + k)
        px = ids = None
        if image_batch and io.naflex:
            grid = io.image_size // io.patch_size
            n, dim = grid * grid, io.channels * io.patch_size ** 2
            patches = torch.randn(image_batch, n, dim, generator=g).to(device=device, dtype=dtype)
            px = PatchSequence(patches, torch.tensor([[grid, grid]] * image_batch, device=device),
                               torch.ones(image_batch, n, dtype=torch.int32, device=device))
        elif image_batch:
            px = torch.randn(image_batch, io.channels, io.image_size, io.image_size, generator=g)
            px = px.to(device=device, dtype=dtype)
        if text_batch:
            ids = torch.randint(1, max(vocab - 1, 2), (text_batch, length), generator=g)
            if eos is not None:
                pos = torch.randint(min(2, length - 1), length, (text_batch,), generator=g)
                for i, p in enumerate(pos.tolist()):
                    ids[i, p] = eos
                    ids[i, p + 1:] = 0
            ids = ids.to(device)
        out.append((px, ids))
    return out


# --------------------------------------------------------------------------------------------- timing

def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, iters: int, device, *, on_step=None) -> list[float]:
    """Call ``fn(i)`` for i in range(iters); per-call milliseconds.

    CUDA: events recorded around each call on the current stream, device synchronized after each call (the GPU
    starts every call idle; the time includes launch overhead the GPU waits for). CPU: time.perf_counter.
    """
    device = torch.device(device)
    samples = []
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        torch.cuda.synchronize(device)
        for i in range(iters):
            starts[i].record()
            fn(i)
            ends[i].record()
            ends[i].synchronize()
            if on_step:
                on_step()
        samples = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for i in range(iters):
            t0 = time.perf_counter()
            fn(i)
            samples.append((time.perf_counter() - t0) * 1e3)
            if on_step:
                on_step()
    return samples


def _percentile(sorted_xs: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not sorted_xs:
        return float("nan")
    pos = (len(sorted_xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def stats(samples: list[float]) -> dict:
    xs = sorted(samples)
    return dict(median_ms=_percentile(xs, 50), p90_ms=_percentile(xs, 90),
                mean_ms=sum(xs) / len(xs) if xs else float("nan"), min_ms=xs[0] if xs else float("nan"),
                max_ms=xs[-1] if xs else float("nan"), runs=len(xs))


# --------------------------------------------------------------------------------------------- correctness

def cosine_check(outputs, references, min_cosine: float = COSINE_PASS) -> dict:
    """Per-embedding cosine and relative error of each tower's output vs the reference (both [B, E]); cosine_ok:
    the lowest cosine >= min_cosine (quantized weights: dualfuse.quantize.COSINE_MIN)."""
    cos, rel = [], []
    for out, ref in zip(outputs, references):
        if ref is None:
            continue
        if out is None or tuple(out.shape) != tuple(ref.shape):
            raise ValueError(f"output shape {None if out is None else list(out.shape)} != reference {list(ref.shape)}")
        o, r = out.detach().double().cpu(), ref.detach().double().cpu()
        cos.append(torch.nn.functional.cosine_similarity(o, r, dim=-1).min().item())
        rel.append(((o - r).norm() / r.norm()).item())
    min_cos = min(cos)
    if math.isnan(min_cos) or any(math.isnan(x) for x in cos):
        min_cos = float("nan")
    return dict(min_cosine=min_cos, max_rel_err=max(rel), cosine_ok=bool(min_cos >= min_cosine))


# --------------------------------------------------------------------------------------------- environment

def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(mod)
    except Exception:  # noqa: BLE001
        return None


def environment(device: torch.device) -> dict:
    """Card name and kind (H100/H200/...), software versions, host, date: what a benchmark figure needs."""
    env = dict(date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               torch=torch.__version__, triton=_version("triton"), transformers=_version("transformers"),
               open_clip=_version("open_clip_torch"), dualfuse=_version("dualfuse"), python=platform.python_version(),
               host=platform.node(), cpu=_cpu_name(), cpu_count=os.cpu_count(), device=str(device))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = torch.cuda.get_device_name(device)
        env.update(card=name, card_kind=next((k for k in ("H200", "H100", "A100", "L4", "L40S") if k in name), name),
                   sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    else:
        env.update(card=f"CPU: {env['cpu']}", card_kind="cpu", cuda=None)
    return env


# --------------------------------------------------------------------------------------------- the run

@dataclass
class Row:
    executor: str
    status: str = "ok"  # ok | needs CUDA | unavailable | error
    message: str = ""
    stock: bool = True
    notes: str = ""
    build_s: float | None = None
    first_call_s: float | None = None
    median_ms: float | None = None
    p90_ms: float | None = None
    mean_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    runs: int = 0
    samples_ms: list = field(default_factory=list)
    min_cosine: float | None = None
    max_rel_err: float | None = None
    cosine_ok: bool | None = None
    # speedups (bigger is better): baseline median / this median, within this run
    speedup_vs_eager: float | None = None
    speedup_vs_best_stock: float | None = None
    # --energy (dualfuse.energy): whole-board energy over a loop of the timed calls; details in `energy`
    joules_per_inference: float | None = None
    images_per_s_per_w: float | None = None
    energy: dict | None = None


def add_speedups(rows: list[Row]) -> tuple[Row | None, Row | None]:
    """Fill each ok row's speedups, baseline median / this median (bigger is better): vs eager and vs the fastest
    stock executor of the same run. Returns (the eager row, the best stock row), None where there is none."""
    eager = next((r for r in rows if r.executor == "eager" and r.status == "ok"), None)
    stock_ok = [r for r in rows if r.status == "ok" and r.stock]
    best = min(stock_ok, key=lambda r: r.median_ms) if stock_ok else None
    for r in rows:
        if r.status != "ok":
            continue
        if eager:
            r.speedup_vs_eager = eager.median_ms / r.median_ms
        if best:
            r.speedup_vs_best_stock = best.median_ms / r.median_ms
    return eager, best


def add_arguments(p: argparse.ArgumentParser) -> None:
    from . import executors

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
                   help=f"comma-separated executors (default all: {', '.join(executors.names())})")
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
    p.add_argument("--_in-green-context", dest="_in_green_context", type=int, help=argparse.SUPPRESS)


def _err(msg: str) -> int:
    print(f"dualfuse bench: error: {msg}", file=sys.stderr)
    return 2


def _short(e: BaseException, limit: int = 300) -> str:
    msg = f"{type(e).__name__}: {e}".strip().replace("\n", " ")
    return msg if len(msg) <= limit else msg[: limit - 1] + "…"


def run(args: argparse.Namespace) -> int:
    from . import executors, presets, reference
    from .adapters import to_spec
    from .executors.base import ExecutorUnavailable, NeedsCUDA, dtype_name, resolve_device, resolve_dtype

    # ---- SM-limited runs (dualfuse.green): the parent runs one child process per SM count and merges; a child
    # enters its green context here, before anything touches CUDA
    if getattr(args, "sms", None) and getattr(args, "_in_green_context", None) is None:
        from .cli import user_command
        from .green import sweep_from_args
        old = os.environ.get(SWEEP_COMMAND_ENV)
        os.environ[SWEEP_COMMAND_ENV] = user_command(getattr(args, "_argv", None), "bench")  # the children record it
        try:
            return sweep_from_args(args)
        finally:
            if old is None:
                os.environ.pop(SWEEP_COMMAND_ENV, None)
            else:
                os.environ[SWEEP_COMMAND_ENV] = old
    green_info = None
    if getattr(args, "_in_green_context", None) is not None:
        from .green import enter_from_args
        try:
            green_info = enter_from_args(args)
        except (ValueError, RuntimeError) as e:
            return _err(str(e))

    # ---- arguments
    try:
        device = resolve_device(args.device)
    except (ValueError, ExecutorUnavailable) as e:
        return _err(str(e))
    dtype = resolve_dtype(args.dtype, device)
    cuda = device.type == "cuda"
    iters = args.iters if args.iters is not None else (GPU_ITERS if cuda else CPU_ITERS)
    warmup = args.warmup if args.warmup is not None else (GPU_WARMUP if cuda else CPU_WARMUP)
    bi = args.image_batch if args.image_batch is not None else args.batch
    bt = args.text_batch if args.text_batch is not None else args.batch
    if iters < 1 or warmup < 0 or args.input_sets < 1:
        return _err(f"need --iters >= 1, --warmup >= 0, --input-sets >= 1 (got {iters}, {warmup}, {args.input_sets})")
    if bi < 0 or bt < 0 or (bi == 0 and bt == 0):
        return _err(f"batches must be >= 0 and not both 0 (got image {bi}, text {bt})")
    known = executors.names()
    if args.executors:
        wanted = [n.strip() for n in args.executors.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in known]
        if unknown or not wanted:
            return _err(f"unknown executor(s): {', '.join(unknown) or '(none given)'}; known executors: {', '.join(known)}")
    else:
        wanted = known

    # ---- model, inputs, reference
    try:
        model = presets.load(args.model, seed=args.seed, arch=args.arch)
    except ValueError as e:
        return _err(str(e))
    spec = to_spec(model)
    length = args.text_length if args.text_length is not None else spec.text.context_length
    if bt and not 1 <= length <= spec.text.context_length:
        return _err(f"--text-length must be in [1, {spec.text.context_length}] for {args.model}, got {length}")
    inputs = random_inputs(spec, bi, bt, length, sets=args.input_sets, seed=args.seed, device=device, dtype=dtype)
    env = environment(device)
    ref_spec = spec.to(device=device, dtype=torch.float32)
    with torch.no_grad():
        px0, ids0 = inputs[0]
        refs = (reference.encode_image(ref_spec, px0.float()) if bi else None,
                reference.encode_text(ref_spec, ids0) if bt else None)
    del ref_spec

    def call(ex, i):
        px, ids = inputs[i % len(inputs)]
        if bi and bt:
            return ex.encode(px, ids)
        if bi:
            return ex.encode_image(px), None
        return None, ex.encode_text(ids)

    # ---- executors, one after the other
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    # Not a terminal (a pipe, a log file, CI): a fixed width wide enough that the table does not wrap.
    out = Console(width=None if sys.stdout.isatty() else 120)
    err_console = Console(stderr=True)
    summary = spec.summary()
    v, t = summary["vision"], summary["text"]
    shape = (f"image {bi}×{v['channels']}×{v['image_size']}² ({v['seq_len']} tokens)" if bi else "no images") + \
        " + " + (f"text {bt}×{length} tokens" if bt else "no text")
    out.print(f"[bold]dualfuse bench[/] {args.model} ({spec.family}; vision {v['layers']}×{v['width']}, "
              f"text {t['layers']}×{t['width']}) · {dtype_name(dtype)} · {env['card']}", highlight=False)
    out.print(f"inputs: {shape}", highlight=False)
    # ---- green context / energy meter (dualfuse.green, dualfuse.energy)
    if green_info:
        out.print(f"green context: {green_info['sms']} SMs {green_info.get('equivalent', '')}"
                  f"{' (FAKE: test mode)' if green_info.get('fake') else ''}; {green_info['not_emulated']}",
                  highlight=False)
    meter = None
    if getattr(args, "energy", False):
        from .energy import bench_meter
        meter, energy_line = bench_meter(device)
        out.print(energy_line, highlight=False)

    rows: list[Row] = []
    progress = Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=err_console, transient=True, disable=args.no_progress)
    with progress:
        for name in wanted:
            row = Row(name)
            rows.append(row)
            task = progress.add_task(f"{name}: build", total=warmup + iters + 1)
            ex = None
            try:
                t0 = time.perf_counter()
                wkw = _weights_kwargs(name, getattr(args, "weights", None))
                ex = executors.get(name, model, dtype=dtype, device=device, spec=spec, **wkw)
                row.build_s = time.perf_counter() - t0
                row.stock, row.notes = bool(getattr(ex, "stock", True)), run_label(getattr(ex, "notes", ""), device)
                progress.update(task, description=f"{name}: first call + check")
                t0 = time.perf_counter()
                with torch.no_grad():
                    outs = call(ex, 0)
                _sync(device)
                row.first_call_s = time.perf_counter() - t0
                for k, val in cosine_check(outs, refs, _min_cosine(wkw)).items():
                    setattr(row, k, val)
                del outs
                progress.advance(task)
                progress.update(task, description=f"{name}: warm-up")
                for i in range(warmup):
                    call(ex, i)
                    progress.advance(task)
                _sync(device)
                progress.update(task, description=f"{name}: timing")
                samples = time_calls(lambda i: call(ex, i), iters, device, on_step=lambda: progress.advance(task))
                row.samples_ms = samples
                for k, val in stats(samples).items():
                    setattr(row, k, val)
                if meter is not None:  # --energy: the same calls again under the meter (dualfuse.energy)
                    from .energy import bench_energy
                    progress.update(task, description=f"{name}: energy")
                    for k, val in bench_energy(lambda i: call(ex, i), meter, device, bi,
                                               seconds=args.energy_seconds).items():
                        setattr(row, k, val)
                row.notes = run_label(getattr(ex, "notes", "") or row.notes, device)
            except NeedsCUDA as e:
                row.status, row.message = "needs CUDA", str(e)
                row.stock = bool(getattr(executors.executor_class(name), "stock", True))
            except ExecutorUnavailable as e:
                row.status, row.message = "unavailable", str(e)
            except Exception as e:  # noqa: BLE001 - one broken executor must not stop the others
                row.status, row.message = "error", _short(e)
            finally:
                progress.remove_task(task)
                del ex
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()

    eager, best = add_speedups(rows)

    _print_table(out, rows, best, cuda, iters, warmup, len(inputs), energy=meter is not None)

    if args.json:
        result = dict(
            schema="dualfuse.bench/1",
            command=_recorded_command(args),
            args=_recorded_args(args),
            resolved=dict(model=args.model, image_batch=bi, text_batch=bt, text_length=length if bt else None,
                          dtype=dtype_name(dtype), device=str(device), iters=iters, warmup=warmup,
                          input_sets=len(inputs), timer="cuda events" if cuda else "perf_counter",
                          cosine_pass=COSINE_PASS, weights=getattr(args, "weights", None) or "fp16"),
            environment=env, card=env["card"], torch=env["torch"], triton=env["triton"], date=env["date"],
            model=summary, eager_median_ms=eager.median_ms if eager else None,
            best_stock=best.executor if best else None,
            sms=green_info["sms"] if green_info else None, green_context=green_info,
            energy_meter=(meter.source if meter is not None else None) if getattr(args, "energy", False) else None,
            results=[asdict(r) for r in rows],
        )
        d = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(d, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
        out.print(f"results written to {args.json}")

    failed = [r for r in rows if r.status == "error" or r.cosine_ok is False]
    return 1 if failed else 0


def _weights_kwargs(name: str, weights: str | None) -> dict:
    """``--weights``: passed to the fused executor (the others run the model's own weights)."""
    return {"weights": weights} if name == "fused" and weights not in (None, "fp16") else {}


def _min_cosine(weights_kwargs: dict) -> float:
    if weights_kwargs:
        from .quantize import COSINE_MIN
        return COSINE_MIN
    return COSINE_PASS


SWEEP_COMMAND_ENV = "DUALFUSE_SWEEP_COMMAND"  # set by the `bench --sms` parent for its children


def _in_sweep_child(args) -> bool:
    return getattr(args, "_in_green_context", None) is not None or bool(os.environ.get(SWEEP_COMMAND_ENV))


def _recorded_command(args) -> str:
    """The command the user typed: private flags dropped; in an ``--sms`` child process, the parent's command
    (the child's own has a temporary --json path and a private flag)."""
    from .cli import user_command

    parent = os.environ.get(SWEEP_COMMAND_ENV)
    if parent and _in_sweep_child(args):
        return parent
    return user_command(getattr(args, "_argv", None), "bench")


def _recorded_args(args) -> dict:
    out = {k: val for k, val in vars(args).items() if not k.startswith("_")}
    if _in_sweep_child(args):
        out.pop("json", None)  # a temporary file of the parent's, not the user's
    return out


def run_label(notes: str, device) -> str:
    """An executor's notes as true for this run: off CUDA the fused Triton launches run in the Triton interpreter
    (on CPU), not in a CUDA graph."""
    notes = notes or ""
    if torch.device(device).type != "cuda" and "CUDA graph" in notes:
        notes = notes.replace("one CUDA graph", "Triton interpreter (CPU)").replace(
            "CUDA graph", "Triton interpreter (CPU)")
    return notes


def _fmt(x, spec="{:.3f}", none="—"):
    return none if x is None or (isinstance(x, float) and math.isnan(x)) else spec.format(x)


def _speedup(x) -> str:
    """A speedup with 2 decimals, or 2 significant digits below 0.1 (an interpreter run is 0.00064×, not 0.00×)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.2f}×" if x >= 0.1 else f"{x:.2g}×"


def _print_table(console, rows, best, cuda, iters, warmup, sets, energy: bool = False):
    from rich.table import Table

    table = Table(show_edge=False, header_style="bold")
    table.add_column("executor")
    table.add_column("median ms", justify="right")
    table.add_column("p90 ms", justify="right")
    table.add_column("speedup vs eager ×", justify="right")
    table.add_column("speedup vs best stock ×", justify="right")
    table.add_column("min cos", justify="right")
    if energy:
        table.add_column("J/inf", justify="right")
        table.add_column("img/s/W", justify="right")
    table.add_column("notes", overflow="fold")
    for r in rows:
        extra = [_fmt(r.joules_per_inference, "{:.4g}"), _fmt(r.images_per_s_per_w, "{:.3g}")] if energy else []
        name = r.executor + ("" if r.stock else " †")
        if r.status != "ok":
            style = "yellow" if r.status in ("needs CUDA", "unavailable") else "red"
            note = "needs CUDA" if r.status == "needs CUDA" else f"{r.status}: {r.message}"
            table.add_row(name, "—", "—", "—", "—", "—", *(["—", "—"] if energy else []), f"[{style}]{note}[/]")
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
             f"min cos = lowest per-embedding cosine vs the fp32 reference forward (pass ≥ {COSINE_PASS})"]
    for line in lines:
        console.print(line, style="dim", highlight=False)

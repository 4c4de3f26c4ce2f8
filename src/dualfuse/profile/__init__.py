"""show where GPU time goes: per tower, layer and kernel; timeline, roofline, Perfetto trace

``dualfuse profile --model NAME|PATH --executor eager|streams|graph|compile|fused --batch N --out DIR`` runs a few
warmed-up forwards under torch.profiler with every kernel labelled by tower, block and op, and writes to DIR:

  report.md      a verdict ("launch-bound: 383 kernels, GPU idle 86% of the wall time; the towers overlap 0%"),
                 then per-tower / per-layer / per-op time, top kernels, op classes (GEMM, attention, norm,
                 elementwise, embed) against the card's measured bandwidth and matmul ceilings (roofline),
                 and kernels launching fewer blocks than the GPU has SMs
  timeline.png   one forward's kernels in a vision lane and a text lane, plus the idle gaps
  roofline.png   one dot per op class under the measured ceilings
  trace.json     the profiler's Chrome trace (open in https://ui.perfetto.dev)
  profile.json   every number of the report, and every kernel, machine-readable

``--compare A,B`` profiles two executors and writes one report side by side. ``--nvtx`` adds NVTX ranges named like
the labels (for ``nsys profile``); ``--ncu`` runs Nsight Compute on the top kernels when it is installed. On CPU the
same report is made of CPU ops (or Triton interpreter runs), without a roofline verdict (no GPU). Python:
``dualfuse.profile.profile("eager", "clip-tiny", device="cpu")``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field

from . import analyze
from .analyze import Event

__all__ = ["ProfileResult", "profile", "compare", "write_compare", "add_arguments", "run", "Event", "analyze"]

SCHEMA = "dualfuse.profile/1"
COMPARE_SCHEMA = "dualfuse.profile.compare/1"
GPU_WARMUP, CPU_WARMUP = 3, 1


@dataclass
class ProfileResult:
    """One profiled executor: ``data`` is what profile.json holds (``data['analysis']`` every table), ``events``
    the kernels (or CPU ops) of every profiled forward, ``trace_path`` the profiler's Chrome trace."""

    data: dict
    events: list[Event] = field(default_factory=list)
    trace_path: str | None = None

    @property
    def verdict(self) -> str:
        return self.data["analysis"]["verdict"]

    @property
    def summary(self) -> dict:
        return self.data["analysis"]["summary"]

    @property
    def analysis(self) -> dict:
        return self.data["analysis"]

    @property
    def executor(self) -> str:
        return self.data["executor"]

    def report(self) -> str:
        from .report import render

        return render(self.data)

    def write(self, out_dir: str, *, plots: bool = True) -> dict:
        """report.md, timeline.png, roofline.png, trace.json and profile.json in ``out_dir``; returns the paths."""
        from . import plot
        from .report import render

        os.makedirs(out_dir, exist_ok=True)
        files = {}
        if self.trace_path and os.path.exists(self.trace_path):
            files["trace"] = os.path.join(out_dir, "trace.json")
            if os.path.abspath(self.trace_path) != os.path.abspath(files["trace"]):
                shutil.copyfile(self.trace_path, files["trace"])
        if plots:
            files["timeline"] = plot.timeline([self.data], os.path.join(out_dir, "timeline.png"))
            files["roofline"] = plot.roofline([self.data], os.path.join(out_dir, "roofline.png"))
        files["profile"] = os.path.join(out_dir, "profile.json")
        files["report"] = os.path.join(out_dir, "report.md")
        self.data["files"] = {k: os.path.basename(v) for k, v in files.items()}
        _dump(self.data, files["profile"])
        with open(files["report"], "w") as f:
            f.write(render(self.data))
        return files


def _dump(data, path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=_json_default)
    os.replace(tmp, path)


def _json_default(x):
    if isinstance(x, set):
        return sorted(x)
    try:
        import torch

        if isinstance(x, (torch.dtype, torch.device)):
            return str(x)
    except ImportError:  # pragma: no cover
        pass
    return str(x)


def _clean(x):
    """NaN/inf -> None so profile.json is strict JSON."""
    if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


# --------------------------------------------------------------------------------------------- Python API

def profile(executor_or_name, model=None, *, batch: int = 1, image_batch: int | None = None,
            text_batch: int | None = None, text_len: int | None = None, dtype=None, device=None, iters: int = 3,
            warmup: int | None = None, nvtx: bool = False, measure_ceilings: bool = True, seed: int = 0,
            top: int = 10, latency_runs: int | None = None, model_name: str | None = None,
            command: str | None = None, **executor_kwargs) -> ProfileResult:
    """Profile one executor.

    ``executor_or_name``: an executor (``dualfuse.executors.get(...)``; ``model``, ``dtype`` and ``device`` are
    then taken from it) or an executor name, built here for ``model`` (a preset name, a local path or an HF /
    open_clip model object; the user's model is never modified or hooked: executors keep private copies).
    ``iters`` forwards are profiled after ``warmup`` (default 3 on CUDA, 1 on CPU); inputs are random
    (``dualfuse.bench.random_inputs``) with ``image_batch``/``text_batch`` (default ``batch``) and ``text_len``
    tokens (default the context length). Returns a :class:`ProfileResult`; ``.write(dir)`` writes the files.
    """
    import torch

    from .. import executors
    from ..bench import environment, random_inputs, run_label
    from ..executors.base import Executor, dtype_name
    from . import capture as cap

    if isinstance(executor_or_name, Executor):
        ex = executor_or_name
        name = ex.name
    else:
        name = str(executor_or_name)
        if model is None:
            raise ValueError("profile(name, model): give the model (preset name, path or model object)")
        if isinstance(model, str):
            from ..presets import load

            model_name = model_name or model
            model = load(model, seed=seed)
        ex = executors.get(name, model, dtype=dtype, device=device, **executor_kwargs)
    model_name = model_name or ex.spec.name or ex.family
    device = ex.device
    cuda = device.type == "cuda"
    bi = batch if image_batch is None else image_batch
    bt = batch if text_batch is None else text_batch
    if bi < 0 or bt < 0 or bi + bt == 0:
        raise ValueError(f"batches must be >= 0 and not both 0, got image {bi}, text {bt}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    L = ex.spec.text.context_length if text_len is None else text_len
    if bt and not 1 <= L <= ex.spec.text.context_length:
        raise ValueError(f"text length must be in 1..{ex.spec.text.context_length}, got {L}")
    warmup = (GPU_WARMUP if cuda else CPU_WARMUP) if warmup is None else warmup
    (px, ids), = random_inputs(ex.spec, bi, bt, L, sets=1, seed=seed, device=device, dtype=ex.dtype)

    t0 = time.perf_counter()
    c = cap.capture(ex, px, ids, iters=iters, warmup=warmup, nvtx=nvtx, latency_runs=latency_runs)
    ceil = cap.ceilings(device, ex.dtype, measure=measure_ceilings)
    sm = torch.cuda.get_device_properties(device).multi_processor_count if cuda else None
    result = analyze.analyze(c.events, c.windows, ceilings=ceil, sm_count=sm,
                             device_type="cuda" if cuda else "cpu", top=top)
    env = environment(device)
    notes = list(c.notes)
    if nvtx and not cuda:
        notes.append("--nvtx ignored: NVTX ranges need CUDA")
    data = dict(
        schema=SCHEMA, command=command, model=model_name, model_summary=ex.spec.summary(), executor=name,
        executor_notes=run_label(getattr(ex, "notes", ""), device), dtype=dtype_name(ex.dtype), device=str(device),
        device_type="cuda" if cuda else "cpu", card=env.get("card"), sm_count=sm, image_batch=bi, text_batch=bt,
        text_len=L if bt else None, iters=iters, warmup=warmup, nvtx=bool(nvtx and cuda), environment=env,
        ceilings=ceil, latency=c.latency or {},
        plan=dict(launches=c.plan.num_launches, fused=c.plan.fused_stages) if c.plan is not None else None,
        attribution=dict(method=c.attributed_by, mode=c.mode, notes=notes),
        analysis=result, windows=[list(w) for w in c.windows],
        events=[e.to_dict() for e in c.events], profile_seconds=time.perf_counter() - t0, ncu=None,
    )
    return ProfileResult(_clean(data), c.events, c.trace_path)


def compare(results: list[ProfileResult], command: str | None = None) -> dict:
    """The comparison document (profile.json of ``--compare``): both profiles, the side-by-side rows, a verdict."""
    from .report import compare_rows, compare_verdict

    ps = [r.data for r in results]
    return dict(schema=COMPARE_SCHEMA, command=command, executors=[p["executor"] for p in ps],
                comparison=compare_rows(ps), verdict=compare_verdict(ps) if len(ps) >= 2 else ps[0]["analysis"]["verdict"],
                profiles=ps)


def write_compare(results: list[ProfileResult], out_dir: str, *, command: str | None = None,
                  plots: bool = True) -> dict:
    """One report for several executors: report.md, timeline.png (one panel each), roofline.png, one trace per
    executor (trace-<name>.json) and profile.json."""
    from . import plot
    from .report import render_compare

    os.makedirs(out_dir, exist_ok=True)
    doc = compare(results, command)
    files = {}
    for r in results:
        if r.trace_path and os.path.exists(r.trace_path):
            dst = os.path.join(out_dir, f"trace-{_slug(r.executor)}.json")
            shutil.copyfile(r.trace_path, dst)
            files[f"trace ({r.executor})"] = dst
            r.data["files"] = {"trace": os.path.basename(dst)}
    if plots:
        files["timeline"] = plot.timeline(doc["profiles"], os.path.join(out_dir, "timeline.png"))
        files["roofline"] = plot.roofline(doc["profiles"], os.path.join(out_dir, "roofline.png"))
    files["profile"] = os.path.join(out_dir, "profile.json")
    files["report"] = os.path.join(out_dir, "report.md")
    doc["files"] = {k: os.path.basename(v) for k, v in files.items()}
    _dump(_clean(doc), files["profile"])
    with open(files["report"], "w") as f:
        f.write(render_compare(doc))
    return files


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", s).strip("-") or "x"


# --------------------------------------------------------------------------------------------- CLI

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


def _err(msg: str) -> int:
    print(f"dualfuse profile: error: {msg}", file=sys.stderr)
    return 2


def run(args) -> int:
    from .. import executors, presets
    from ..executors.base import ExecutorUnavailable, NeedsCUDA, resolve_device

    try:
        device = resolve_device(args.device)
    except (ValueError, ExecutorUnavailable) as e:
        return _err(str(e))
    names = [n.strip() for n in (args.compare.split(",") if args.compare else [args.executor]) if n.strip()]
    if args.compare and len(names) < 2:
        return _err(f"--compare needs two executors, e.g. --compare eager,fused (got {args.compare!r})")
    known = executors.names()
    unknown = [n for n in names if n not in known]
    if unknown:
        return _err(f"unknown executor(s): {', '.join(unknown)}; known executors: {', '.join(known)}")
    if args.iters < 1 or (args.warmup is not None and args.warmup < 0):
        return _err(f"need --iters >= 1 and --warmup >= 0 (got {args.iters}, {args.warmup})")
    if "fused" in names and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return _err("the fused executor needs CUDA; on CPU it runs only through the Triton interpreter: "
                    "set TRITON_INTERPRET=1 (slow: tiny models only), or use --device cuda")
    try:
        model = presets.load(args.model, seed=args.seed, arch=args.arch)
    except (ValueError, OSError) as e:
        return _err(str(e))
    from ..cli import user_command

    command = user_command(getattr(args, "_argv", None), "profile")
    out = args.out or f"profile-{_slug(args.model)}-{'-vs-'.join(names)}"
    results = []
    from ..adapters import to_spec

    spec = to_spec(model)
    for name in names:
        print(f"profiling {name} on {args.model} ({device}) ...", file=sys.stderr)
        try:
            r = profile(name, model, batch=args.batch, image_batch=args.image_batch, text_batch=args.text_batch,
                        text_len=args.text_length, dtype=args.dtype, device=device, iters=args.iters,
                        warmup=args.warmup, nvtx=args.nvtx, measure_ceilings=not args.no_ceilings, seed=args.seed,
                        top=args.top, latency_runs=args.latency_runs, model_name=args.model, command=command,
                        spec=spec)
        except NeedsCUDA as e:
            return _err(str(e))
        except (ExecutorUnavailable, ValueError) as e:
            return _err(f"{name}: {e}")
        if args.ncu:
            r.data["ncu"] = _ncu(args, name, r, device)
            print(f"ncu: {r.data['ncu']['message']}", file=sys.stderr)
        results.append(r)
        print(f"{name}: {r.verdict}", file=sys.stderr)
    if len(results) == 1:
        files = results[0].write(out)
    else:
        files = write_compare(results, out, command=command)
    print(f"report: {files['report']}")
    for k, v in files.items():
        if k != "report":
            print(f"  {k}: {v}")
    return 0


def _ncu(args, name: str, r: ProfileResult, device) -> dict:
    from . import capture as cap

    if device.type != "cuda":
        return dict(status="unavailable", kernels=[], message="--ncu needs a CUDA device (this run is on CPU)")
    top = [k["name"] for k in r.analysis["top_kernels"][: args.ncu_kernels]]
    argv = ["--model", args.model, "--executor", name, "--device", str(device),
            "--image-batch", str(r.data["image_batch"]), "--text-batch", str(r.data["text_batch"]),
            "--seed", str(args.seed)]
    if args.arch:
        argv += ["--arch", args.arch]
    if args.dtype:
        argv += ["--dtype", args.dtype]
    if r.data.get("text_len"):
        argv += ["--text-length", str(r.data["text_len"])]
    return cap.run_ncu(argv, top)

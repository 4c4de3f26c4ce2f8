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
same report is made of CPU ops (or Triton interpreter runs), without a roofline verdict (no GPU).

Python: ``run_profile("clip-tiny", ["eager"], device="cpu")`` is the command without its printing (a
:class:`ProfileResult`; ``.write(dir)`` writes the files); ``profile("eager", "clip-tiny", device="cpu")``
profiles one executor (an :class:`ExecutorProfile`). The pieces: labels.py (ranges and hooks), capture.py (the
profiled runs), trace.py, attribution.py and matching.py (kernels to towers, layers and ops), ceilings.py (the
card's bandwidth and matmul peaks), analyze.py (the tables), report.py and plot.py (the files), ncu.py (Nsight
Compute). The command line is ``dualfuse.cli.profile``.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field

from ..config import FusedConfig, config_of
from ..util import Progress, slug, write_json
from . import analyze
from .analyze import Event

__all__ = ["ProfileResult", "ExecutorProfile", "run_profile", "profile", "compare", "write_compare", "Event",
           "analyze"]

SCHEMA = "dualfuse.profile/1"
COMPARE_SCHEMA = "dualfuse.profile.compare/1"
GPU_WARMUP, CPU_WARMUP = 3, 1


@dataclass
class ExecutorProfile:
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
    write_json(path, data, default=_json_default)


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
            command: str | None = None, **executor_kwargs) -> ExecutorProfile:
    """Profile one executor.

    ``executor_or_name``: an executor (``dualfuse.executors.get(...)``; ``model``, ``dtype`` and ``device`` are
    then taken from it) or an executor name, built here for ``model`` (a preset name, a local path or an HF /
    open_clip model object; the user's model is never modified or hooked: executors keep private copies).
    ``iters`` forwards are profiled after ``warmup`` (default 3 on CUDA, 1 on CPU); inputs are random
    (``dualfuse.bench.random_inputs``) with ``image_batch``/``text_batch`` (default ``batch``) and ``text_len``
    tokens (default the context length). Returns an :class:`ExecutorProfile`; ``.write(dir)`` writes the files.
    """
    import torch

    from .. import executors
    from ..bench import random_inputs, run_label
    from ..environment import environment
    from ..executors.base import Executor, dtype_name
    from .capture import capture
    from .ceilings import ceilings

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
    towers = ex.io.towers
    if len(towers) == 1:  # a single tower: its inputs only
        if (text_batch if towers == ("vision",) else image_batch):
            raise ValueError(f"{model_name} is a single {towers[0]} tower: it takes no "
                             f"{'texts' if towers == ('vision',) else 'images'}")
        bi, bt = (bi, 0) if towers == ("vision",) else (0, bt)
    if bi < 0 or bt < 0 or bi + bt == 0:
        raise ValueError(f"batches must be >= 0 and not both 0, got image {bi}, text {bt}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    ctx = ex.io.context_length
    L = ctx if text_len is None else text_len
    if bt and not 1 <= L <= ctx:
        raise ValueError(f"text length must be in 1..{ctx}, got {L}")
    warmup = (GPU_WARMUP if cuda else CPU_WARMUP) if warmup is None else warmup
    (px, ids), = random_inputs(ex.spec, bi, bt, L, sets=1, seed=seed, device=device, dtype=ex.dtype)

    t0 = time.perf_counter()
    c = capture(ex, px, ids, iters=iters, warmup=warmup, nvtx=nvtx, latency_runs=latency_runs)
    ceil = ceilings(device, ex.dtype, measure=measure_ceilings)
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
    if config_of(ex) is not None:  # the fused executor's options
        data["fused_config"] = config_of(ex).to_dict()
    if cuda:  # how far this run is from the card's physical floor (known cards only: dualfuse.targets)
        from ..floors import profile_floor

        data["floor"] = profile_floor(data, ex.spec)
    return ExecutorProfile(_clean(data), c.events, c.trace_path)


def compare(results: list[ExecutorProfile], command: str | None = None) -> dict:
    """The comparison document (profile.json of ``--compare``): both profiles, the side-by-side rows, a verdict."""
    from .report import compare_rows, compare_verdict

    ps = [r.data for r in results]
    return dict(schema=COMPARE_SCHEMA, command=command, executors=[p["executor"] for p in ps],
                comparison=compare_rows(ps), verdict=compare_verdict(ps) if len(ps) >= 2 else ps[0]["analysis"]["verdict"],
                profiles=ps)


def write_compare(results: list[ExecutorProfile], out_dir: str, *, command: str | None = None,
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
            dst = os.path.join(out_dir, f"trace-{slug(r.executor, keep='_.')}.json")
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


# --------------------------------------------------------------------------------------------- the command's run

@dataclass
class ProfileResult:
    """A ``dualfuse profile`` run: one :class:`ExecutorProfile` per executor (two or more: a comparison).
    ``to_dict()`` is profile.json (``dualfuse.profile/1``, or ``dualfuse.profile.compare/1`` for several);
    ``write(dir)`` writes every file and returns their paths."""

    model: str
    device: str
    executors: list[str]
    command: str | None = None
    fused_config: FusedConfig | None = None  # the fused executor's options, when it is profiled
    profiles: list[ExecutorProfile] = field(default_factory=list)

    def to_dict(self) -> dict:
        if len(self.profiles) == 1:
            return self.profiles[0].data
        return _clean(compare(self.profiles, self.command))

    def write(self, out_dir: str, *, plots: bool = True) -> dict:
        if len(self.profiles) == 1:
            return self.profiles[0].write(out_dir, plots=plots)
        return write_compare(self.profiles, out_dir, command=self.command, plots=plots)


def run_profile(model: str = "clip-vit-b-32", executors: list[str] = ("eager",), *, arch: str | None = None,
                batch: int = 1, image_batch: int | None = None, text_batch: int | None = None,
                text_len: int | None = None, dtype=None, device=None, iters: int = 3, warmup: int | None = None,
                latency_runs: int | None = None, nvtx: bool = False, measure_ceilings: bool = True,
                top: int = 10, seed: int = 0, ncu: bool = False, ncu_kernels: int = 5, command: str | None = None,
                config: FusedConfig | None = None, stand_in=None,
                progress: Progress | None = None) -> ProfileResult:
    """Profile each of ``executors`` on ``model`` (a preset name or a local path; ``arch`` for an open_clip
    checkpoint), one after the other, as :func:`profile` does; ``ncu``: Nsight Compute on the top ``ncu_kernels``
    kernels of each. ``command`` is recorded in profile.json; ``config``: the fused executor's options. Bad
    arguments raise ValueError (prefixed with the executor's name when only that executor is at fault).
    ``stand_in``: a Jetson target name or dualfuse.standin.StandInConfig: profile in the edge-regime stand-in (its
    green context entered here, each executor's weights host-mapped, the fused executor's GEMM config with the
    stand-in's overrides; the measured bandwidth is in each profile's data["stand_in"])."""
    from .. import executors as registry
    from .. import presets
    from .. import standin as SI
    from ..adapters import to_spec
    from ..executors.base import ExecutorUnavailable, NeedsCUDA, resolve_device

    stand_cfg = SI.resolve(stand_in)
    green_info = SI.enter(stand_cfg) if stand_cfg is not None else None  # before anything touches CUDA
    progress = progress or Progress()
    device = resolve_device(device)
    names = [n.strip() for n in executors if n.strip()]
    known = registry.names()
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"unknown executor(s): {', '.join(unknown) or '(none given)'}; "
                         f"known executors: {', '.join(known)}")
    if iters < 1 or (warmup is not None and warmup < 0):
        raise ValueError(f"need --iters >= 1 and --warmup >= 0 (got {iters}, {warmup})")
    if "fused" in names and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("the fused executor needs CUDA; on CPU it runs only through the Triton interpreter: "
                         "set TRITON_INTERPRET=1 (slow: tiny models only), or use --device cuda")
    source = presets.load(model, seed=seed, arch=arch)
    spec = to_spec(source)
    if stand_cfg is not None and device.type != "cuda":
        raise SI.StandInError(f"--stand-in needs a CUDA device, got --device {device}")
    stand_info = SI.measure(stand_cfg, green_info) if stand_cfg is not None else None
    fused_config = (config or FusedConfig()) if "fused" in names else None
    if fused_config is not None and stand_info is not None:
        fused_config = SI.fused_config(stand_cfg, stand_info, fused_config)
    result = ProfileResult(model=model, device=str(device), executors=names, command=command,
                           fused_config=fused_config)
    progress.start(result)
    for name in names:
        progress.begin(name)
        try:
            target = name
            fkw = {"config": fused_config} if name == "fused" else {}  # stand-in: its overrides included
            if stand_info is not None:
                from ..hostmem import place_executor

                target = registry.get(name, source, dtype=dtype, device=device, spec=spec, **fkw)
                place_executor(target, "host")
            r = profile(target, source, batch=batch, image_batch=image_batch, text_batch=text_batch,
                        text_len=text_len, dtype=dtype, device=device, iters=iters, warmup=warmup, nvtx=nvtx,
                        measure_ceilings=measure_ceilings, seed=seed, top=top, latency_runs=latency_runs,
                        model_name=model, command=command, spec=spec, **fkw)
        except NeedsCUDA:
            raise
        except (ExecutorUnavailable, ValueError) as e:
            raise ValueError(f"{name}: {e}") from e
        if stand_info is not None:
            r.data["stand_in"] = stand_info.to_dict()
        if ncu:
            r.data["ncu"] = _ncu(r, model=model, arch=arch, dtype=dtype, seed=seed, kernels=ncu_kernels)
        result.profiles.append(r)
        progress.end(name, r)
    return result


def _ncu(r: ExecutorProfile, *, model: str, arch: str | None, dtype, seed: int, kernels: int) -> dict:
    """Nsight Compute on the top kernels of ``r``, in a process of its own that repeats r's forward."""
    from .ncu import run_ncu

    device = r.data["device"]
    if r.data["device_type"] != "cuda":
        return dict(status="unavailable", kernels=[], message="--ncu needs a CUDA device (this run is on CPU)")
    top = [k["name"] for k in r.analysis["top_kernels"][:kernels]]
    argv = ["--model", model, "--executor", r.executor, "--device", device,
            "--image-batch", str(r.data["image_batch"]), "--text-batch", str(r.data["text_batch"]),
            "--seed", str(seed)]
    if arch:
        argv += ["--arch", arch]
    if dtype:
        argv += ["--dtype", str(dtype)]
    if r.data.get("text_len"):
        argv += ["--text-length", str(r.data["text_len"])]
    return run_ncu(argv, top)

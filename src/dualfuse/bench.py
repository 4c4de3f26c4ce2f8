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

Python: :func:`run_bench` returns a :class:`BenchResult` (rows, resolved settings, environment; ``to_dict()`` is
the JSON that ``dualfuse bench --json`` writes, schema ``dualfuse.bench/1``). The command line, its table and its
progress bars are in ``dualfuse.cli.bench``. Reusable pieces: :func:`random_inputs`, :func:`call_towers`,
:func:`cosine_check`; the machine's description is :mod:`dualfuse.environment`, timing :mod:`dualfuse.timing`.
"""
from __future__ import annotations

import gc
import math
import time
from dataclasses import asdict, dataclass, field

import torch

from .config import FusedConfig
from .environment import environment
from .timing import stats, sync, time_calls
from .util import Progress

DEFAULT_MODEL = "clip-vit-b-32"
FUSED_EXECUTORS = ("fused", "auto")  # the executors that run the fused config (the others: the model's own weights)
COSINE_PASS = 0.999  # parity criterion (stated in docs/evaluation.md and BENCHMARKS.md): per-embedding cosine >= 0.999 vs the fp32 reference
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


def call_towers(ex, px, ids):
    """``ex.encode(px, ids)``, or the one tower that has inputs: (image embeddings or None, text embeddings or
    None)."""
    if px is not None and ids is not None:
        return ex.encode(px, ids)
    if px is not None:
        return ex.encode_image(px), None
    return None, ex.encode_text(ids)


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
    compile_s: float | None = None  # torch.compile executors: the first call's seconds (compilation included)
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
    cosine_pass: float | None = None  # the bound cosine_ok checked (COSINE_PASS; quantized weights: COSINE_MIN)
    # speedups (bigger is better): baseline median / this median, within this run
    speedup_vs_eager: float | None = None
    speedup_vs_best_stock: float | None = None
    # --energy (dualfuse.energy): whole-board energy over a loop of the timed calls; details in `energy`
    joules_per_inference: float | None = None
    images_per_s_per_w: float | None = None
    energy: dict | None = None
    # --stand-in (dualfuse.standin): the weight bytes this row streams per call, the stand-in floor (those bytes at
    # the stand-in's measured bandwidth) and the share of it reached (floor / median)
    weight_bytes: int | None = None
    standin_floor_ms: float | None = None
    standin_share: float | None = None


def _eager(rows: list[Row]) -> Row | None:
    return next((r for r in rows if r.executor == "eager" and r.status == "ok"), None)


def best_stock(rows):
    """The fastest stock executor's row among ``rows`` that ran ok: :class:`Row` objects, or their JSON dicts (a
    bench file's ``results``); None when there is none."""
    def get(r, key, default=None):
        return r.get(key, default) if isinstance(r, dict) else getattr(r, key)

    stock_ok = [r for r in rows if get(r, "status", "ok") == "ok" and get(r, "stock", True)
                and isinstance(get(r, "median_ms"), (int, float))]
    return min(stock_ok, key=lambda r: get(r, "median_ms")) if stock_ok else None


def add_speedups(rows: list[Row]) -> tuple[Row | None, Row | None]:
    """Fill each ok row's speedups, baseline median / this median (bigger is better): vs eager and vs the fastest
    stock executor of the same run. Returns (the eager row, the best stock row), None where there is none."""
    eager, best = _eager(rows), best_stock(rows)
    for r in rows:
        if r.status != "ok":
            continue
        if eager:
            r.speedup_vs_eager = eager.median_ms / r.median_ms
        if best:
            r.speedup_vs_best_stock = best.median_ms / r.median_ms
    return eager, best


@dataclass
class BenchResult:
    """One ``dualfuse bench`` run: what was timed, where, and a :class:`Row` per executor.

    ``to_dict()`` is the ``dualfuse.bench/1`` JSON document (read by ``dualfuse report``); ``command`` and ``args``
    are what the command line recorded (None from Python)."""

    model: str  # as given: preset name, open_clip:ARCH or path
    family: str
    summary: dict  # spec.summary(): both towers' shapes
    image_batch: int
    text_batch: int
    text_length: int
    dtype: str
    device: str
    iters: int
    warmup: int
    input_sets: int
    environment: dict
    green_context: dict | None = None  # the green context this run was timed in (dualfuse.green), if any
    energy: bool = False  # energy asked for
    energy_meter: str | None = None  # the meter's source, None when asked for and unavailable
    energy_line: str | None = None  # what the meter said when opened (printed by the CLI)
    weights: str = "fp16"  # the fused executor's weights: "fp16" (the dtype, unquantized), "int8" or "fp8"
    fused_config: FusedConfig = field(default_factory=FusedConfig)  # the fused executor's options
    stand_in: dict | None = None  # dualfuse.standin.StandInInfo.to_dict() of a stand-in run
    rows: list[Row] = field(default_factory=list)
    command: str | None = None
    args: dict | None = None

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def eager(self) -> Row | None:
        return _eager(self.rows)

    @property
    def best_stock(self) -> Row | None:
        return best_stock(self.rows)

    @property
    def quantized_cosine_pass(self) -> float | None:
        """The cosine bound of the fused executor's row with quantized weights (None: unquantized)."""
        return _min_cosine(self.weights) if self.weights != "fp16" else None

    @property
    def failed(self) -> list[Row]:
        """Rows that errored or whose output is wrong (a run with any is a failure)."""
        return [r for r in self.rows if r.status == "error" or r.cosine_ok is False]

    def to_dict(self) -> dict:
        env, eager, best = self.environment, self.eager, self.best_stock
        return dict(
            schema="dualfuse.bench/1",
            command=self.command,
            args=self.args,
            resolved=dict(model=self.model, image_batch=self.image_batch, text_batch=self.text_batch,
                          text_length=self.text_length if self.text_batch else None, dtype=self.dtype,
                          device=self.device, iters=self.iters, warmup=self.warmup, input_sets=self.input_sets,
                          timer="cuda events" if self.cuda else "perf_counter", cosine_pass=COSINE_PASS,
                          weights=self.weights, cosine_pass_quantized=self.quantized_cosine_pass),
            environment=env, card=env["card"], torch=env["torch"], triton=env["triton"], date=env["date"],
            model=self.summary, eager_median_ms=eager.median_ms if eager else None,
            best_stock=best.executor if best else None,
            sms=self.green_context["sms"] if self.green_context else None, green_context=self.green_context,
            energy_meter=self.energy_meter if self.energy else None,
            fused_config=self.fused_config.to_dict(), stand_in=self.stand_in,
            results=[asdict(r) for r in self.rows],
        )


def _short(e: BaseException, limit: int = 300) -> str:
    msg = f"{type(e).__name__}: {e}".strip().replace("\n", " ")
    return msg if len(msg) <= limit else msg[: limit - 1] + "…"


def run_bench(model: str = DEFAULT_MODEL, *, executors: list[str] | None = None, arch: str | None = None,
              batch: int = 1, image_batch: int | None = None, text_batch: int | None = None,
              text_length: int | None = None, dtype=None, device=None, iters: int | None = None,
              warmup: int | None = None, input_sets: int = 4, seed: int = 0, energy: bool = False,
              energy_seconds: float = 2.0, green_context: dict | None = None, weights: str | None = None,
              config: FusedConfig | None = None, stand_in=None,
              progress: Progress | None = None) -> BenchResult:
    """Time every executor in ``executors`` (default all registered) on ``model`` (see the module docstring).

    ``image_batch``/``text_batch`` default to ``batch`` (0 = that tower not run); ``iters``/``warmup`` default to
    100/10 on CUDA, 10/2 on CPU. ``energy``: also measure J/inference (dualfuse.energy) over ``energy_seconds`` per
    executor. ``green_context``: what :func:`dualfuse.green.enter` returned, when the caller entered one (it must be
    entered before anything touches CUDA, so not here). ``weights``: the fused executor's weights (None / "fp16":
    unquantized; "int8" / "fp8": weight-only, dualfuse.quantize), its row then checked against
    quantize.COSINE_MIN; the other executors run the model's own weights. ``config``: the fused executor's options
    (``weights``, when given, overrides its field). ``stand_in``: a Jetson target name or
    dualfuse.standin.StandInConfig: the run becomes the edge-regime stand-in (that module's docstring): the target's
    SMs in a green context (entered here unless ``green_context`` is given), every executor's weights in host-mapped
    memory (the fused executor's GEMM config gets the stand-in's overrides), the bandwidth measured first, each row's
    share of the stand-in floor. Bad arguments raise ValueError; an executor that fails gets a row saying why."""
    from . import standin as SI

    stand_cfg = SI.resolve(stand_in)  # StandInError (a ValueError) for an unknown target
    if stand_cfg is not None and green_context is None:
        green_context = SI.enter(stand_cfg)  # before anything touches CUDA: no CUDA / SM count -> StandInError
    progress = progress or Progress()
    fused_config, weights, device, dtype, iters, warmup = _resolve_settings(config, weights, device, dtype, iters,
                                                                            warmup)
    source, spec, bi, bt = _load_model(model, arch, seed, batch, image_batch, text_batch)
    _check_counts(iters, warmup, input_sets, bi, bt)
    wanted = _wanted_executors(executors)
    length = _text_length(spec, model, text_length, bt)
    if stand_cfg is not None and device.type != "cuda":
        raise SI.StandInError(f"--stand-in needs a CUDA device, got --device {device}")
    inputs, stand_info, fused_config = _make_inputs(spec, bi, bt, length, input_sets, seed, device, dtype,
                                                    stand_cfg, green_context, fused_config)
    result = _new_result(model, spec, bi, bt, length, dtype, device, iters, warmup, inputs, green_context, energy,
                         weights, fused_config, stand_info)
    run = _Run(result=result, progress=progress, source=source, spec=spec, device=device, dtype=dtype,
               iters=iters, warmup=warmup, inputs=inputs, refs=_references(spec, inputs, device, bi, bt),
               meter=_open_meter(result, device) if energy else None, fused_config=fused_config, weights=weights,
               towers=tuple(n for n, b in (("vision", bi), ("text", bt)) if b), image_batch=bi,
               energy_seconds=energy_seconds, stand_cfg=stand_cfg, stand_info=stand_info)
    progress.start(result)
    for name in wanted:  # the executors, one after the other
        _bench_executor(run, name)
    add_speedups(result.rows)
    return result


# ------------------------------------------------------------------------------------ run_bench's steps

def _resolve_settings(config, weights, device, dtype, iters, warmup):
    """(fused config, resolved weights, device, dtype, iters, warmup): the options with their defaults filled in."""
    from .executors.base import resolve_device, resolve_dtype
    from .quantize import resolve_weights

    fused_config = (config or FusedConfig()).with_overrides(**({} if weights is None else {"weights": weights}))
    weights = resolve_weights(fused_config.weights)  # fp8 on this device: the fused row says
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    cuda = device.type == "cuda"
    iters = iters if iters is not None else (GPU_ITERS if cuda else CPU_ITERS)
    warmup = warmup if warmup is not None else (GPU_WARMUP if cuda else CPU_WARMUP)
    return fused_config, weights, device, dtype, iters, warmup


def _load_model(model, arch, seed, batch, image_batch, text_batch):
    """(source model, spec, image batch, text batch): the model built, and the batches of the towers it has."""
    from . import presets
    from .adapters import to_spec

    bi = image_batch if image_batch is not None else batch
    bt = text_batch if text_batch is not None else batch
    source = presets.load(model, seed=seed, arch=arch)
    spec = to_spec(source)
    if spec.tower is not None:  # a single tower: only its inputs (a batch asked for the other is an error)
        other = "text" if spec.tower == "vision" else "vision"
        if (text_batch if other == "text" else image_batch):
            flag = "--text-batch" if other == "text" else "--image-batch"
            raise ValueError(f"{model} is a single {spec.tower} tower: {flag} must be 0 (it has no {other} tower)")
        bi, bt = (bi, 0) if spec.tower == "vision" else (0, bt)
    return source, spec, bi, bt


def _check_counts(iters: int, warmup: int, input_sets: int, bi: int, bt: int) -> None:
    """Raise ValueError unless the run counts and the batches are in range."""
    if iters < 1 or warmup < 0 or input_sets < 1:
        raise ValueError(f"need --iters >= 1, --warmup >= 0, --input-sets >= 1 (got {iters}, {warmup}, {input_sets})")
    if bi < 0 or bt < 0 or (bi == 0 and bt == 0):
        raise ValueError(f"batches must be >= 0 and not both 0 (got image {bi}, text {bt})")


def _wanted_executors(executors: list[str] | None) -> list[str]:
    """The executor names to run (default: the registry's defaults); unknown names raise ValueError."""
    from . import executors as registry

    known = registry.names()
    if executors is None:
        return registry.default_names()
    wanted = [n.strip() for n in executors if n.strip()]
    unknown = [n for n in wanted if n not in known]
    if unknown or not wanted:
        raise ValueError(f"unknown executor(s): {', '.join(unknown) or '(none given)'}; "
                         f"known executors: {', '.join(known)}")
    return wanted


def _text_length(spec, model: str, text_length: int | None, bt: int) -> int:
    """The token length of the text inputs (default: the model's context length), checked against it."""
    ctx = spec.io.context_length
    length = text_length if text_length is not None else ctx
    if bt and not 1 <= length <= ctx:
        raise ValueError(f"--text-length must be in [1, {ctx}] for {model}, got {length}")
    return length


def _make_inputs(spec, bi, bt, length, input_sets, seed, device, dtype, stand_cfg, green_context, fused_config):
    """(input sets, stand-in info or None, fused config): the inputs, and for a stand-in run its bandwidth measured,
    its GEMM overrides applied and (host activations) the inputs placed in host memory."""
    from . import standin as SI

    inputs = random_inputs(spec, bi, bt, length, sets=input_sets, seed=seed, device=device, dtype=dtype)
    stand_info = SI.measure(stand_cfg, green_context) if stand_cfg is not None else None
    if stand_info is not None:  # the fused executor's GEMMs: pointer loads, byte-bound configs, the target's SMs
        fused_config = SI.fused_config(stand_cfg, stand_info, fused_config)
    if stand_cfg is not None and stand_cfg.activations == "host":
        from .hostmem import place_inputs
        inputs = place_inputs(inputs, "host")
    return inputs, stand_info, fused_config


def _new_result(model, spec, bi, bt, length, dtype, device, iters, warmup, inputs, green_context, energy, weights,
                fused_config, stand_info) -> BenchResult:
    """The run's BenchResult with its resolved settings and environment, no rows yet."""
    from .executors.base import dtype_name

    return BenchResult(model=model, family=spec.family, summary=spec.summary(), image_batch=bi, text_batch=bt,
                       text_length=length, dtype=dtype_name(dtype), device=str(device), iters=iters,
                       warmup=warmup, input_sets=len(inputs), environment=environment(device),
                       green_context=green_context, energy=energy, weights=weights, fused_config=fused_config,
                       stand_in=stand_info.to_dict() if stand_info else None)


def _references(spec, inputs, device, bi: int, bt: int) -> tuple:
    """(image, text) embeddings of input set 0 by the fp32 reference forward (None for a tower not run)."""
    from . import reference
    from .spec import PatchSequence

    ref_spec = spec.to(device=device, dtype=torch.float32)
    with torch.no_grad():
        px0, ids0 = inputs[0]
        if isinstance(px0, PatchSequence):  # SigLIP2 NaFlex
            px0 = PatchSequence(px0.pixel_values.float(), px0.spatial_shapes, px0.pixel_attention_mask)
        elif px0 is not None:
            px0 = px0.float()
        refs = (reference.encode_image(ref_spec, px0) if bi else None,
                reference.encode_text(ref_spec, ids0) if bt else None)
    del ref_spec
    return refs


def _open_meter(result: BenchResult, device):
    """The energy meter (None when unavailable); records its source and opening line on ``result``."""
    from . import energy as E

    meter, result.energy_line = E.bench_meter(device)
    result.energy_meter = meter.source if meter is not None else None
    return meter


@dataclass
class _Run:
    """What every executor's row of one run shares: settings, model, inputs, references, meter, stand-in."""

    result: BenchResult
    progress: Progress
    source: object
    spec: object
    device: torch.device
    dtype: torch.dtype
    iters: int
    warmup: int
    inputs: list
    refs: tuple
    meter: object
    fused_config: FusedConfig
    weights: str
    towers: tuple
    image_batch: int
    energy_seconds: float
    stand_cfg: object = None
    stand_info: object = None

    def call(self, ex, i):
        """One call of ``ex`` on input set ``i`` (rotating over the sets)."""
        return call_towers(ex, *self.inputs[i % len(self.inputs)])


def _bench_executor(run: _Run, name: str) -> None:
    """Append executor ``name``'s row to the run: built, checked, timed; a failure becomes the row's status."""
    from . import executors as registry
    from .executors.base import ExecutorUnavailable, NeedsCUDA

    row = Row(name)
    run.result.rows.append(row)
    run.progress.begin(name, run.warmup + run.iters + 1)
    run.progress.phase(name, "build")
    ex = None
    try:
        ex = _build_executor(run, name, row)
        _first_call(run, ex, row)
        _time_executor(run, ex, row)
        row.notes = run_label(getattr(ex, "notes", "") or row.notes, run.device)
        route = getattr(ex, "route", None)
        if callable(route):  # executor 'auto': which executor this run's call shape went to
            row.notes += f"; this shape ran {route(run.image_batch, run.result.text_batch)}"
        if getattr(ex, "compiles_on_first_call", False):
            row.compile_s = row.first_call_s
            row.notes += f"; compile {row.compile_s:.1f} s (first call)"
    except NeedsCUDA as e:
        row.status, row.message = "needs CUDA", str(e)
        row.stock = bool(getattr(registry.executor_class(name), "stock", True))
    except ExecutorUnavailable as e:
        row.status, row.message = "unavailable", str(e)
    except Exception as e:  # noqa: BLE001 - one broken executor must not stop the others
        row.status, row.message = "error", _short(e)
    finally:
        run.progress.end(name, row)
        ex = None  # drop the executor before gc (not `del`: the timing closures name it)
        gc.collect()
        if run.device.type == "cuda":
            torch.cuda.empty_cache()


def _build_executor(run: _Run, name: str, row: Row):
    """Executor ``name`` built (stand-in: its weights placed in host memory); fills the row's build fields."""
    from . import executors as registry
    from . import standin as SI
    from .executors.base import ExecutorUnavailable

    t0 = time.perf_counter()
    if run.stand_cfg is not None and not SI.placeable(registry.executor_class(name)):
        raise ExecutorUnavailable(f"stand-in: {name} keeps its weights in its own runtime's memory, which "
                                  "cannot be placed in host memory")
    # the fused executors run the options (the stand-in's GEMM overrides included); the others the model's own weights
    fkw = {"config": run.fused_config} if name in FUSED_EXECUTORS else {}
    ex = registry.get(name, run.source, dtype=run.dtype, device=run.device, spec=run.spec, **fkw)
    if run.stand_cfg is not None:  # every weight byte over PCIe, before the first call builds anything
        from .hostmem import place_executor
        try:
            place_executor(ex, "host")
        except ValueError as e:
            raise ExecutorUnavailable(f"stand-in: {e}") from None
        row.weight_bytes = SI.row_weight_bytes(run.spec, name, run.weights if fkw else None, run.dtype, run.towers)
    row.build_s = time.perf_counter() - t0
    row.stock, row.notes = bool(getattr(ex, "stock", True)), run_label(getattr(ex, "notes", ""), run.device)
    return ex


def _first_call(run: _Run, ex, row: Row) -> None:
    """Time ``ex``'s first call and check its output against the reference (the row's cosine fields)."""
    name = row.executor
    run.progress.phase(name, "first call + check")
    t0 = time.perf_counter()
    with torch.no_grad():
        outs = run.call(ex, 0)
    sync(run.device)
    row.first_call_s = time.perf_counter() - t0
    # the quantized bound only where the weights are quantized (a fused executor that fell back is not)
    fused = name in FUSED_EXECUTORS
    row.cosine_pass = _min_cosine(run.weights if fused and getattr(ex, "fallback", None) is None else None)
    for k, val in cosine_check(outs, run.refs, row.cosine_pass).items():
        setattr(row, k, val)
    del outs
    run.progress.advance(name)


def _time_executor(run: _Run, ex, row: Row) -> None:
    """Warm ``ex`` up, time its calls (the row's latency fields, stand-in share) and, with a meter, its energy."""
    name, progress = row.executor, run.progress
    progress.phase(name, "warm-up")
    for i in range(run.warmup):
        run.call(ex, i)
        progress.advance(name)
    sync(run.device)
    progress.phase(name, "timing")
    samples = time_calls(lambda i: run.call(ex, i), run.iters, run.device, on_step=lambda: progress.advance(name))
    row.samples_ms = samples
    for k, val in stats(samples).items():
        setattr(row, k, val)
    if run.stand_info is not None and row.weight_bytes:
        row.standin_floor_ms = run.stand_info.floor_ms(row.weight_bytes)
        row.standin_share = run.stand_info.share(row.weight_bytes, row.median_ms)
    if run.meter is not None:  # the same calls again under the meter (dualfuse.energy)
        from .energy import bench_energy
        progress.phase(name, "energy")
        for k, val in bench_energy(lambda i: run.call(ex, i), run.meter, run.device, run.image_batch,
                                   seconds=run.energy_seconds).items():
            setattr(row, k, val)


def _min_cosine(weights: str | None) -> float:
    """The cosine bound of an executor running ``weights`` (quantized: dualfuse.quantize.COSINE_MIN)."""
    if weights not in (None, "fp16"):
        from .quantize import COSINE_MIN
        return COSINE_MIN
    return COSINE_PASS


def run_label(notes: str, device) -> str:
    """An executor's notes as true for this run: off CUDA the fused Triton launches run in the Triton interpreter
    (on CPU), not in a CUDA graph."""
    notes = notes or ""
    if torch.device(device).type != "cuda" and "CUDA graph" in notes:
        notes = notes.replace("one CUDA graph", "Triton interpreter (CPU)").replace(
            "CUDA graph", "Triton interpreter (CPU)")
    return notes

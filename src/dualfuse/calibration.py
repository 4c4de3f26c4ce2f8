"""Calibration: measured timings of the fused executor's implementation choices on one card, cached on disk, and
the cost model that turns them into choices.

Two choices read it:

- **Per stage and per tower: Triton or a library kernel** (``FusedExecutor(gemm_impl="auto")``, the default). A
  linear stage (one grouped Triton launch covering a step of each tower) can instead run one or both steps as a
  cuBLAS GEMM through torch (``executors/fused/library.py``); an attention stage can run a step through PyTorch's
  ``scaled_dot_product_attention``. The cost of a choice is the sum of its launches' calibrated times (the
  launches of a stage run one after the other in the graph): the grouped Triton launch of the steps left on
  Triton (``stages`` for two steps, ``steps[sig]["triton"]`` for one) plus each library step's
  ``steps[sig]["library"]``. A library choice must beat all-Triton by ``MARGIN``; any timing missing -> Triton.
- **Per call-shape family: the fused or the graph executor** (``executor="auto"``, executors/auto.py): the
  calibrated end-to-end medians of both for the model (``calls``); the family is the towers present and a
  bucket of the batch size (:func:`call_family`).

Nothing is measured at call time: the timings come from ``dualfuse.executors.fused.calibrate.calibrate`` (a GPU
run, once per card), stored in ``~/.cache/dualfuse/calibration-<card>-<torch>-<triton>-<dualfuse>.json``
(``$DUALFUSE_CACHE`` or ``$XDG_CACHE_HOME/dualfuse`` first when set). The file names its card and versions
inside too; a file that cannot be read, has the wrong schema, unknown entries or bad numbers, or was made on
another card or with other versions is ignored with a warning (all Triton, fused everywhere: the behaviour
without calibration). An executor takes its calibration once, when built (:func:`resolve`: a path given that is
not a file is ignored with a warning; a Calibration object is checked the same way and copied).

Keys are shape signatures, not model names (:func:`linear_signature`, :func:`attention_signature`): one file
serves every model with those step shapes. Pure Python: testable on CPU with given timings.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import itertools
import json
import math
import os
import pathlib
import re
import warnings
from dataclasses import dataclass, field

SCHEMA = "dualfuse.calibration/1"
MARGIN = 0.05  # a library choice must be >= 5% faster than all-Triton (timing noise must not flip choices)
TRITON, LIBRARY = "triton", "library"
BATCH_BUCKETS = (1, 8, 32, 128)  # call families: batch 1, 2-8, 9-32, 33-128, > 128


# --------------------------------------------------------------------------------------------- signatures

def _dt(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def linear_signature(problem) -> str:
    """What a GEMM step's time depends on: M x N x K, epilogue (bias, activation, residual), dtypes."""
    m, k = problem.x.shape
    n = problem.weight.shape[0]
    epi = ",".join(x for x in ("bias" if problem.bias is not None else "", problem.activation or "",
                               "res" if problem.residual is not None else "") if x) or "none"
    return f"linear:{m}x{n}x{k}:{epi}:{_dt(problem.x.dtype)}->{_dt(problem.out.dtype)}"


def attention_signature(problem) -> str:
    """B x heads x Sq x Sk x head_dim, causal, dtype."""
    b, sq, hd = problem.q.shape
    sk = problem.k.shape[1]
    return (f"attention:{b}x{problem.heads}x{sq}x{sk}x{hd // problem.heads}:"
            f"{'causal' if problem.causal else 'full'}:{_dt(problem.q.dtype)}")


def stage_key(signatures) -> str:
    return " + ".join(signatures)


def call_family(image_batch: int, text_batch: int) -> str:
    """A call-shape family: the towers present and the batch bucket of the larger batch ("image+text b<=8")."""
    towers = "+".join(t for t, n in (("image", image_batch), ("text", text_batch)) if n) or "none"
    b = max(image_batch, text_batch)
    bucket = next((f"b<={x}" for x in BATCH_BUCKETS if b <= x), f"b>{BATCH_BUCKETS[-1]}")
    return f"{towers} {bucket}"


def model_key(spec, dtype, weights: str = "fp16") -> str:
    """The model (architecture, not weights), dtype and fused weight format (``"int8"`` / ``"fp8"`` appended; the
    16-bit weights add nothing) a call timing belongs to: a fused executor with quantized weights is not timed by
    a calibration of the 16-bit one."""
    v, t = spec.vision, spec.text
    vis = f"v{v.num_layers}x{v.width}@{v.seq_len}" if v is not None else "v-"
    txt = f"t{t.num_layers}x{t.width}" if t is not None else "t-"
    return f"{spec.name or spec.family}|{vis}|{txt}|{_dt(dtype)}" + ("" if weights in (None, "fp16") else f"|{weights}")


# --------------------------------------------------------------------------------------------- the file

def card_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", name).strip("_") or "unknown"


@functools.cache
def kernels_digest() -> str:
    """A short hash of the source of what a calibration times (the Triton kernels and the fused executor's
    launch code): a checkout that changed them under the same version number does not trust older timings."""
    root = pathlib.Path(__file__).resolve().parent
    h = hashlib.sha1()
    for sub in ("kernels", "executors/fused"):
        for path in sorted((root / sub).rglob("*.py")):
            h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def identity(device) -> dict:
    """The card and versions a calibration is valid for (``kernels``: :func:`kernels_digest`)."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from .version import __version__

    device = torch.device(device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    try:
        triton = version("triton")
    except PackageNotFoundError:
        triton = "none"
    return dict(card=card, torch=torch.__version__, triton=triton, dualfuse=__version__, kernels=kernels_digest())


def cache_dir() -> str:
    base = os.environ.get("DUALFUSE_CACHE")
    if base:
        return base
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "dualfuse")


def default_path(ident: dict) -> str:
    name = "calibration-" + "-".join(card_slug(str(ident[k])) for k in ("card", "torch", "triton", "dualfuse"))
    return os.path.join(cache_dir(), name + ".json")


@dataclass
class Calibration:
    """Timings in microseconds (``steps``, ``stages``) and call medians in milliseconds (``calls``) of one card
    and set of versions (``ident``). ``choose_stage`` / ``choose_executor`` are the cost model."""

    ident: dict
    steps: dict = field(default_factory=dict)  # step signature -> {"triton": us, "library": us}
    stages: dict = field(default_factory=dict)  # stage key (2+ steps) -> {"triton": us} (the grouped launch)
    calls: dict = field(default_factory=dict)  # model key -> family -> {"fused": ms, "graph": ms, "shape": [...]}
    path: str | None = None

    # -- the cost model ----------------------------------------------------------------------------------
    def choose_stage(self, signatures: list[str], allowed: list[bool] | None = None,
                     margin: float = MARGIN) -> tuple[tuple[str, ...], str]:
        """(implementation per step, why) for a stage of these step signatures. ``allowed[i]``: whether step i
        may take the library path at all (quantized weights, folded LayerNorms: Triton only)."""
        n = len(signatures)
        allowed = allowed or [True] * n
        all_triton = (TRITON,) * n
        base = self._triton(signatures)
        if base is None:
            return all_triton, "no calibration for this stage"
        best, best_cost = all_triton, base
        for choice in itertools.product((TRITON, LIBRARY), repeat=n):
            if choice == all_triton or any(c == LIBRARY and not ok for c, ok in zip(choice, allowed)):
                continue
            lib = [self.steps.get(s, {}).get(LIBRARY) for s, c in zip(signatures, choice) if c == LIBRARY]
            rest = [s for s, c in zip(signatures, choice) if c == TRITON]
            tri = self._triton(rest) if rest else 0.0
            if any(x is None for x in lib) or tri is None:
                continue
            cost = tri + sum(lib)
            if cost < best_cost * (1.0 - margin) if best == all_triton else cost < best_cost:
                best, best_cost = choice, cost
        if best == all_triton:
            return best, f"triton {base:.1f} us is the fastest"
        return best, f"{'/'.join(best)} {best_cost:.1f} us vs all-triton {base:.1f} us"

    def _triton(self, signatures: list[str]) -> float | None:
        if len(signatures) == 1:
            return self.steps.get(signatures[0], {}).get(TRITON)
        return self.stages.get(stage_key(signatures), {}).get(TRITON)

    def choose_executor(self, model: str, family: str) -> tuple[str, str]:
        """("fused" | "graph", why) for a call-shape family of a model: the faster calibrated median; fused
        where there is no timing (the executor's default)."""
        t = self.calls.get(model, {}).get(family)
        if not t or t.get("fused") is None or t.get("graph") is None:
            return "fused", f"{family}: no calibration, fused by default"
        f, g = t["fused"], t["graph"]
        if g < f:
            return "graph", f"{family}: graph {g:.3f} ms < fused {f:.3f} ms (calibrated)"
        return "fused", f"{family}: fused {f:.3f} ms <= graph {g:.3f} ms (calibrated)"

    # -- storage ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dict(schema=SCHEMA, **self.ident, steps=self.steps, stages=self.stages, calls=self.calls)

    def save(self, path: str | None = None) -> str:
        path = path or self.path or default_path(self.ident)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=1, sort_keys=True)
        os.replace(tmp, path)  # readers never see half a file
        self.path = path
        return path

    def merge(self, other: "Calibration") -> None:
        self.steps.update(other.steps)
        self.stages.update(other.stages)
        for m, fams in other.calls.items():
            self.calls.setdefault(m, {}).update(fams)


STEP_KEYS, STAGE_KEYS, CALL_KEYS = (TRITON, LIBRARY), (TRITON,), ("fused", "graph", "shape")


def _valid_times(table, what: str, keys: tuple[str, ...]) -> str | None:
    if not isinstance(table, dict):
        return f"{what} is not an object"
    for key, entry in table.items():
        if not isinstance(key, str) or not isinstance(entry, dict):
            return f"{what}[{key!r}] is not an object"
        for impl, v in entry.items():
            if impl not in keys:
                return f"{what}[{key!r}] has an unknown entry {impl!r} (expected {', '.join(keys)})"
            if impl == "shape":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                return f"{what}[{key!r}][{impl!r}] = {v!r} is not a positive time"
    return None


def parse(data, ident: dict, path: str = "<data>") -> Calibration | None:
    """A Calibration from a decoded file, or None with a warning when it is foreign or corrupt."""
    why = None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        why = f"not a {SCHEMA} document"
    else:
        other = {k: data.get(k) for k in ident}
        if other != ident:
            diff = ", ".join(f"{k} {other[k]!r} (here {ident[k]!r})" for k in ident if other[k] != ident[k])
            why = f"made for another card or versions: {diff} (`dualfuse calibrate` makes one for this card and these versions)"
        else:
            calls = data.get("calls", {})
            why = (_valid_times(data.get("steps", {}), "steps", STEP_KEYS)
                   or _valid_times(data.get("stages", {}), "stages", STAGE_KEYS)
                   or (None if isinstance(calls, dict) else "calls is not an object")
                   or next((e for m, fams in calls.items() for e in [_valid_times(fams, f"calls[{m!r}]", CALL_KEYS)]
                            if e), None))
    if why:
        warnings.warn(f"dualfuse: ignoring the calibration cache {path}: {why}; running without calibration "
                      f"(all-Triton fused stages, fused executor everywhere)", stacklevel=3)
        return None
    return Calibration(dict(ident), dict(data.get("steps", {})), dict(data.get("stages", {})),
                       {m: dict(f) for m, f in data.get("calls", {}).items()}, path)


def load(device=None, path: str | None = None, ident: dict | None = None) -> Calibration | None:
    """The calibration of this card and versions (``path``: that file instead of the default one), or None:
    no file, or one that is ignored with a warning (:func:`parse`)."""
    ident = ident or identity(device if device is not None else "cpu")
    path = path or default_path(ident)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        warnings.warn(f"dualfuse: ignoring the calibration cache {path}: unreadable ({type(e).__name__}: {e}); "
                      f"running without calibration", stacklevel=2)
        return None
    return parse(data, ident, path)


def resolve(calibration, device) -> Calibration | None:
    """The calibration an executor on ``device`` decides from, taken once, when it is built (``fuse()``): None ->
    this card's cache file (None when there is none); a path -> that file (a missing file, like a corrupt or
    foreign one, is ignored with a warning); a :class:`Calibration` -> a private copy (later changes to the object
    do not change the executor's choices), or None with a warning when it was made for another card or versions.
    ValueError for anything else."""
    if isinstance(calibration, os.PathLike):
        calibration = os.fspath(calibration)
    if calibration is None:
        return load(device)
    if isinstance(calibration, str):
        if not os.path.isfile(calibration):
            warnings.warn(f"dualfuse: calibration file {calibration} not found (or not a file); running without "
                          f"calibration (all-Triton fused stages, fused executor everywhere)", stacklevel=3)
            return None
        return load(device, path=calibration)
    if not isinstance(calibration, Calibration):
        raise ValueError(f"calibration must be None, a path or a dualfuse.calibration.Calibration, got "
                         f"{type(calibration).__name__}")
    return parse(copy.deepcopy(calibration.to_dict()), identity(device), calibration.path or "<Calibration object>")

"""Executors: ways to run both towers of a dual encoder behind one interface (see base.Executor).

    from dualfuse import executors
    executors.names()                       # ['eager', 'streams', 'graph', 'compile', ...]
    ex = executors.get("graph", model, dtype="fp16", device="cuda")
    image_embeds, text_embeds = ex.encode(pixel_values, input_ids)

Registry: a module in this package registers its class with ``@register("name")``. Modules are imported lazily,
the first time ``names()`` or ``get()`` is called, each on its own: one whose import fails (a missing optional
dependency, a bug) does not hide the others; it is still listed under its module name and ``get`` raises
:class:`ExecutorUnavailable` with the import error. A new executor file (``fused.py``, ``onnxruntime.py``, ...)
appears in ``names()`` and in ``dualfuse bench`` without touching anything else. Code outside the package can
register too (``@dualfuse.executors.register("mine")``).
"""
from __future__ import annotations

import importlib
import pkgutil

from .base import (Executor, ExecutorUnavailable, NeedsCUDA, resolve_device, resolve_dtype, source_forward,
                   validate_inputs)

__all__ = ["Executor", "ExecutorUnavailable", "NeedsCUDA", "default_names", "get", "names", "register", "resolve_device",
           "resolve_dtype", "source_forward", "validate_inputs", "unavailable"]

_REGISTRY: dict[str, type] = {}
_BROKEN: dict[str, str] = {}  # executor name (or module name) -> why its module failed to import
_ORDER = ["eager", "streams", "graph", "compile", "compile-max", "fused", "auto"]  # listed first, in this order; others follow sorted
_MODULE_NAMES = {"compiled": "compile"}  # module -> executor name, where they differ (for import errors)
_SKIP = {"base"}
_discovered = False


def register(name: str):
    """Class decorator: make an Executor subclass reachable as ``get(name, ...)``."""

    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, Executor)):
            raise TypeError(f"@register({name!r}) expects an Executor subclass, got {cls!r}")
        cls.name = name
        _REGISTRY[name] = cls
        _BROKEN.pop(name, None)
        return cls

    return deco


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    for info in pkgutil.iter_modules(__path__):
        mod = info.name
        if mod.startswith("_") or mod in _SKIP:
            continue
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except Exception as e:  # noqa: BLE001 - any import failure makes just this executor unavailable
            name = _MODULE_NAMES.get(mod, mod)
            if name not in _REGISTRY:
                _BROKEN[name] = f"cannot import dualfuse.executors.{mod}: {type(e).__name__}: {e}"


def names() -> list[str]:
    """Every executor known here: registered ones and ones whose module failed to import (get() says why)."""
    _discover()
    known = set(_REGISTRY) | set(_BROKEN)
    return [n for n in _ORDER if n in known] + sorted(known - set(_ORDER))


def default_names() -> list[str]:
    """The executors ``dualfuse bench`` runs when none are named: every known one but those marked ``opt_in``
    (slow to build, e.g. compile-max's autotuning)."""
    return [n for n in names() if not getattr(_REGISTRY.get(n), "opt_in", False)]


def unavailable() -> dict[str, str]:
    """Executors whose module failed to import -> the reason."""
    _discover()
    return dict(_BROKEN)


def executor_class(name: str) -> type:
    _discover()
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in _BROKEN:
        raise ExecutorUnavailable(f"executor {name!r} is unavailable: {_BROKEN[name]}")
    raise ValueError(f"unknown executor {name!r}; known executors: {', '.join(names())}")


def get(name: str, model, dtype=None, device=None, **kwargs) -> Executor:
    """Build executor ``name`` for ``model`` (source model object or preset name).

    ``dtype``: torch dtype or 'fp16' | 'bf16' | 'fp32' (default fp16 on CUDA, fp32 on CPU).
    ``device``: default the current CUDA device if there is one, else CPU.
    Raises ValueError for an unknown name, NeedsCUDA for a CUDA-only executor without CUDA.
    """
    return executor_class(name)(model, dtype=dtype, device=device, **kwargs)

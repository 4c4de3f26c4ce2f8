"""Skip the Triton interpreter's redundant re-patching of ``triton.language`` inside a launch (test-only).

Under ``TRITON_INTERPRET=1`` every call of a ``@triton.jit`` helper patches ``triton.language`` again
(``inspect.getmembers`` over the module and its tensor class), not only the launch itself. The GEMM kernel calls
its helpers about fifty times per program, so that patching took about half of the CPU tests' time. Inside a launch
the modules a helper sees (``triton.language``, ``triton.language.core``) are patched once by the launch or its first
helper that sees them, and patching them again changes nothing: :func:`install` skips those repeats. The package itself
never touches Triton's internals; this file does nothing when the interpreter lacks the names it expects (Triton
3.6–3.9 have them)."""
from __future__ import annotations

import threading


class _NoScope:
    def restore(self):
        pass


def install() -> bool:
    """Patch Triton's interpreter as described above; returns whether it did."""
    try:
        import triton
        from triton.runtime import interpreter as ti
    except Exception:
        return False
    if tuple(int(x) for x in triton.__version__.split(".")[:2]) > (3, 9):
        return False  # checked against 3.6-3.9 only: a later interpreter may restore a helper's patches
    grid = getattr(ti, "GridExecutor", None)
    patch_lang = getattr(ti, "_patch_lang", None)
    if grid is None or patch_lang is None or getattr(patch_lang, "_dualfuse_nested_skip", False):
        return False
    import inspect

    import triton.language as tl

    state = threading.local()  # per thread: the language modules the running launch has patched (None: no launch)
    launch_call = grid.__call__

    def call(self, *args, **kwargs):
        outer = getattr(state, "patched", None)
        state.patched = set()
        try:
            return launch_call(self, *args, **kwargs)
        finally:
            state.patched = outer

    langs_of: dict = {}  # function -> ids of the triton.language modules its globals see (module globals don't move)

    def patch(fn):
        # what the interpreter patches for fn: the triton.language modules its globals see (tl, tl.core)
        langs = langs_of.get(fn)
        if langs is None:
            langs = langs_of[fn] = frozenset(id(v) for v in fn.__globals__.values()
                                             if inspect.ismodule(v) and (v is tl or v is tl.core))
        patched = getattr(state, "patched", None)
        if patched is not None and langs and langs <= patched:
            return _NoScope()  # a helper inside a launch that has patched these modules already
        scope = patch_lang(fn)
        if patched is not None:
            patched |= langs
        return scope

    patch._dualfuse_nested_skip = True
    grid.__call__ = call
    ti._patch_lang = patch
    return True

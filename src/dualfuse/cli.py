"""The ``dualfuse`` command.

Subcommands live in their own modules, listed in SUBCOMMANDS (name -> module, or a tuple of candidate modules,
the first that provides the command wins). A module provides ``add_arguments(parser)`` and
``run(args) -> int`` (exit code); its docstring's first line is the help text. To add one, add a line here.
A listed module that does not exist (not written yet) is simply not offered; one that exists but fails to import
is offered and reports its import error when run.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
import sys

SUBCOMMANDS: dict[str, str | tuple[str, ...]] = {
    "bench": "dualfuse.bench",
    "plan": "dualfuse.plan",
    "profile": "dualfuse.profile",
    "eval": "dualfuse.evaluate",
    "report": "dualfuse.report",
}


def _exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _load(module: str):
    """The module if it provides a subcommand; None if absent or not a subcommand; the exception if broken."""
    if not _exists(module):
        return None
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001
        return e
    if not (callable(getattr(mod, "add_arguments", None)) and callable(getattr(mod, "run", None))):
        return None
    return mod


def _broken(name: str, module: str, error: Exception):
    def run(args) -> int:
        print(f"dualfuse {name}: unavailable: cannot import {module}: {type(error).__name__}: {error}",
              file=sys.stderr)
        return 1
    return run


def _summary(doc: str | None) -> str:
    lines = (doc or "").strip().splitlines()
    first = re.sub(r"^`dualfuse [\w-]+`:\s*", "", lines[0]) if lines else ""
    return first[:1].upper() + first[1:]


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``only``, just that subcommand's module is imported (the others are listed by name)."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="dualfuse",
        description="Profile, fuse and evaluate dual-encoder vision-language models (CLIP, SigLIP).")
    parser.add_argument("--version", action="version", version=f"dualfuse {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, modules in SUBCOMMANDS.items():
        candidates = (modules,) if isinstance(modules, str) else modules
        if only is not None and name != only:
            if any(_exists(m) for m in candidates):
                sub.add_parser(name, add_help=False)
            continue
        mod = module = None
        for module in candidates:
            mod = _load(module)
            if mod is not None:
                break
        if mod is None:
            continue
        if isinstance(mod, Exception):
            p = sub.add_parser(name, help=f"(unavailable: {type(mod).__name__})")
            p.set_defaults(_run=_broken(name, module, mod))
            continue
        p = sub.add_parser(name, help=_summary(mod.__doc__), description=(mod.__doc__ or "").strip() or None,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=first if first in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    run = getattr(args, "_run", None)
    if run is None:
        parser.print_help()
        return 2
    args._argv = argv
    return int(run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

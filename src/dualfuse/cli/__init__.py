"""The ``dualfuse`` command: parses arguments, calls the library, prints and writes files.

Subcommands live in their own modules, listed in SUBCOMMANDS (name -> module). A module provides
``add_arguments(parser)`` and ``run(args) -> int`` (exit code); its docstring's first line is the help text and
``DESCRIPTION`` (default: the docstring) the ``--help`` description. To add one, add a line here. A listed module
that fails to import (a missing optional package) is still offered and reports its import error when run.
bench, eval, profile and report are in this package (``cli/bench.py``, ``cli/evaluate.py``, ``cli/profile.py``,
``cli/report.py``: each calls ``run_bench`` / ``run_eval`` / ``run_profile`` / ``build_report`` and prints the
result); plan's is still beside its code in ``plan.py``.

Errors: a bad argument, a missing or unreadable file and the like raise ValueError (or another known error,
see _known_errors) inside a command; :func:`main` prints ``dualfuse: error: <message>`` to stderr and returns 2, with no
traceback (:func:`fail` does the same with the command's name, for a command that catches the error itself).
Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import shlex
import sys

SUBCOMMANDS: dict[str, str] = {
    "bench": "dualfuse.cli.bench",
    "plan": "dualfuse.cli.plan",
    "profile": "dualfuse.cli.profile",
    "eval": "dualfuse.cli.evaluate",
    "report": "dualfuse.cli.report",
    "stream": "dualfuse.cli.stream",
    "embed": "dualfuse.cli.embed",
    "search": "dualfuse.cli.search",
    "calibrate": "dualfuse.cli.calibrate",
}


def _known_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "the input is wrong or the machine lacks something", not "dualfuse has a bug"."""
    errors: list[type[BaseException]] = [ValueError, OSError]
    try:
        from ..executors.base import ExecutorUnavailable
        errors.append(ExecutorUnavailable)
    except Exception:  # noqa: BLE001 - a broken import must not hide the user's error
        pass
    try:
        from ..energy import EnergyUnavailable
        errors.append(EnergyUnavailable)
    except Exception:  # noqa: BLE001
        pass
    return tuple(errors)


def fail(command: str, message: str) -> int:
    """Print ``dualfuse <command>: error: <message>`` to stderr; the exit code of a bad argument (2)."""
    print(f"dualfuse {command}: error: {message}", file=sys.stderr)
    return 2


def _message(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    text = str(e).strip()
    return text or type(e).__name__


def user_command(argv: list[str] | None, default: str = "") -> str:
    """The command line as the user typed it, for reports: ``dualfuse`` + ``argv`` without private flags
    (``--_name VALUE`` / ``--_name=VALUE``, used between dualfuse's own processes)."""
    items = list(argv) if argv else ([default] if default else [])
    out, skip = [], False
    for a in items:
        if skip:
            skip = False
            continue
        if a.startswith("--_"):
            skip = "=" not in a
            continue
        out.append(a)
    return shlex.join(["dualfuse", *out])


def _load(module: str):
    """The module if it provides a subcommand, None if it is not one, the exception if it fails to import."""
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
    from ..version import __version__

    parser = argparse.ArgumentParser(
        prog="dualfuse",
        description="Profile, fuse and evaluate dual-encoder vision-language models (CLIP, SigLIP).")
    parser.add_argument("--version", action="version", version=f"dualfuse {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, add_help=False)
            continue
        mod = _load(module)
        if mod is None:
            continue
        if isinstance(mod, Exception):
            p = sub.add_parser(name, help=f"(unavailable: {type(mod).__name__})")
            p.set_defaults(_run=_broken(name, module, mod))
            continue
        description = getattr(mod, "DESCRIPTION", mod.__doc__)
        p = sub.add_parser(name, help=_summary(mod.__doc__), description=(description or "").strip() or None,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_cuda_probes(argv: list[str]) -> None:
    """On a machine without a GPU, silence what a CUDA build of torch prints while it looks for CUDA: the
    profiler's ``gpuGetDeviceCount failed`` (kineto's log, KINETO_LOG_LEVEL; a value the user set is kept) and
    ``No CUDA runtime is found`` (torch.utils.cpp_extension, imported by torch.compile). With a GPU nothing
    changes, so real profiler errors still show."""
    if any(a.startswith("--_in-green-context") for a in argv):
        return  # a green-context child: a GPU run, and CUDA must not be touched before the context exists
    try:
        import torch
        if torch.cuda.is_available():
            return
    except Exception:  # noqa: BLE001 - best effort only
        return
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # above ERROR (4) and USDT (5): kineto prints nothing
    logger = logging.getLogger("torch.utils.cpp_extension")
    if not any(isinstance(f, _DropMessage) for f in logger.filters):
        logger.addFilter(_DropMessage("No CUDA runtime is found"))


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
    if args.command != "report":  # report reads JSON files and never imports torch
        quiet_cuda_probes(argv)
    try:
        return int(run(args) or 0)
    except _known_errors() as e:
        print(f"dualfuse: error: {_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dualfuse: interrupted", file=sys.stderr)
        return 130

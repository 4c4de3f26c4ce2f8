"""`dualfuse report`: one Markdown page with plots from saved `dualfuse bench` / `dualfuse eval` JSON files.

The command line of :func:`dualfuse.report.build_report`.
"""
from __future__ import annotations

import argparse
import os

from .. import report as R
from . import fail

DESCRIPTION = R.__doc__


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", nargs="+", required=True, metavar="FILE", help="bench / eval JSON files")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for report.md and the plots")
    p.add_argument("--title", default="dualfuse report")


def run(args: argparse.Namespace) -> int:
    missing = [p for p in args.json if not os.path.isfile(p)]
    if len(missing) == len(args.json):
        return fail("report", f"none of the files exist: {', '.join(missing)}")
    path = R.build_report(args.json, args.out, args.title)
    print(f"report written to {path}")
    return 0

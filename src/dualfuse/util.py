"""Small helpers that bench, eval, profile and report share: file-name slugs, JSON results, progress reports."""
from __future__ import annotations

import json
import math
import os
import re


def slug(text: str, *, keep: str = "", lower: bool = False, limit: int | None = None, default: str = "x") -> str:
    """``text`` as a file-name part: each run of characters other than ASCII letters, digits and ``keep`` becomes
    one '-', no '-' at either end; ``default`` when nothing is left."""
    s = re.sub(f"[^A-Za-z0-9{re.escape(keep)}]+", "-", str(text)).strip("-")
    if lower:
        s = s.lower()
    if limit is not None:
        s = s[:limit]
    return s or default


def format_number(x, fmt: str = "{:.3f}", none: str = "—") -> str:
    """``fmt.format(x)``, or ``none`` for None, NaN and infinity."""
    if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))):
        return none
    return fmt.format(x)


def write_json(path: str, doc, *, default=str) -> str:
    """Write ``doc`` to ``path`` (indent 1, as every dualfuse JSON file), creating the folder; returns the path.

    Written to a temporary file first and renamed, so a reader never sees half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=default)
    os.replace(tmp, path)
    return path


class Progress:
    """What a long run reports while it goes; the default says nothing. The CLI passes one that prints the
    header and draws progress bars; library callers pass nothing or their own.

    ``start(result)``: the run is set up (model, inputs, device resolved; no rows yet).
    ``begin(name, total)``: an executor starts; ``total`` steps follow (None: unknown).
    ``phase(name, text)``: what it does now. ``advance(name)``: one step done.
    ``end(name, row)``: its row (or result) is complete."""

    def start(self, result) -> None:
        pass

    def begin(self, name: str, total: int | None = None) -> None:
        pass

    def phase(self, name: str, text: str) -> None:
        pass

    def advance(self, name: str) -> None:
        pass

    def end(self, name: str, row) -> None:
        pass

"""SM-limited runs: `dualfuse bench --sms N[,N...]` inside CUDA green contexts, one process per SM count.

A green context owns a subset of the GPU's SMs; kernels launched from it run on those SMs only. That emulates the
compute of a smaller GPU — 8 SMs ≈ Jetson Orin Nano / Orin NX (1024 CUDA cores), 16 SMs ≈ Jetson AGX Orin
(2048 CUDA cores) — but NOT its memory bandwidth (an H100 keeps ~3.35 TB/s, an H200 ~4.8 TB/s; Orin Nano has
~68-102 GB/s, AGX Orin ~205 GB/s), clocks, L2 cache size, or power limits. Latencies under a green context are
therefore optimistic for memory-bound work; every report says so (:data:`NOT_EMULATED`).

How: ``torch.cuda.green_contexts.GreenContext.create(num_sms=N, device_id=i)`` then ``.set_context()`` before
anything else touches CUDA in the process, so every stream, allocation and CUDA graph of the run lives in the
green context. A second green context in the same process fails ("context is destroyed"), so
:func:`run_sweep` starts one child process per SM count (``python -m dualfuse.cli bench ... --_in-green-context N
--json TMP``) and merges their JSON files. The command line side (validating ``--sms``, entering the context in
a child, printing the summary) is in ``dualfuse.cli.bench``.

SM granularity (cuDevSmResourceSplitByCount): compute capability 9.x (Hopper) and newer allocate SMs in groups of
8 (minimum 8); 8.x (Ampere, incl. Orin) in groups of 2 (minimum 4); 7.x in groups of 2 (minimum 2). Counts that
don't fit are rejected up front with the nearest valid ones.

For tests on machines without a GPU, ``DUALFUSE_FAKE_GREEN_CONTEXT=1`` makes :func:`enter` record the request
without creating anything (the JSON says ``"fake": true``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from .util import write_json

NOT_EMULATED = ("green contexts limit SMs only: memory bandwidth, clocks, L2 size and power limits stay those of "
                "the big card, so SM-limited latencies are optimistic for memory-bound work")
JETSON_EQUIVALENTS = {8: "≈ Jetson Orin Nano / Orin NX (8 SMs)", 16: "≈ Jetson AGX Orin (16 SMs)"}
FAKE_ENV = "DUALFUSE_FAKE_GREEN_CONTEXT"

_ACTIVE = None  # the process's green context (kept alive for the life of the process)


def sm_granularity(cc_major: int) -> tuple[int, int]:
    """(minimum SMs, multiple) a green context can get on a GPU of compute capability ``cc_major``.x."""
    if cc_major >= 9:
        return 8, 8
    if cc_major == 8:
        return 4, 2
    return 2, 2


def check_sms(n: int, total_sms: int, cc_major: int = 9) -> int:
    """Validate one SM count for a card with ``total_sms`` SMs; returns it or raises ValueError saying why."""
    if not isinstance(n, int) or isinstance(n, bool):
        raise ValueError(f"--sms: expected whole numbers, got {n!r}")
    if n < 1:
        raise ValueError(f"--sms {n}: a green context needs at least 1 SM")
    if n > total_sms:
        raise ValueError(f"--sms {n}: this GPU has only {total_sms} SMs")
    lo, step = sm_granularity(cc_major)
    if n < lo or n % step:
        arch = "Hopper and newer (compute capability 9.x+)" if cc_major >= 9 else f"compute capability {cc_major}.x"
        down = max(lo, n - n % step)
        up = max(lo, n + (step - n % step) % step)
        options = sorted({x for x in (down, up) if x <= total_sms})
        raise ValueError(f"--sms {n}: {arch} allocates SMs in multiples of {step} (at least {lo}); use "
                         f"{' or '.join(map(str, options))}")
    return n


def parse_sms(text: str) -> list[int | None]:
    """'8,16,full' -> [8, 16, None] (None = the whole GPU, no green context). Order kept, duplicates dropped."""
    out: list[int | None] = []
    for part in str(text).split(","):
        part = part.strip().lower()
        if not part:
            continue
        if part in ("full", "all", "0"):
            val = None
        else:
            try:
                val = int(part)
            except ValueError:
                raise ValueError(f"--sms: expected SM counts like 8,16 (or 'full'), got {part!r}") from None
            if val < 1:
                raise ValueError(f"--sms {val}: a green context needs at least 1 SM")
        if val not in out:
            out.append(val)
    if not out:
        raise ValueError("--sms: no SM count given")
    return out


def device_sms(device_index: int = 0) -> tuple[int, int]:
    """(SM count, compute capability major) of CUDA device ``device_index``."""
    import torch

    p = torch.cuda.get_device_properties(device_index)
    return p.multi_processor_count, p.major


def validate(sms: list[int | None], device_index: int = 0) -> None:
    """Check every count against the actual card (raises ValueError)."""
    if os.environ.get(FAKE_ENV):
        return
    import torch

    if not torch.cuda.is_available():
        raise ValueError("--sms needs a CUDA GPU (green contexts); this machine has none")
    total, major = device_sms(device_index)
    for n in sms:
        if n is not None:
            check_sms(n, total, major)


def enter(n: int, device_index: int = 0) -> dict:
    """Make a green context of ``n`` SMs current for the rest of this process. Call before any CUDA work."""
    global _ACTIVE
    info = dict(sms=n, device=device_index, not_emulated=NOT_EMULATED)
    if n in JETSON_EQUIVALENTS:
        info["equivalent"] = JETSON_EQUIVALENTS[n]
    if os.environ.get(FAKE_ENV):
        info["fake"] = True
        return info
    if _ACTIVE is not None:
        raise RuntimeError("a green context is already active in this process: run each SM count in its own "
                           "process (dualfuse bench --sms does)")
    import warnings

    import torch
    from torch.cuda.green_contexts import GreenContext

    total, major = device_sms(device_index)
    check_sms(n, total, major)
    torch.cuda.set_device(device_index)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # set_context is deprecated in favour of ctx.Stream(); see below
        ctx = GreenContext.create(num_sms=n, device_id=device_index)
        # set_context (not a green-context stream) because the executors create their own streams, graphs and
        # allocations: with the green context current for the whole process, all of them live inside it.
        ctx.set_context()
    _ACTIVE = ctx
    from .kernels._utils import set_sm_limit

    set_sm_limit(n)  # the device properties still say all SMs: the kernels' grid heuristics must plan for n
    info.update(total_sms=total, capability_major=major)
    return info


# --------------------------------------------------------------------------------------------- orchestration

def child_argv(argv: list[str], n: int | None, json_path: str) -> list[str]:
    """The bench arguments for one SM count: ``argv`` without --sms / --json, plus --json PATH and (for a green
    context) --_in-green-context N."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--sms", "--json"):
            skip = True
            continue
        if a.startswith("--sms=") or a.startswith("--json="):
            continue
        out.append(a)
    out += ["--json", json_path]
    if n is not None:
        out += ["--_in-green-context", str(n)]
    return out


def run_sweep(bench_argv: list[str], sms: list[int | None], json_out: str | None = None, *,
              python: str = sys.executable, env: dict | None = None, module: str = "dualfuse.cli",
              echo=None) -> tuple[int, dict]:
    """Run ``dualfuse bench`` once per SM count, each in its own process; merge the JSON results.

    ``bench_argv`` are the arguments after ``bench`` (with or without --sms / --json). Returns (exit code: the
    worst child's, merged dict). The merged document has ``schema: dualfuse.bench-sweep/1`` and ``runs``: one
    bench result per SM count (``sms``: N or null for the whole GPU), in the order asked.
    """
    echo = echo or (lambda s: print(s, flush=True))
    runs, worst = [], 0
    with tempfile.TemporaryDirectory(prefix="dualfuse-sms-") as tmp:
        for n in sms:
            path = os.path.join(tmp, f"sms-{n or 'full'}.json")
            cmd = [python, "-m", module, "bench"] + child_argv(bench_argv, n, path)
            label = f"{n} SMs" + (f" {JETSON_EQUIVALENTS[n]}" if n in JETSON_EQUIVALENTS else "") if n else "full GPU"
            echo(f"── {label} (own process; {NOT_EMULATED}) ──")
            proc = subprocess.run(cmd, env=env)
            worst = max(worst, proc.returncode)
            if os.path.isfile(path):
                with open(path) as f:
                    doc = json.load(f)
                doc["sms"] = n
                runs.append(doc)
            else:
                runs.append(dict(sms=n, status="error", message=f"child exited {proc.returncode} without results",
                                 results=[]))
                worst = max(worst, 1)
    first = next((r for r in runs if r.get("results")), runs[0] if runs else {})
    merged = dict(schema="dualfuse.bench-sweep/1", sms=sms, not_emulated=NOT_EMULATED,
                  card=first.get("card"), model=first.get("model"), resolved=first.get("resolved"), runs=runs)
    if json_out:
        write_json(json_out, merged)
    return worst, merged


def summary_lines(merged: dict) -> list[str]:
    """One line per executor: median ms at each SM count (for the parent's closing summary)."""
    runs = merged.get("runs", [])
    names: list[str] = []
    for r in runs:
        for row in r.get("results", []):
            if row["executor"] not in names:
                names.append(row["executor"])
    head = "executor".ljust(16) + "".join(f"{(str(r['sms']) + ' SMs') if r['sms'] else 'full':>12}" for r in runs)
    lines = [head]
    for name in names:
        cells = []
        for r in runs:
            row = next((x for x in r.get("results", []) if x["executor"] == name), None)
            ms = row.get("median_ms") if row else None
            cells.append(f"{ms:>9.3f} ms" if isinstance(ms, (int, float)) else f"{(row or {}).get('status', '—'):>12}")
        lines.append(name.ljust(16) + "".join(cells))
    return lines

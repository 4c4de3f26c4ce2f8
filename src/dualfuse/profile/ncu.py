"""Nsight Compute on the top kernels of a profile (``dualfuse profile --ncu``): achieved occupancy, SM and DRAM
throughput.

``python -m dualfuse.profile.ncu --model M --executor E ...`` is the target process handed to ``ncu``: warmed-up
forwards, then the profiled one inside an NVTX range ``dfncu``.
"""
from __future__ import annotations

import csv
import io
import re
import shutil
import subprocess
import sys

import torch

from ..timing import sync

NCU_METRICS = {
    "sm__warps_active.avg.pct_of_peak_sustained_active": "achieved_occupancy_pct",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed": "sm_throughput_pct",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": "dram_throughput_pct",
}


def run_ncu(target_argv: list[str], kernel_names: list[str], *, timeout: int = 900) -> dict:
    """Nsight Compute on the named kernels of one forward of ``python -m dualfuse.profile.ncu <argv>``.
    Returns {status: ok|missing|denied|failed, message, kernels: [{name, metrics...}]}."""
    exe = shutil.which("ncu")
    if exe is None:
        return dict(status="missing", kernels=[],
                    message="Nsight Compute (ncu) is not installed or not on PATH: occupancy and SM/DRAM "
                            "throughput were not measured (install Nsight Compute, or add it to PATH)")
    if not kernel_names:
        return dict(status="failed", kernels=[], message="no kernels to hand to ncu")
    regex = "|".join(re.escape(base_name(n))[:200] for n in kernel_names)
    cmd = [exe, "--clock-control", "none", "--metrics", ",".join(NCU_METRICS), "--nvtx", "--nvtx-include",
           "dfncu/", "--kernel-name", f"regex:{regex}", "--csv", "--page", "raw",
           sys.executable, "-m", "dualfuse.profile.ncu", *target_argv]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(status="failed", kernels=[], message=f"ncu timed out after {timeout} s", command=cmd)
    text = proc.stdout + "\n" + proc.stderr
    if "ERR_NVGPUCTRPERM" in text or "permission" in text.lower() and "counters" in text.lower():
        return dict(status="denied", kernels=[], command=cmd,
                    message="ncu is installed but may not read the GPU performance counters here "
                            "(ERR_NVGPUCTRPERM): run as root or enable non-admin profiling "
                            "(NVreg_RestrictProfilingToAdminUsers=0)")
    rows = parse_ncu_csv(proc.stdout)
    if proc.returncode != 0 and not rows:
        tail = "\n".join(text.strip().splitlines()[-6:])
        return dict(status="failed", kernels=[], command=cmd, message=f"ncu exited with {proc.returncode}: {tail}")
    if not rows:
        return dict(status="failed", kernels=[], command=cmd,
                    message="ncu ran but profiled no matching kernel (names differ between ncu and the profiler?)")
    return dict(status="ok", kernels=rows, command=cmd, message=f"ncu profiled {len(rows)} kernel launches")


def base_name(name: str) -> str:
    """The function name ncu matches by default: no return type, namespaces kept, no template/arguments."""
    s = name.replace("(anonymous namespace)::", "")
    if s.startswith("void "):
        s = s[5:]
    depth, out = 0, []
    for ch in s:
        if ch in "<(":
            if depth == 0 and ch == "(":
                break
            depth += 1
            continue
        if ch in ">)":
            depth -= 1
            continue
        if depth == 0:
            out.append(ch)
    base = "".join(out).strip()
    return base.split("::")[-1] or name


def parse_ncu_csv(text: str) -> list[dict]:
    """Rows of ``ncu --csv --page raw``: kernel name + the NCU_METRICS columns (unit row skipped)."""
    lines = [ln for ln in text.splitlines() if ln.startswith('"')]
    if not lines:
        return []
    reader = csv.reader(io.StringIO("\n".join(lines)))
    rows = list(reader)
    header = rows[0]
    try:
        name_col = header.index("Kernel Name")
    except ValueError:
        return []
    cols = {m: header.index(m) for m in NCU_METRICS if m in header}
    out = []
    for r in rows[1:]:
        if len(r) != len(header) or r[name_col] in ("", "Kernel Name"):
            continue
        d = dict(name=r[name_col])
        ok = False
        for m, c in cols.items():
            try:
                d[NCU_METRICS[m]] = float(r[c].replace(",", ""))
                ok = True
            except ValueError:
                d[NCU_METRICS[m]] = None
        if ok:
            out.append(d)
    return out


def main(argv=None) -> int:
    """Target process for ncu: warm up, then one forward inside the NVTX range 'dfncu'."""
    import argparse

    from .. import executors, presets
    from ..bench import call_towers, random_inputs

    p = argparse.ArgumentParser(prog="python -m dualfuse.profile.ncu")
    p.add_argument("--model", required=True)
    p.add_argument("--arch")
    p.add_argument("--executor", required=True)
    p.add_argument("--dtype")
    p.add_argument("--device")
    p.add_argument("--image-batch", type=int, default=1)
    p.add_argument("--text-batch", type=int, default=1)
    p.add_argument("--text-length", type=int)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    model = presets.load(a.model, seed=a.seed, arch=a.arch)
    ex = executors.get(a.executor, model, dtype=a.dtype, device=a.device)
    (px, ids), = random_inputs(ex.spec, a.image_batch, a.text_batch, a.text_length, sets=1, seed=a.seed,
                               device=ex.device, dtype=ex.dtype)
    with torch.no_grad():
        for _ in range(max(a.warmup, 1)):
            call_towers(ex, px, ids)
        sync(ex.device)
        torch.cuda.nvtx.range_push("dfncu")
        call_towers(ex, px, ids)
        sync(ex.device)
        torch.cuda.nvtx.range_pop()
    return 0


if __name__ == "__main__":  # pragma: no cover - the ncu target process
    sys.exit(main())

"""The card's ceilings for the roofline: device-to-device copy bandwidth and large-matmul FLOP/s, measured once
per card and dtype and cached in ``~/.cache/dualfuse/ceilings-<card>.json`` (``DUALFUSE_CACHE_DIR`` overrides the
folder)."""
from __future__ import annotations

import json
import os
import time

import torch

from ..environment import cpu_name
from ..timing import best_of, sync
from ..util import slug, write_json


def cache_dir() -> str:
    return os.environ.get("DUALFUSE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dualfuse")


def card_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "CPU " + cpu_name()


def ceilings(device, dtype, *, measure: bool = True, refresh: bool = False, directory: str | None = None) -> dict:
    """Peak bandwidth (bytes/s, device-to-device copy counting read + write) and matmul FLOP/s of ``dtype``
    on this card: from the cache, else measured (a second or two on a GPU, well under one on a CPU) and cached.
    ``measure=False`` and nothing cached: the values are None ('unknown')."""
    device = torch.device(device)
    card = card_name(device)
    dname = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype, str(dtype))
    folder = directory or cache_dir()
    path = os.path.join(folder, f"ceilings-{slug(card, lower=True, default='unknown')}.json")
    data = {}
    if os.path.exists(path) and not refresh:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            data = {}
    out = dict(card=card, dtype=dname, peak_bw=data.get("peak_bw"), peak_flops=(data.get("matmul") or {}).get(dname),
               source="cache", path=path)
    if out["peak_bw"] is not None and out["peak_flops"] is not None:
        return out
    if not measure:
        out.update(source="unknown")
        return out
    try:
        if out["peak_bw"] is None:
            data["peak_bw"] = out["peak_bw"] = _measure_bw(device)
        data.setdefault("matmul", {})[dname] = out["peak_flops"] = _measure_matmul(device, dtype)
        data.update(card=card, measured=time.strftime("%Y-%m-%dT%H:%M:%S"), torch=torch.__version__,
                    method="bandwidth: copy_ of a large buffer, bytes read + written / time; matmul: square "
                           "torch.mm, 2n^3 / time; best of several runs")
        out["source"] = "measured"
        try:
            write_json(path, data, default=None)
        except OSError as e:
            out["cache_error"] = str(e)
    except Exception as e:  # noqa: BLE001 - ceilings are optional
        out.update(source=f"unknown (measurement failed: {type(e).__name__}: {e})")
    return out


def _measure_bw(device) -> float:
    nbytes = (1 << 30) if device.type == "cuda" else (32 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    t = best_of(lambda: dst.copy_(src), device, 10 if device.type == "cuda" else 5)
    return 2.0 * nbytes / t


def _measure_matmul(device, dtype) -> float:
    if device.type == "cuda":
        n = 8192 if dtype in (torch.float16, torch.bfloat16) else 4096
        reps = 10
    else:
        n, reps = 512, 5
        if dtype != torch.float32:
            n = 256
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.mm(a, b)
    sync(device)
    t = best_of(lambda: torch.mm(a, b, out=c), device, reps)
    return 2.0 * n ** 3 / t

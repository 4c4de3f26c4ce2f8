"""What a figure needs next to it: the card (name, kind, SMs), the CPU, software versions, host and date."""
from __future__ import annotations

import datetime as _dt
import os
import platform

import torch


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(mod)
    except Exception:  # noqa: BLE001
        return None


def environment(device: torch.device) -> dict:
    """Card name and kind (H100/H200/...), software versions, host, date: what a benchmark figure needs."""
    env = dict(date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               torch=torch.__version__, triton=_version("triton"), transformers=_version("transformers"),
               open_clip=_version("open_clip_torch"), dualfuse=_version("dualfuse"), python=platform.python_version(),
               host=platform.node(), cpu=cpu_name(), cpu_count=os.cpu_count(), device=str(device))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = torch.cuda.get_device_name(device)
        env.update(card=name, card_kind=next((k for k in ("H200", "H100", "A100", "L4", "L40S") if k in name), name),
                   sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    else:
        env.update(card=f"CPU: {env['cpu']}", card_kind="cpu", cuda=None)
    return env

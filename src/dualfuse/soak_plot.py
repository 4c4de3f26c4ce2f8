"""The soak's plot (dualfuse.soak): memory over calls (CUDA allocated and reserved, host RSS; bad calls marked) and
every call's latency per shape. Needs matplotlib (the ``plot`` extra)."""
from __future__ import annotations

from pathlib import Path


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    xs = [m["call"] for m in result["samples"]]
    for key, name in (("allocated", "CUDA allocated"), ("reserved", "CUDA reserved"), ("rss", "host RSS")):
        if result["samples"] and key in result["samples"][0]:
            a.plot(xs, [m[key] / 2**20 for m in result["samples"]], label=name)
    a.set_ylabel("MiB")
    a.ticklabel_format(axis="y", useOffset=False, style="plain")
    for bad in result["bad_calls"]:
        a.axvline(bad["call"], color="0.85", lw=0.5, zorder=0)
    a.legend()
    a.set_title(f"soak: {result['calls']} calls, {result['executor']} on {result['device_name']}")
    labels = sorted({c[1] for c in result["per_call"]})
    for label in labels:
        pts = [(c[0], c[2]) for c in result["per_call"] if c[1] == label]
        b.scatter([p[0] for p in pts], [p[1] for p in pts], s=3, label=label)
    b.set_yscale("log")
    b.set_ylabel("ms per call")
    b.set_xlabel("call")
    b.legend(fontsize=6, ncol=3, markerscale=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

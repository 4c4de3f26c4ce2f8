"""Plots from profile data (the dicts written to profile.json): a kernel timeline in tower lanes, and a roofline.

matplotlib with the Agg backend (no display needed). Both functions take a list of profiles so that
``--compare`` draws the executors one above the other (timeline) or side by side in one chart (roofline).
"""
from __future__ import annotations

CLASS_COLORS = {"gemm": "#1f77b4", "attention": "#ff7f0e", "norm": "#2ca02c", "elementwise": "#9467bd",
                "embed": "#8c564b", "other": "#7f7f7f"}
LANES = ("vision", "text", "host", "unattributed", "idle")
MARKERS = ("o", "s", "^", "D", "v", "P")


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def pick_iteration(profile: dict) -> int:
    """The profiled forward with the median wall time (what the timeline shows)."""
    per = profile["analysis"]["per_iteration"]
    if not per:
        return 0
    order = sorted(range(len(per)), key=lambda i: per[i]["wall_us"])
    return order[len(order) // 2]


def timeline(profiles: list[dict], path: str, *, iteration: int | None = None) -> str:
    """Kernels of one forward on a time axis: lanes vision, text (a kernel serving both towers is drawn in both,
    hatched), host, and the idle gaps; colours by op class. One panel per profile, same time scale."""
    plt = _plt()
    from matplotlib.patches import Patch

    panels = []
    for p in profiles:
        it = pick_iteration(p) if iteration is None else iteration
        lo, hi = p["windows"][it] if p["windows"] else (0.0, 1.0)
        evs = [e for e in p["events"] if e["iteration"] == it]
        lanes = [ln for ln in LANES if ln in ("vision", "text", "idle") or any(e["tower"] == ln for e in evs)]
        panels.append((p, it, lo, hi, evs, lanes))
    span = max((hi - lo) for _, _, lo, hi, _, _ in panels) or 1.0
    scale, xunit = (1e3, "ms") if span > 20000 else (1.0, "µs")
    heights = [len(lanes) for *_, lanes in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(14, 1.0 + 0.55 * sum(heights) + 0.5 * len(panels)),
                             squeeze=False, gridspec_kw=dict(height_ratios=heights))
    unit = "kernels"
    for ax, (p, it, lo, hi, evs, lanes) in zip(axes[:, 0], panels):
        if p.get("device_type") != "cuda":
            unit = "ops"
        y = {ln: len(lanes) - 1 - k for k, ln in enumerate(lanes)}
        for e in evs:
            targets = ("vision", "text") if e["tower"] == "both" else (e["tower"],)
            for t in targets:
                if t not in y:
                    continue
                ax.broken_barh([(e["start_us"] - lo, max(e["dur_us"], span * 1e-4))], (y[t] - 0.4, 0.8),
                               facecolors=CLASS_COLORS.get(e["op_class"], "#7f7f7f"), edgecolors="none",
                               hatch="///" if e["tower"] == "both" else None)
        holes = _idle(evs, lo, hi)
        if "idle" in y:
            ax.broken_barh([(s - lo, e - s) for s, e in holes], (y["idle"] - 0.4, 0.8), facecolors="#d62728",
                           alpha=0.35, edgecolors="none")
        ax.set_yticks([y[ln] for ln in lanes])
        ax.set_yticklabels(lanes)
        ax.set_xlim(0, span)
        ax.set_ylim(-0.6, len(lanes) - 0.4)
        s = p["analysis"]["per_iteration"][it] if p["analysis"]["per_iteration"] else {}
        ax.set_title(f"{p['executor']} · {p['model']} · forward {it}: wall {s.get('wall_us', 0) / scale:.4g} {xunit}, "
                     f"{s.get('kernels', 0)} {unit}, busy {100 * s.get('busy_frac', 0):.0f}%, "
                     f"overlap {100 * s.get('overlap_frac', 0):.0f}%", fontsize=10, loc="left")
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel(f"{xunit} since the call started")
    if scale != 1.0:
        from matplotlib.ticker import FuncFormatter

        for ax in axes[:, 0]:
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / scale:g}"))
    handles = [Patch(facecolor=c, label=k) for k, c in CLASS_COLORS.items()]
    handles += [Patch(facecolor="white", edgecolor="black", hatch="///", label="both towers (fused)"),
                Patch(facecolor="#d62728", alpha=0.35, label="idle")]
    fig.legend(handles=handles, loc="upper right", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _idle(evs, lo, hi):
    from .analyze import clip, union

    busy = clip(union((e["start_us"], e["start_us"] + e["dur_us"]) for e in evs), lo, hi)
    holes, cur = [], lo
    for s, e in busy:
        if s > cur:
            holes.append((cur, s))
        cur = max(cur, e)
    if cur < hi:
        holes.append((cur, hi))
    return holes


def roofline(profiles: list[dict], path: str) -> str:
    """Log-log roofline: the measured bandwidth and matmul ceilings, one dot per op class (per profile)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    xs, ys = [], []
    ceil = next((p["ceilings"] for p in profiles if p.get("ceilings", {}).get("peak_bw")), None)
    for k, p in enumerate(profiles):
        for r in p["analysis"]["op_classes"]:
            if not r.get("intensity") or not r.get("flops_per_s"):
                continue
            x, y = r["intensity"], r["flops_per_s"]
            xs.append(x)
            ys.append(y)
            ax.scatter([x], [y], s=30 + 400 * r["share"], color=CLASS_COLORS.get(r["op_class"], "#7f7f7f"),
                       marker=MARKERS[k % len(MARKERS)], edgecolors="black", linewidths=0.5, zorder=3,
                       label=f"{p['executor']}: {r['op_class']}")
            ax.annotate(f"{r['op_class']}" + (f" ({p['executor']})" if len(profiles) > 1 else ""), (x, y),
                        textcoords="offset points", xytext=(6, 4), fontsize=8)
    if ceil:
        bw, fl = ceil["peak_bw"], ceil["peak_flops"]
        lo = min(xs + [fl / bw]) / 10 if xs else fl / bw / 100
        hi = max(xs + [fl / bw]) * 10 if xs else fl / bw * 100
        grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
        ax.plot(grid, [min(fl, g * bw) for g in grid], color="black", lw=1.5)
        ax.axvline(fl / bw, color="gray", ls=":", lw=1)
        ax.text(lo * 1.2, fl * 1.15, f"{ceil.get('dtype', '')} matmul {_si(fl)}FLOP/s", fontsize=8)
        ax.text(lo * 1.2, lo * bw * 1.6, f"bandwidth {_si(bw)}B/s", fontsize=8)
        ax.set_ylim(min(ys + [lo * bw]) / 3 if ys else lo * bw, fl * 3)
    else:
        ax.text(0.5, 0.95, "ceilings unknown (not measured)", transform=ax.transAxes, ha="center", fontsize=9)
    if xs or ceil:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("achieved FLOP/s")
    card = profiles[0].get("card", "")
    ax.set_title(f"roofline · {card} · {profiles[0].get('dtype', '')}", fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    if xs and len(profiles) > 1:
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _si(x: float) -> str:
    for prefix, div in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.3g} {prefix}"
    return f"{x:.3g} "

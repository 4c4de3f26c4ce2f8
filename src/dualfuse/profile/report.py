"""report.md of ``dualfuse profile``: rendered from the data written to profile.json.

``render(profile)`` for one executor, ``render_compare(comparison)`` for ``--compare``; ``rerender(dir)`` rebuilds
report.md and the plots of a saved run from its profile.json without profiling again.
"""
from __future__ import annotations

import json
import os

from ..util import format_number

DEVICE_WORDS = {"cuda": ("kernel", "kernels", "GPU"), "cpu": ("op", "ops", "CPU")}


# --------------------------------------------------------------------------------------------- formatting

def _num(x, fmt="{:.1f}", none="—"):
    return format_number(x, fmt, none)


def _pct(x, none="—"):
    return _num(None if x is None else 100 * x, "{:.0f}%", none)


def _rate(x, unit):
    if x is None:
        return "—"
    for prefix, div in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def short_name(name: str, limit: int = 70) -> str:
    """A kernel name for a table: no return type, template arguments or parameter list; at most ``limit``."""
    s = name.strip().replace("(anonymous namespace)::", "")
    if s.startswith("void "):
        s = s[5:]
    out, depth = [], 0
    for ch in s:
        if ch == "<":
            depth += 1
            if depth == 1:
                out.append("<…>")
            continue
        if ch == ">":
            depth = max(depth - 1, 0)
            continue
        if ch == "(" and depth == 0:
            break
        if depth == 0:
            out.append(ch)
    s = "".join(out).replace("<…><…>", "<…>")
    if len(s) > limit:
        s = s[: limit - 1] + "…"
    return s


def _cell(s) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(headers) - 1)
    sep = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- sections

def _setup_line(p: dict) -> str:
    bits = [f"{p['iters']} profiled forward(s) after {p['warmup']} warm-up",
            f"image batch {p['image_batch']}, text batch {p['text_batch']} × {p['text_len']} tokens",
            p["dtype"], p.get("card") or p["device"]]
    if p.get("executor_notes"):
        bits.append(f"{p['executor']}: {p['executor_notes']}")
    env = p.get("environment") or {}
    if env.get("torch"):
        bits.append(f"torch {env['torch']}")
    if env.get("date"):
        bits.append(env["date"])
    return " · ".join(bits)


def _timeline_rows(p: dict) -> list[list]:
    s = p["analysis"]["summary"]
    one, many, dev = DEVICE_WORDS.get(p["device_type"], DEVICE_WORDS["cuda"])
    lat = p.get("latency") or {}
    rows = [
        ["wall time of a profiled forward", f"{_num(s.get('wall_us'))} µs"],
        [f"{many} per forward", _num(s.get("kernels"), "{:.0f}")],
        [f"{dev} busy (union of {many})", f"{_num(s.get('busy_us'))} µs ({_pct(s.get('busy_frac'))})"],
        [f"{dev} idle", f"{_num(s.get('idle_us'))} µs ({_pct(s.get('idle_frac'))}): before the first {one} "
                        f"{_num(s.get('lead_us'))} µs, gaps {_num(s.get('gap_total_us'))} µs, "
                        f"after the last {_num(s.get('tail_us'))} µs"],
        ["gaps between busy intervals", f"{_num(s.get('gaps'), '{:.0f}')}, largest {_num(s.get('gap_largest_us'))} µs, "
                                        f"mean {_num(s.get('gap_mean_us'), '{:.2f}')} µs"],
        ["towers overlap (both towers in flight)", f"{_num(s.get('overlap_us'))} µs ({_pct(s.get('overlap_frac'))} of "
                                                   f"the wall)"],
        ["… of which separate vision and text kernels at once", f"{_num(s.get('concurrent_us'))} µs"],
        [f"… of which fused {many} serving both towers", f"{_num(s.get('fused_us'))} µs"],
        [f"sum of {many} durations", f"{_num(s.get('kernel_sum_us'))} µs"],
    ]
    if lat:
        rows.append(["latency without profiler or labels", f"{_num(lat.get('median_ms'), '{:.3f}')} ms median, "
                                                           f"p90 {_num(lat.get('p90_ms'), '{:.3f}')} ms "
                                                           f"({lat.get('runs')} runs, {lat.get('timer')})"])
    if (p.get("floor") or {}).get("line"):  # dualfuse.floors.profile_floor: share of the card's floor reached
        rows.append(["device floor", p["floor"]["line"]])
    return rows


def _tower_table(p):
    rows = [[r["tower"], _num(r["kernels"], "{:.0f}"), _num(r["time_us"]), _pct(r["share"]), _num(r["gflops"], "{:.4g}"),
             _num(r["mbytes"], "{:.4g}")] for r in p["analysis"]["towers"]]
    _, many, _ = DEVICE_WORDS.get(p["device_type"], DEVICE_WORDS["cuda"])
    return _table(["tower", many, "time µs", "share", "GFLOP", "MB"], rows)


def _layer_table(p):
    _, many, _ = DEVICE_WORDS.get(p["device_type"], DEVICE_WORDS["cuda"])
    rows = [[r["tower"], r["layer"], _num(r["kernels"], "{:.0f}"), _num(r["time_us"]), _pct(r["share"])]
            for r in p["analysis"]["layers"]]
    return _table(["tower", "layer", many, "time µs", "share"], rows, "llrrr")


def _op_table(p, limit=20):
    _, many, _ = DEVICE_WORDS.get(p["device_type"], DEVICE_WORDS["cuda"])
    rows = [[r["tower"], r["op"], _num(r["kernels"], "{:.0f}"), _num(r["time_us"]), _pct(r["share"])]
            for r in p["analysis"]["ops"][:limit]]
    return _table(["tower", "op (all layers)", many, "time µs", "share"], rows, "llrrr")


def _top_table(p, ncu: dict | None = None):
    one, _, _ = DEVICE_WORDS.get(p["device_type"], DEVICE_WORDS["cuda"])
    rows = []
    ncu_by = {}
    if ncu and ncu.get("status") == "ok":
        for k in ncu.get("kernels", []):
            ncu_by.setdefault(k["name"], []).append(k)
    for i, r in enumerate(p["analysis"]["top_kernels"], 1):
        blocks = "—" if r["blocks_min"] is None else (str(r["blocks_min"]) if r["blocks_min"] == r["blocks_max"]
                                                       else f"{r['blocks_min']}–{r['blocks_max']}")
        row = [i, short_name(r["name"]), _num(r["calls"], "{:.0f}"), _num(r["time_us"]), _num(r["mean_us"], "{:.2f}"),
               _pct(r["share"]), r["op_class"], ",".join(r["towers"]), blocks]
        if ncu_by:
            m = _ncu_match(r["name"], ncu_by)
            row += [_num(_avg(m, "achieved_occupancy_pct"), "{:.0f}%"), _num(_avg(m, "sm_throughput_pct"), "{:.0f}%"),
                    _num(_avg(m, "dram_throughput_pct"), "{:.0f}%")]
        rows.append(row)
    headers = ["#", one, "calls", "time µs", "mean µs", "share", "class", "towers", "blocks"]
    if ncu_by:
        headers += ["occupancy", "SM thr.", "DRAM thr."]
    return _table(headers, rows, "rlrrrrllr" + "rrr" * bool(ncu_by))


def _avg(rows, key):
    xs = [r[key] for r in rows or [] if r.get(key) is not None]
    return sum(xs) / len(xs) if xs else None


def _ncu_match(name: str, by: dict):
    from .ncu import base_name

    base = base_name(name)
    for k, v in by.items():
        if k == name or base_name(k) == base or base in k:
            return v
    return None


def _class_table(p):
    c = p.get("ceilings") or {}
    gpu = p.get("device_type", "cuda") == "cuda"
    rows = []
    for r in p["analysis"]["op_classes"]:
        rows.append([r["op_class"], _num(r["time_us"]), _pct(r["share"]), _num(r["gflops"], "{:.4g}"),
                     _num(r["mbytes"], "{:.4g}"), _rate(r["flops_per_s"], "FLOP/s"), _pct(r["flops_frac"]),
                     _rate(r["bytes_per_s"], "B/s"), _pct(r["bw_frac"]), _num(r["intensity"], "{:.3g}"),
                     r["bound"] if gpu else "n/a", _pct(r["roof_frac"]) if gpu else "—", _pct(r["coverage"])])
    head = ["class", "time µs", "share", "GFLOP", "MB", "achieved FLOP/s", "of peak", "achieved B/s", "of peak",
            "FLOP/B", "roofline", "of roof", "cost known"]
    text = _table(head, rows, "lrrrrrrrrrlrr")
    if c.get("peak_bw") and c.get("peak_flops"):
        ceil = (f"Ceilings ({c.get('source')}, {c.get('card')}): bandwidth {_rate(c['peak_bw'], 'B/s')} "
                f"(copy, read + write), {c.get('dtype')} matmul {_rate(c['peak_flops'], 'FLOP/s')}; ridge point "
                f"{c['peak_flops'] / c['peak_bw']:.3g} FLOP/B.")
    else:
        ceil = f"Ceilings unknown ({c.get('source', 'not measured')}): no roofline tags."
    if not gpu:
        ceil = ("**No GPU: roofline not applicable.** CPU ops (and Triton interpreter runs) are timed, not held "
                "against a roofline; the achieved rates are shown for reference. " + ceil.replace(
                    "Ceilings (", "CPU ceilings (", 1))
    note = ("FLOPs and bytes come from the spec (the plan's cost model: weights + activations read and written "
            "once) for the plan's steps, and from recorded input shapes for other ops (activations, residual "
            "adds, copies). 'of roof' is the achieved rate over what the roofline allows at that intensity; "
            "'cost known' is the share of the class's time whose FLOPs/bytes are known.")
    return f"{ceil}\n\n{text}\n\n{note}"


def _underfilled(p):
    sm = p.get("sm_count")
    if p["device_type"] != "cuda":
        return "CPU run: no SMs; this table is for GPU runs."
    if not sm:
        return "SM count unknown."
    rows = [[short_name(r["name"]), r["blocks"], _num(r["calls"], "{:.0f}"), _num(r["time_us"]), _pct(r["sm_fill"]),
             ",".join(r["towers"])] for r in p["analysis"]["underfilled"][:25]]
    if not rows:
        return f"None: every kernel launched at least {sm} blocks (or its grid is unknown)."
    n = len(p["analysis"]["underfilled"])
    head = f"{n} kernel/grid combination(s) launch fewer blocks than the {sm} SMs"
    return head + (" (top 25 by time):" if n > 25 else ":") + "\n\n" + _table(
        ["kernel", "blocks", "calls", "time µs", "SMs used", "towers"], rows, "lrrrrl")


def _ncu_section(ncu: dict | None) -> str:
    if not ncu:
        return ""
    msg = ncu.get("message", "")
    if ncu.get("status") != "ok":
        return f"\n## Nsight Compute\n\n**Not available:** {msg}\n"
    rows = [[short_name(k["name"]), _num(k.get("achieved_occupancy_pct"), "{:.1f}%"),
             _num(k.get("sm_throughput_pct"), "{:.1f}%"), _num(k.get("dram_throughput_pct"), "{:.1f}%")]
            for k in ncu["kernels"]]
    return ("\n## Nsight Compute\n\n" + msg + " (`--clock-control none`, one forward after warm-up).\n\n"
            + _table(["kernel", "achieved occupancy", "SM throughput", "DRAM throughput"], rows) + "\n")


def _attribution(p):
    a = p.get("attribution") or {}
    counts = p["analysis"].get("attribution", {})
    _, many, _ = DEVICE_WORDS.get(p["device_type"], DEVICE_WORDS["cuda"])
    lines = [f"Method: {a.get('method', '?')}.",
             f"{many.capitalize()} per forward by tower: " + ", ".join(f"{k} {v:.0f}" for k, v in counts.items()) + "."]
    un = counts.get("unattributed", 0)
    lines.append(f"**{un:.0f} {many} per forward are unattributed.**" if un else f"Every {many[:-1]} is attributed.")
    if p["device_type"] != "cuda":
        lines.append("On CPU the 'kernels' are the top-level compute ops inside the labels (an op is split into its "
                     "children when they cover most of its time; view/metadata ops are not work); 'idle' is Python "
                     "and dispatcher time between them.")
    lines.append("'host' is work the executor does outside the towers: input checks, copies into static buffers, "
                 "output copies.")
    for n in a.get("notes", []):
        lines.append(f"- {n}")
    return "\n\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:])


# --------------------------------------------------------------------------------------------- reports

def render(p: dict, *, images: bool = True) -> str:
    """report.md of one profile."""
    s = p["analysis"]
    out = [f"# dualfuse profile — {p['model']} · {p['executor']} · {p['dtype']} · {p.get('card') or p['device']}", "",
           f"**Verdict.** {s['verdict']}", "", _setup_line(p), ""]
    if p.get("command"):
        out += [f"`{p['command']}`", ""]
    out += ["## Timeline (median over the profiled forwards)", "", _table(["", "value"], _timeline_rows(p), "ll"), ""]
    if images and p.get("files", {}).get("timeline"):
        out += [f"![timeline]({os.path.basename(p['files']['timeline'])})", ""]
    out += ["## Per tower", "", _tower_table(p), "",
            "## Per layer", "", "Layer '-' is work outside the blocks (embeddings, final norms, pooling, projections, "
            "host work); a fused kernel pairing different blocks shows as 'v3/t1'.", "", _layer_table(p), "",
            "## Per op, summed over layers", "", _op_table(p), "",
            "## Top kernels by time", "", _top_table(p, p.get("ncu")), "",
            "## Op classes against the roofline", "", _class_table(p), ""]
    if images and p.get("files", {}).get("roofline"):
        out += [f"![roofline]({os.path.basename(p['files']['roofline'])})", ""]
    out += ["## Under-filled launches", "", _underfilled(p), ""]
    nc = _ncu_section(p.get("ncu"))
    if nc:
        out += [nc]
    out += ["## Attribution", "", _attribution(p), ""]
    files = p.get("files") or {}
    if files:
        out += ["## Files", ""]
        for k, v in files.items():
            extra = " — open in https://ui.perfetto.dev (or chrome://tracing)" if k == "trace" else ""
            out.append(f"- `{os.path.basename(v)}`: {k}{extra}")
        out.append("")
    return "\n".join(out)


COMPARE_ROWS = [
    ("latency without profiler (median ms)", lambda p: _num((p.get("latency") or {}).get("median_ms"), "{:.3f}")),
    ("wall of a profiled forward (µs)", lambda p: _num(p["analysis"]["summary"].get("wall_us"))),
    ("kernels / ops per forward", lambda p: _num(p["analysis"]["summary"].get("kernels"), "{:.0f}")),
    ("busy", lambda p: _pct(p["analysis"]["summary"].get("busy_frac"))),
    ("idle", lambda p: _pct(p["analysis"]["summary"].get("idle_frac"))),
    ("busy time (µs)", lambda p: _num(p["analysis"]["summary"].get("busy_us"))),
    ("gaps: count", lambda p: _num(p["analysis"]["summary"].get("gaps"), "{:.0f}")),
    ("gaps: total (µs)", lambda p: _num(p["analysis"]["summary"].get("gap_total_us"))),
    ("gaps: largest (µs)", lambda p: _num(p["analysis"]["summary"].get("gap_largest_us"))),
    ("towers overlap (of the wall)", lambda p: _pct(p["analysis"]["summary"].get("overlap_frac"))),
    ("fused kernels serving both towers (µs)", lambda p: _num(p["analysis"]["summary"].get("fused_us"))),
    ("verdict", lambda p: _verdict_tag(p["analysis"]["verdict"])),
]


def _verdict_tag(verdict: str) -> str:
    """The verdict's leading tag ("launch-bound", "busy (no GPU: roofline not applicable)")."""
    depth = 0
    for i, ch in enumerate(verdict):
        depth += ch == "("
        depth -= ch == ")"
        if ch == ":" and depth == 0:
            return verdict[:i]
    return verdict


def compare_rows(profiles: list[dict]) -> list[dict]:
    """The side-by-side numbers, as data (profile.json of a comparison keeps them)."""
    out = []
    for name, fn in COMPARE_ROWS:
        out.append(dict(metric=name, **{p["executor"]: fn(p) for p in profiles}))
    base = profiles[0]
    base_ms = (base.get("latency") or {}).get("median_ms")
    if base_ms:  # the same ratio as bench's: baseline median / this median, bigger is better
        def speedup(p):
            ms = (p.get("latency") or {}).get("median_ms")
            return _num(base_ms / ms, "{:.2f}×") if ms else "—"
        out.insert(1, dict(metric=f"speedup vs {base['executor']} × (its median / this median; bigger is better)",
                           **{p["executor"]: speedup(p) for p in profiles}))
    return out


def compare_verdict(profiles: list[dict]) -> str:
    a, b = profiles[0], profiles[1]
    la, lb = (a.get("latency") or {}).get("median_ms"), (b.get("latency") or {}).get("median_ms")
    wa, wb = a["analysis"]["summary"].get("wall_us"), b["analysis"]["summary"].get("wall_us")
    ka, kb = a["analysis"]["summary"].get("kernels"), b["analysis"]["summary"].get("kernels")
    if la and lb:
        faster, slower, ratio = (b, a, la / lb) if lb < la else (a, b, lb / la)
        what = f"{faster['executor']} is {ratio:.2f}× faster than {slower['executor']} (unprofiled latency " \
               f"{min(la, lb):.3f} vs {max(la, lb):.3f} ms)"
    else:
        faster, slower = (b, a) if (wb or 0) < (wa or 0) else (a, b)
        what = f"{faster['executor']} has the shorter profiled forward"
    many = DEVICE_WORDS.get(a["device_type"], DEVICE_WORDS["cuda"])[1]
    return (f"{what}; {a['executor']} runs {ka:.0f} {many} per forward, {b['executor']} {kb:.0f}. "
            f"{a['executor']} — {a['analysis']['verdict']} {b['executor']} — {b['analysis']['verdict']}")


def render_compare(c: dict, *, images: bool = True) -> str:
    """report.md comparing profiles side by side, then each profile's main tables."""
    ps = c["profiles"]
    names = [p["executor"] for p in ps]
    p0 = ps[0]
    out = [f"# dualfuse profile — {p0['model']}: {' vs '.join(names)} · {p0['dtype']} · {p0.get('card') or p0['device']}",
           "", f"**Verdict.** {c.get('verdict') or compare_verdict(ps)}", "", _setup_line(p0), ""]
    if c.get("command"):
        out += [f"`{c['command']}`", ""]
    rows = [[r["metric"]] + [r[n] for n in names] for r in c.get("comparison") or compare_rows(ps)]
    out += ["## Side by side", "", _table(["", *names], rows, "l" + "r" * len(names)), ""]
    files = c.get("files") or {}
    if images and files.get("timeline"):
        out += [f"![timeline]({os.path.basename(files['timeline'])})", ""]
    if images and files.get("roofline"):
        out += [f"![roofline]({os.path.basename(files['roofline'])})", ""]
    for p in ps:
        out += [f"## {p['executor']}", ""]
        if p.get("executor_notes"):
            out += [f"Runs as: {p['executor_notes']}.", ""]
        out += [f"**Verdict.** {p['analysis']['verdict']}", "",
                "### Timeline", "", _table(["", "value"], _timeline_rows(p), "ll"), "",
                "### Per tower", "", _tower_table(p), "",
                "### Per layer", "", _layer_table(p), "",
                "### Top kernels", "", _top_table(p, p.get("ncu")), "",
                "### Op classes against the roofline", "", _class_table(p), "",
                "### Under-filled launches", "", _underfilled(p), ""]
        nc = _ncu_section(p.get("ncu"))
        if nc:
            out += [nc.replace("\n## ", "\n### ")]
        out += ["### Attribution", "", _attribution(p), ""]
    if files:
        out += ["## Files", ""]
        for k, v in files.items():
            extra = " — open in https://ui.perfetto.dev" if k.startswith("trace") else ""
            out.append(f"- `{os.path.basename(v)}`: {k}{extra}")
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------- re-rendering

def rerender(path: str, *, plots: bool = True, out: str | None = None) -> str:
    """Re-render report.md (and the plots) of a saved run from its profile.json (or the folder holding it),
    without profiling again; returns the report's path."""
    if os.path.isdir(path):
        path = os.path.join(path, "profile.json")
    with open(path) as f:
        data = json.load(f)
    folder = os.path.dirname(os.path.abspath(path))
    compare = data.get("schema", "").startswith("dualfuse.profile.compare")
    profiles = data["profiles"] if compare else [data]
    if plots:
        from . import plot

        files = data.setdefault("files", {})
        files["timeline"] = os.path.basename(plot.timeline(profiles, os.path.join(folder, "timeline.png")))
        files["roofline"] = os.path.basename(plot.roofline(profiles, os.path.join(folder, "roofline.png")))
    out = out or os.path.join(folder, "report.md")
    with open(out, "w") as f:
        f.write(render_compare(data) if compare else render(data))
    return out

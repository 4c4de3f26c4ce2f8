"""`dualfuse report`: one Markdown page with plots from saved `dualfuse bench` / `dualfuse eval` JSON files.

    dualfuse report --json b1.json b32.json sms.json eval.json --out report/

Reads bench results (``dualfuse.bench/1``; several batches of one model make the latency-per-batch plot), SM
sweeps (``dualfuse.bench-sweep/1`` from ``bench --sms``) and eval results (``dualfuse.eval/1``) and writes
``DIR/report.md`` with PNG plots beside it: latency per executor per batch, speedup vs the best stock executor,
energy (J/inference, images/s/W) when measured, SM-limited latency, and accuracy parity. Files that can't be read
are listed at the top of the page, not fatal. Figures come only from the given files: each run's card, date and
command are shown next to them. Python: :func:`build_report`; the command line is ``dualfuse.cli.report``.
"""
from __future__ import annotations

import json
import math
import os
from collections import OrderedDict

from .bench import best_stock
from .util import format_number, slug

NOT_EMULATED = ("green contexts limit SMs only: memory bandwidth, clocks, L2 size and power limits stay those of "
                "the big card")


# --------------------------------------------------------------------------------------------- loading

def load_runs(paths: list[str]) -> tuple[list[dict], list[dict], list[str]]:
    """(bench runs, eval docs, problems). Sweeps are flattened into bench runs carrying ``sms``."""
    bench, evals, problems = [], [], []
    for p in paths:
        try:
            with open(p) as f:
                doc = json.load(f)
        except (OSError, ValueError) as e:
            problems.append(f"{p}: cannot read ({type(e).__name__}: {e})")
            continue
        schema = str(doc.get("schema", "")) if isinstance(doc, dict) else ""
        if schema.startswith("dualfuse.bench-sweep"):
            for r in doc.get("runs", []):
                r = dict(r)
                r.setdefault("_file", p)
                r["_sweep"] = True
                if r.get("results"):
                    bench.append(r)
                else:
                    problems.append(f"{p}: SM count {r.get('sms')}: {r.get('message', 'no results')}")
        elif schema.startswith("dualfuse.bench"):
            doc["_file"] = p
            gc = doc.get("green_context") or {}
            doc.setdefault("sms", gc.get("sms"))
            bench.append(doc)
        elif schema.startswith("dualfuse.eval"):
            doc["_file"] = p
            evals.append(doc)
        else:
            problems.append(f"{p}: not a dualfuse bench/eval result (schema {schema or 'missing'})")
    return bench, evals, problems


def clean_command(command: str) -> str:
    """A recorded command as the user typed it: without private flags (``--_name [VALUE]``, passed between
    dualfuse's own processes) and without a --json path into a temporary folder (older files recorded the
    ``bench --sms`` children's own command lines)."""
    import shlex
    import tempfile

    try:
        words = shlex.split(command)
    except ValueError:
        return command
    tmp = os.path.join(os.path.realpath(tempfile.gettempdir()), "")
    out, i = [], 0
    while i < len(words):
        w = words[i]
        if w.startswith("--_"):
            i += 1 if "=" in w else 2
            continue
        if w == "--json" and i + 1 < len(words):
            path = words[i + 1]
            if "dualfuse-sms-" in path or (os.path.isabs(path) and os.path.realpath(path).startswith(tmp)) or path.startswith("/tmp/"):
                i += 2
                continue
        out.append(w)
        i += 1
    return shlex.join(out)


def _resolved(run: dict) -> dict:
    return run.get("resolved") or {}


def _model(run: dict) -> str:
    r = _resolved(run)
    m = r.get("model") or run.get("model")
    if isinstance(m, dict):
        m = m.get("name") or "?"
    return str(m)


def _batch(run: dict) -> tuple[int, int]:
    r = _resolved(run)
    return int(r.get("image_batch") or 0), int(r.get("text_batch") or 0)


def _batch_label(b: tuple[int, int]) -> str:
    i, t = b
    return f"B={i}" if i == t else f"img {i} + txt {t}"


def _ok(row: dict) -> bool:
    return row.get("status", "ok") == "ok" and isinstance(row.get("median_ms"), (int, float))


def _num(x, fmt="{:.3f}"):
    return format_number(x, fmt)


# --------------------------------------------------------------------------------------------- plots

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bar(path, labels, series: dict, ylabel, title, log=False, hline=None):
    """Grouped bars: series name -> values aligned with labels."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(labels) * max(1, len(series)) ** 0.5 + 2), 3.6))
    n = max(1, len(series))
    w = 0.8 / n
    for k, (name, vals) in enumerate(series.items()):
        xs = [i + (k - (n - 1) / 2) * w for i in range(len(labels))]
        ax.bar(xs, [v if v is not None else 0 for v in vals], width=w, label=name)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if log:
        ax.set_yscale("log")
    if hline is not None:
        ax.axhline(hline, color="k", lw=0.8, ls="--")
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _lines(path, xs_label, series: dict, ylabel, title, logx=False, logy=False):
    """series name -> list of (x, y)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, pts in series.items():
        pts = sorted(p for p in pts if p[1] is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel(xs_label)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- sections

def _executors(runs: list[dict]) -> list[str]:
    names: list[str] = []
    for r in runs:
        for row in r.get("results", []):
            if row["executor"] not in names:
                names.append(row["executor"])
    return names


def _row(run, name):
    return next((x for x in run.get("results", []) if x.get("executor") == name), None)


def _best_stock_ms(run) -> float | None:
    best = best_stock(run.get("results", []))
    return best["median_ms"] if best is not None else None


def _group_full(bench):
    """Full-GPU bench runs grouped by (model, card, dtype) -> {batch: run} (latest file wins per batch)."""
    groups: "OrderedDict[tuple, OrderedDict]" = OrderedDict()
    for r in bench:
        if r.get("sms"):
            continue
        key = (_model(r), str(r.get("card")), str(_resolved(r).get("dtype")))
        g = groups.setdefault(key, OrderedDict())
        old = g.get(_batch(r))
        if old is None or old.get("_sweep") or not r.get("_sweep"):  # a plain bench run beats a sweep's full run
            g[_batch(r)] = r
    return groups


def section_runs(bench, evals) -> list[str]:
    out = ["## Runs", "", "| file | kind | model | card | dtype | batch | SMs | date |", "|---|---|---|---|---|---|---|---|"]
    for r in bench:
        res = _resolved(r)
        out.append(f"| `{os.path.basename(r['_file'])}` | bench | {_model(r)} | {r.get('card', '—')} | "
                   f"{res.get('dtype', '—')} | {_batch_label(_batch(r))} | {r.get('sms') or 'full'} | "
                   f"{r.get('date') or (r.get('environment') or {}).get('date', '—')} |")
    for e in evals:
        out.append(f"| `{os.path.basename(e['_file'])}` | eval | {e.get('model')} | {e.get('card', '—')} | "
                   f"{e.get('dtype', '—')} | {(e.get('data') or {}).get('images', '—')} images | full | "
                   f"{e.get('date', '—')} |")
    cmds = sorted({clean_command(r["command"]) for r in bench + evals if r.get("command")})
    if cmds:
        out += ["", "Commands:", ""] + [f"- `{c}`" for c in cmds]
    return out + [""]


def section_latency(bench, outdir) -> list[str]:
    groups = _group_full(bench)
    if not groups:
        return []
    out = ["## Latency per executor per batch", ""]
    for (model, card, dtype), by_batch in groups.items():
        by_batch = OrderedDict(sorted(by_batch.items()))
        runs = list(by_batch.values())
        batches = list(by_batch.keys())
        names = _executors(runs)
        out += [f"### {model} · {dtype} · {card}", "",
                "median ms (p90) per call, both towers; lower is better", "",
                "| executor | " + " | ".join(_batch_label(b) for b in batches) + " |",
                "|---|" + "---:|" * len(batches)]
        for name in names:
            cells = []
            for r in runs:
                row = _row(r, name)
                if row and _ok(row):
                    cells.append(f"{_num(row['median_ms'])} ({_num(row.get('p90_ms'))})")
                else:
                    cells.append((row or {}).get("status", "—"))
            stock = "" if all((_row(r, name) or {}).get("stock", True) for r in runs) else " †"
            out.append(f"| {name}{stock} | " + " | ".join(cells) + " |")
        stem = slug(f"{model}-{dtype}-{card}", lower=True, limit=60)
        img = f"latency-{stem}.png"
        if len(batches) > 1 and all(b[0] == b[1] for b in batches):
            series = {n: [(b[0], (_row(r, n) or {}).get("median_ms") if _ok(_row(r, n) or {}) else None)
                          for b, r in by_batch.items()] for n in names}
            _lines(os.path.join(outdir, img), "batch", series, "median ms", f"{model} {dtype} — latency",
                   logx=True, logy=True)
        else:
            series = {n: [(_row(r, n) or {}).get("median_ms") if _ok(_row(r, n) or {}) else None for r in runs]
                      for n in names}
            _bar(os.path.join(outdir, img), [_batch_label(b) for b in batches], series, "median ms",
                 f"{model} {dtype} — latency", log=True)
        out += ["", f"![latency]({img})", ""]
        # speedup vs the best stock executor of the same run
        spd = {}
        for n in names:
            vals = []
            for r in runs:
                row, best = _row(r, n), _best_stock_ms(r)
                vals.append(best / row["median_ms"] if row and _ok(row) and best else None)
            spd[n] = vals
        img2 = f"speedup-{stem}.png"
        _bar(os.path.join(outdir, img2), [_batch_label(b) for b in batches], spd, "speedup vs best stock ×",
             f"{model} {dtype} — speedup vs best stock executor (same run; bigger is better)", hline=1.0)
        out += ["speedup vs best stock × = best stock median / this median, same run; bigger is better "
                "(> 1: faster than every stock executor)", "",
                "| executor | " + " | ".join(_batch_label(b) for b in batches) + " |",
                "|---|" + "---:|" * len(batches)]
        out += [f"| {n} | " + " | ".join(_num(v, "{:.2f}×") for v in spd[n]) + " |" for n in names]
        out += ["", f"![speedup]({img2})", ""]
    out.append("† = not a stock executor")
    return out + [""]


def section_energy(bench, outdir) -> list[str]:
    rows = [(r, {**(x.get("energy") or {}), **{k: v for k, v in x.items() if v is not None}})
            for r in bench for x in r.get("results", []) if isinstance(x.get("joules_per_inference"), (int, float))]
    if not rows:
        return []
    out = ["## Energy", "", "whole-board energy over a loop of the timed calls (idle power included)", "",
           "| run | executor | J/inference | images/s/W | avg W | idle W | source |", "|---|---|---:|---:|---:|---:|---|"]
    labels, jpi, ipw = [], [], []
    for r, x in rows:
        run = f"{_model(r)} {_batch_label(_batch(r))}" + (f" {r['sms']} SMs" if r.get("sms") else "")
        out.append(f"| {run} | {x['executor']} | {_num(x['joules_per_inference'], '{:.4g}')} | "
                   f"{_num(x.get('images_per_s_per_w'), '{:.3g}')} | {_num(x.get('avg_power_w'), '{:.1f}')} | "
                   f"{_num(x.get('idle_power_w'), '{:.1f}')} | {x.get('energy_source', '—')} |")
        labels.append(f"{x['executor']}\n{run}")
        jpi.append(x["joules_per_inference"])
        ipw.append(x.get("images_per_s_per_w"))
    _bar(os.path.join(outdir, "energy.png"), labels, {"J/inference": jpi}, "J per inference", "Energy per inference",
         log=True)
    out += ["", "![energy](energy.png)", ""]
    if any(v is not None for v in ipw):
        _bar(os.path.join(outdir, "efficiency.png"), labels, {"images/s/W": ipw}, "images/s per W",
             "Images per second per watt (higher is better)")
        out += ["![efficiency](efficiency.png)", ""]
    notes = [x.get("energy_note") or r.get("energy_note") for r, x in rows]
    notes = [n for n in notes if n]
    if notes:
        out += [f"note: {n}" for n in sorted(set(notes))] + [""]
    return out


def section_sms(bench, outdir) -> list[str]:
    limited = [r for r in bench if r.get("sms")]
    if not limited:
        return []
    out = ["## SM-limited runs (green contexts)", "",
           f"**Not emulated:** {NOT_EMULATED}. 8 SMs ≈ Jetson Orin Nano / Orin NX, 16 SMs ≈ Jetson AGX Orin in "
           "SM count only.", ""]
    groups: "OrderedDict[tuple, list]" = OrderedDict()
    for r in bench:
        key = (_model(r), str(r.get("card")), str(_resolved(r).get("dtype")), _batch(r))
        groups.setdefault(key, []).append(r)
    for (model, card, dtype, b), runs in groups.items():
        if not any(r.get("sms") for r in runs):
            continue
        # one run per SM count; for the full GPU prefer the sweep's own run (the same process tree as the limited ones)
        by_sms: dict = {}
        for r in runs:
            old = by_sms.get(r.get("sms"))
            if old is None or (r.get("_sweep") and not old.get("_sweep")):
                by_sms[r.get("sms")] = r
        runs = sorted(by_sms.values(), key=lambda r: r.get("sms") or 10**6)
        names = _executors(runs)
        cols = [f"{r['sms']} SMs" if r.get("sms") else "full" for r in runs]
        out += [f"### {model} · {dtype} · {_batch_label(b)} · {card}", "",
                "| executor | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
        series = {}
        full_sms = next((r.get("environment", {}).get("sm_count") for r in runs if r.get("environment")), None)
        for n in names:
            cells, pts = [], []
            for r in runs:
                row = _row(r, n)
                ok = row is not None and _ok(row)
                cells.append(_num(row["median_ms"]) if ok else (row or {}).get("status", "—"))
                x = r.get("sms") or full_sms
                if ok and x:
                    pts.append((x, row["median_ms"]))
            out.append(f"| {n} | " + " | ".join(cells) + " |")
            series[n] = pts
        img = f"sms-{slug(f'{model}-{dtype}-{b[0]}-{b[1]}-{card}', lower=True, limit=60)}.png"
        _lines(os.path.join(outdir, img), "SMs", series, "median ms", f"{model} {dtype} {_batch_label(b)} — "
               "latency vs SMs", logx=True, logy=True)
        out += ["", f"![SM-limited]({img})", ""]
    return out


def section_accuracy(evals, outdir) -> list[str]:
    if not evals:
        return []
    out = ["## Accuracy parity (vs the fp32 reference)", "",
           "| run | executor | img cos min | txt cos min | max rel err (img / txt) | zero-shot top-1 / top-5 agr. | "
           "decisive top-1 | R@1 / R@5 agr. | verdict |",
           "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    labels, cos_gap, rel = [], [], []
    for e in evals:
        run = f"{e.get('model')} {e.get('dtype')} {(e.get('data') or {}).get('kind', '')}"
        for r in e.get("results", []):
            if r.get("status", "ok") != "ok":
                out.append(f"| {run} | {r['executor']} | — | — | — | — | — | — | {r.get('status')}: "
                           f"{r.get('message', '')[:80]} |")
                continue
            img, txt, zs, ret = r["image"], r["text"], r["zero_shot"], r["retrieval"]["agreement"]
            verdict = "PASS" if r.get("passed") else "FAIL: " + "; ".join(r.get("failures", []))[:120]
            out.append(f"| {run} | {r['executor']} | {_num(img['min_cosine'], '{:.6f}')} | "
                       f"{_num(txt['min_cosine'], '{:.6f}')} | {_num(img['max_rel_err'], '{:.2e}')} / "
                       f"{_num(txt['max_rel_err'], '{:.2e}')} | {_num(zs['top1_agreement'], '{:.3f}')} / "
                       f"{_num(zs['top5_agreement'], '{:.3f}')} | {_num(zs.get('decisive_top1_agreement'), '{:.3f}')} "
                       f"({zs.get('decisive', '—')}) | {_num(ret.get('R@1'), '{:.3f}')} / "
                       f"{_num(ret.get('R@5'), '{:.3f}')} | {verdict} |")
            labels.append(f"{r['executor']}\n{e.get('model')} {e.get('dtype')}")
            cos_gap.append(max(1 - min(img["min_cosine"], txt["min_cosine"]), 1e-12)
                           if all(isinstance(v, (int, float)) and not math.isnan(v)
                                  for v in (img["min_cosine"], txt["min_cosine"])) else None)
            rel.append(max(img["max_rel_err"], txt["max_rel_err"]))
        acc = [(r["executor"], r["zero_shot_accuracy"]) for r in e.get("results", []) if r.get("zero_shot_accuracy")]
        if acc:
            out += ["", f"True zero-shot accuracy on {run} ({e.get('weights', '')} weights; random weights give "
                    "chance level):", ""]
            out += [f"- {n}: top-1 {_num(a['executor'].get('top1'), '{:.3f}')} vs reference "
                    f"{_num(a['reference'].get('top1'), '{:.3f}')}" for n, a in acc]
            out.append("")
    if labels:
        crit = evals[0].get("criteria") or {}
        _bar(os.path.join(outdir, "accuracy.png"), labels, {"1 − min cosine": cos_gap, "max rel. error": rel},
             "(log)", "Parity with the fp32 reference (lower is better)", log=True,
             hline=crit.get("max_rel_err"))
        out += ["", "![accuracy](accuracy.png)", "",
                "dashed line: the relative-error tolerance; pass needs cosine ≥ 0.999 (1 − cos ≤ 1e-3)", ""]
    return out


def build_report(paths: list[str], outdir: str, title: str = "dualfuse report") -> str:
    """Write ``outdir/report.md`` (+ PNGs); returns the Markdown path."""
    os.makedirs(outdir, exist_ok=True)
    bench, evals, problems = load_runs(paths)
    lines = [f"# {title}", ""]
    if problems:
        lines += ["**Skipped:**", ""] + [f"- {p}" for p in problems] + [""]
    if not bench and not evals:
        lines += ["No usable results in the given files.", ""]
    else:
        lines += section_runs(bench, evals)
        lines += section_latency(bench, outdir)
        lines += section_energy(bench, outdir)
        lines += section_sms(bench, outdir)
        lines += section_accuracy(evals, outdir)
    path = os.path.join(outdir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    return path

"""The edge-regime stand-in on one SM count: probe, every executor and weight format, A/B rows, shares, GEMM tuning.

    for sms in 8 16 0; do python benchmarks/standin.py --sms $sms --out $OUT/standin; done   # one process per count
    python benchmarks/standin.py --sms 8 --tune --out $OUT/standin      # GEMM config sweep (8 and 16 SMs)
    python benchmarks/standin.py --merge $OUT/standin                    # tuned table + shares into the package
    python benchmarks/standin.py --smoke                                 # CPU: the pipeline on a tiny model

Every weight byte of every row is read from pinned host memory mapped into the GPU (dualfuse.hostmem): the fused
executor's packed fp16 / int8 / fp8 weights and scales, and the source model's parameters for eager, graph, compile
and torchao (int8 weight-only + torch.compile, where ``torchao`` imports). ``--sms N`` runs in a CUDA green context of
N SMs (8: Orin Nano / NX, 16: AGX Orin; 0: the full card), entered before anything touches CUDA; a green context
per process (dualfuse.green says why).

In order, in one process:
(1) probe: the stream-read GB/s of a 256 MiB host-mapped buffer by a Triton kernel and by cuBLAS (``torch.mm`` of
    M = 1, 16, 64 rows by a host-mapped fp16 weight), each checked bit-identical to the same op on device memory,
    the device-memory ops timed beside; and the re-read probe (each block read by 2 or 4 programs at once, as the M
    tiles of one weight tile read it): whether such re-reads cross the link again. The Triton reading is the
    stand-in's bandwidth.
(2) cases (ViT-B/32 image-only B=1 and 1+1, SigLIP B/16 1+1, SigLIP so400m/14-384 image-only B=1), rows: fused fp16,
    int8, fp8 (sm_89+), graph, compile (reduce-overhead), eager, torchao int8 + compile; A/B rows for the GEMM configs
    (the full card's picks; the byte-bound model without its tall tiles, BLOCK_M 64), for the LayerNorm
    folding default on the no-PDL path (every fused row runs without PDL, as on an Orin, so folded by default;
    ``[no fold]`` turns it off, ``[PDL]`` is the big card's own path); ViT-B/32 1+1 also with the inputs in host
    memory. Each row: parity (min per-embedding cosine vs the fp32 reference forward, every input set), then
    median / p90 ms over ``--calls`` timed calls (CUDA events, L2 flushed before each, 4 input sets rotated), weight
    bytes per call and the share of the stand-in floor (weight bytes / the probe's bandwidth, over the median).
(3) shares of bandwidth per step kind (dualfuse.shares): the fused fp16 executor's stages timed one by one.
The table is printed last; JSON goes to ``--out``/standin-sms{N}[-TAG].json (shares to shares-sms{N}[-TAG].json),
rewritten after every case so that a run cut off by a time limit keeps the cases it finished. ``--rows`` keeps only the
named rows (``targets``: the rows the speed targets compare), ``--tag`` names the files of a run that covers a
subset, so that several runs of one SM count can sit in one folder.

``--tune``: for ViT-B/32's and SigLIP B/16's grouped GEMM launches at batch 1 (fp16 and int8 weights, host-mapped),
every config of the byte-bound candidates (kernels/gemm/regime.py) timed with a cold L2; the best per launch shape is
written to ``--out``/tune-sms{N}.json. ``--merge DIR`` joins the tune files into kernels/gemm/standin_gemm.json and
recomputes the shares over every run of the fewest SMs measured (8, else 16) into dualfuse/standin_shares.json (the
files the library reads).
"""
from __future__ import annotations

import argparse
import dataclasses
import contextlib
import gc
import glob
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
if "--smoke" in sys.argv[1:]:
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(HERE.parent / "src"))

CASES = {  # name: (preset, images, texts)
    "vit-b32 img": ("clip-vit-b-32", 1, 0),
    "vit-b32 1+1": ("clip-vit-b-32", 1, 1),
    "siglip-b16 1+1": ("siglip-base-patch16-224", 1, 1),
    "so400m img": ("siglip-so400m-patch14-384", 1, 0),
}
SMOKE_CASES = {"clip-tiny 1+1": ("clip-tiny", 1, 1), "clip-tiny img": ("clip-tiny", 1, 0)}
HOST_INPUTS_CASE = "vit-b32 1+1"
TUNE_MODELS = ("clip-vit-b-32", "siglip-base-patch16-224")


def _p90(xs):
    s = sorted(xs)
    return s[min(len(s) - 1, int(math.ceil(0.9 * len(s))) - 1)] if s else float("nan")


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".replace("\n", " ")[:300]


# --------------------------------------------------------------------------------------------- probe

def probe(args, torch):
    from dualfuse.hostmem import measure_weight_bandwidth

    readings = measure_weight_bandwidth(args.probe_mib * 2 ** 20, readers=("triton", "reread", "cublas"),
                                        cublas_m=(1, 16, 64), iters=10, device_too=True)
    for r in readings:
        print(f"  probe {r.reader:12s} {r.memory:6s} {r.gbps:8.1f} GB/s  identical to device: {r.identical}",
              flush=True)
    return [r.to_dict() for r in readings]


# --------------------------------------------------------------------------------------------- rows

def _row_specs(args, torch, case: str):
    """(row name, executor, build kwargs, weights for the byte count, inputs host?) of one case."""
    cap = torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)
    rows = [("fused fp16", "fused", {}, "fp16"), ("fused int8", "fused", {"weights": "int8"}, "int8"),
            # the full card's GEMM picks (latency model), pointer loads: what the byte-bound model changes
            ("fused fp16 [card picks]", "fused", {"gemm_config": {"tma": False}}, "fp16"),
            # the byte-bound model without its tall tiles: BLOCK_M 64 everywhere (its picks before them wherever a
            # launch has more than 32 rows, as in every case here)
            ("fused fp16 [BLOCK_M 64]", "fused", {"_standin_gemm": {"BLOCK_M": 64}}, "fp16")]
    if cap >= (8, 9):
        rows.append(("fused fp8", "fused", {"weights": "fp8"}, "fp8"))
    # the LayerNorm-folding default on the no-PDL path (every row runs without PDL, as an Orin does, so folded by
    # default), and the big card's own path (PDL on, so not folded) for reference
    rows += [("fused fp16 [no fold]", "fused", {"fold_ln": False}, "fp16"),
             ("fused fp16 [PDL]", "fused", {"pdl": True}, "fp16")]
    # attention blocks A/B (the default picks by programs per SM: 64 x 64 or 64 x 32, kernels/attention.py)
    rows += [(f"fused fp16 [attn {bm}x{bn}]", "fused", {"_attention": (bm, bn)}, "fp16")
             for bm, bn in ((32, 32), (64, 64), (64, 32))]
    if torch.cuda.is_available():
        rows.append(("graph", "graph", {}, "fp16"))
    if not args.no_compile:
        rows.append(("compile", "compile", {}, "fp16"))
    rows.append(("eager", "eager", {}, "fp16"))
    if not args.no_compile:
        rows.append(("torchao int8 compile", "torchao", {}, "int8"))
    out = [(n, e, kw, w, False) for n, e, kw, w in rows]
    if case == HOST_INPUTS_CASE and torch.cuda.is_available():
        out += [("fused fp16 [inputs host]", "fused", {}, "fp16", True), ("graph [inputs host]", "graph", {}, "fp16", True)]
    if args.rows:
        out = [r for r in out if r[0] in args.rows]
    return out


# the rows the stand-in's speed targets compare (--rows targets)
TARGET_ROWS = ("fused fp16", "fused int8", "fused fp8", "fused fp16 [BLOCK_M 64]", "fused fp16 [no fold]",
               "fused fp16 [PDL]", "graph", "compile", "eager", "torchao int8 compile")
ALL_ROWS = TARGET_ROWS + ("fused fp16 [card picks]", "fused fp16 [attn 32x32]", "fused fp16 [attn 64x64]",
                          "fused fp16 [attn 64x32]", "fused fp16 [inputs host]", "graph [inputs host]")


def parse_rows(text: str | None) -> tuple[str, ...] | None:
    """``--rows``: None (every row), ``targets``, or comma-separated row names; ValueError names the known ones."""
    if not text:
        return None
    if text.strip() == "targets":
        return TARGET_ROWS
    rows = tuple(r.strip() for r in text.split(",") if r.strip())
    bad = [r for r in rows if r not in ALL_ROWS]
    if bad:
        raise ValueError(f"unknown row(s) {bad}; expected 'targets' or names from {list(ALL_ROWS)}")
    return rows


@contextlib.contextmanager
def attention_blocks(blocks):
    """While active, fused runners built get attention launches of (BLOCK_M, BLOCK_N) = ``blocks`` (None: the
    default). The runner imports GroupedAttention when it builds (at an executor's first call of a shape)."""
    if blocks is None:
        yield
        return
    from dualfuse.kernels import attention as A

    original = A.GroupedAttention
    bm, bn = blocks

    class Fixed(original):
        def __init__(self, problems, **kw):
            super().__init__(problems, **{**kw, "block_m": bm, "block_n": bn})

    A.GroupedAttention = Fixed
    try:
        yield
    finally:
        A.GroupedAttention = original


def _build(torch, name, ex_name, kw, model, spec, dtype, device, stand_kw, placement):
    """An executor for one row, its weights placed; torchao: the compile executor's model quantized first."""
    from dualfuse import executors
    from dualfuse.hostmem import place_executor, place_module_params

    if ex_name == "torchao":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        ex = executors.get("compile", model, dtype=dtype, device=device, spec=spec)
        quantize_(ex.model, Int8WeightOnlyConfig())
        place_module_params(ex.model, placement)
        ex.notes = f"torchao int8 weight-only + torch.compile {ex.mode}"
        return ex
    over = kw.get("_standin_gemm")  # the stand-in's GEMM options with these keys changed
    if over is not None:
        kw = {k: v for k, v in kw.items() if k != "_standin_gemm"}
        kw["gemm_config"] = {**stand_kw["gemm_config"], **over}
    # the stand-in's options (GEMM configs, no PDL) where the row does not set its own
    extra = {k: v for k, v in stand_kw.items() if k not in kw} if ex_name == "fused" else {}
    ex = executors.get(ex_name, model, dtype=dtype, device=device, spec=spec, **{**kw, **extra})
    place_executor(ex, placement)
    return ex


def run_case(args, torch, case, preset, ni, nt, bandwidth, stand_kw, placement, device, dtype, checkpoint=None):
    """Every row of one case; ``checkpoint(rows)`` after each row (the caller saves what is done)."""
    from dualfuse import presets, reference
    from dualfuse.adapters import to_spec
    from dualfuse.bench import call_towers, random_inputs
    from dualfuse.hostmem import place_inputs
    from dualfuse.quantize import COSINE_MIN
    from dualfuse.timing import percentile, time_calls

    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    model = presets.load(preset, seed=0)
    spec = to_spec(model)
    towers = tuple(t for t, n in (("vision", ni), ("text", nt)) if n)
    inputs = random_inputs(spec, ni, nt, sets=4, seed=1, device=device, dtype=dtype)
    host_inputs = place_inputs(inputs, placement) if cuda else None
    ref_spec = spec.to(device=device, dtype=torch.float32)
    with torch.no_grad():
        refs = [(reference.encode_image(ref_spec, px.float()) if ni else None,
                 reference.encode_text(ref_spec, ids) if nt else None) for px, ids in inputs]
    del ref_spec
    from dualfuse.quantize import weight_bytes

    rows = []
    shares = None
    for name, ex_name, kw, fmt, on_host in _row_specs(args, torch, case):
        row = dict(case=case, row=name, executor=ex_name, weights=fmt, inputs="host" if on_host else "device",
                   status="ok")
        rows.append(row)
        ex = None
        blocks = kw.get("_attention")
        kw = {k: v for k, v in kw.items() if k != "_attention"}
        try:
            tb = time.perf_counter()
            ex = _build(torch, name, ex_name, kw, model, spec, dtype, device, stand_kw, placement)
            row["notes"] = getattr(ex, "notes", "")
            if hasattr(ex, "fold_ln"):  # the fused executor's path as it runs (PDL, folding), its options in full
                from dualfuse.kernels._utils import pdl_supported

                row.update(pdl=ex.pdl, pdl_active=bool(ex.pdl and pdl_supported(device)), fold_ln=ex.fold_ln,
                           config=ex.config.to_dict())
            if getattr(ex, "fallback", None) is not None:
                row["notes"] = f"FALLBACK: {ex.notes}"
            row["weight_bytes"] = int(weight_bytes(spec, fmt, dtype, towers)["total"])
            ins = host_inputs if on_host else inputs
            cos = []
            with torch.no_grad(), attention_blocks(blocks):
                for i, (px, ids) in enumerate(ins):
                    outs = call_towers(ex, px, ids)
                    for o, r in zip(outs, refs[i]):
                        if r is not None:
                            cos.append(torch.nn.functional.cosine_similarity(o.double().cpu(), r.double().cpu(),
                                                                             dim=-1).min().item())
                for i in range(args.warmup):
                    call_towers(ex, *ins[i % len(ins)])
            row["build_and_warm_s"] = time.perf_counter() - tb
            row["min_cosine"] = min(cos)
            row["cosine_pass"] = COSINE_MIN if fmt != "fp16" else 0.999
            row["cosine_ok"] = row["min_cosine"] >= row["cosine_pass"]
            with torch.no_grad():
                samples = time_calls(lambda i: call_towers(ex, *ins[i % len(ins)]), args.calls, device,
                                     flush_l2=cuda)
            row["samples_ms"] = samples
            row["median_ms"], row["p90_ms"] = percentile(samples, 50), _p90(samples)
            row["floor_ms"] = row["weight_bytes"] / bandwidth * 1e3 if bandwidth else None
            row["floor_share"] = row["floor_ms"] / row["median_ms"] if bandwidth else None
            if name == "fused fp16" and cuda and getattr(ex, "fallback", None) is None:
                shares = _stage_shares(ex, ni, nt, spec, bandwidth, row["median_ms"])
        except ImportError as e:
            row.update(status="unavailable", message=_short(e))
        except Exception as e:  # noqa: BLE001 - one failing row must not stop the others
            row.update(status="error", message=_short(e))
            traceback.print_exc()
        finally:
            ex = None
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        msg = (f"{row.get('median_ms', float('nan')):8.3f} ms  share {row.get('floor_share') or 0:5.1%}  "
               f"cos {row.get('min_cosine', float('nan')):.5f}" if row["status"] == "ok"
               else f"{row['status']}: {row.get('message', '')}")
        if row["status"] == "ok" and not row["cosine_ok"]:
            msg += f"  PARITY FAILED (< {row['cosine_pass']})"
        print(f"  {case:15s} {name:26s} {msg}", flush=True)
        if checkpoint is not None:
            checkpoint(rows)
    _ratios(rows)
    print(f"  {case}: {time.perf_counter() - t0:.0f} s", flush=True)
    return rows, shares


def _stage_shares(ex, ni, nt, spec, bandwidth, forward_ms):
    """Per kind (bytes, ms, share) of the fused fp16 forward's stages timed one by one, and under "forward" the
    whole forward's median with its bytes by kind and launch count (what the shares' forward scale needs)."""
    from dualfuse.shares import kind_bytes, measure_stage_shares

    text_len = spec.text.context_length if nt else None
    runner = ex.runner(ni, nt, spec.text.context_length)
    by_kind, launches = kind_bytes(spec, ni, nt, text_len, fold_ln=ex.fold_ln)
    return dict(kinds=measure_stage_shares(runner, bandwidth, iters=20),
                forward=dict(ms=forward_ms, bytes_by_kind=by_kind, launches=launches))


def shares_from_stages(stage: dict, bandwidth: float, source: dict):
    """BandwidthShares from the per-case stage timings (sum of floors / sum of times per kind, over every case), its
    forward scale from the cases' whole forwards; None without cases."""
    from dualfuse.shares import BandwidthShares, forward_scale

    if not stage:
        return None
    tot = {}
    for per in stage.values():
        for k, v in per["kinds"].items():
            b, ms = tot.get(k, (0.0, 0.0))
            tot[k] = (b + v["bytes"], ms + v["ms"])
    sh = BandwidthShares({k: b / bandwidth * 1e3 / ms for k, (b, ms) in tot.items() if ms > 0},
                         dict(source, bandwidth_gbps=round(bandwidth / 1e9, 1), cases=list(stage)))
    sh = dataclasses.replace(sh, scale=forward_scale([per["forward"] for per in stage.values()], bandwidth, sh))
    sh.source["scale_from"] = [dict(case=c, measured_ms=round(per["forward"]["ms"], 3)) for c, per in stage.items()]
    return sh


def _ratios(rows):
    """Beside each row: time vs fused fp16 and vs the best stock fp16 row (graph, compile, eager) of its case."""
    ok = {r["row"]: r for r in rows if r["status"] == "ok"}
    stock = [ok[n] for n in ("graph", "compile", "eager") if n in ok]
    best = min(stock, key=lambda r: r["median_ms"]) if stock else None
    f16 = ok.get("fused fp16")
    for r in ok.values():
        if f16:
            r["vs_fused_fp16"] = r["median_ms"] / f16["median_ms"]
        if best:
            r["vs_best_stock_fp16"] = r["median_ms"] / best["median_ms"]
            r["best_stock_fp16"] = best["row"]


# --------------------------------------------------------------------------------------------- tune

def _tile_config(cfg: dict) -> dict:
    """A GEMM launch config without what is not the tile's: the regime (the model that picked it) and the launch
    path (``pdl``: the runner sets it per launch; a tuned table must not carry it into runs with PDL on)."""
    return {k: v for k, v in cfg.items() if k not in ("regime", "pdl")}


def tune(args, torch, device, stand_kw, placement, sms):
    """Every byte-bound candidate config per grouped GEMM launch shape, cold L2; best per shape. The launches are
    taken from runners of the target's path (no PDL, LayerNorms folded) and timed as plain GEMMs of those shapes
    (without their folded LayerNorm, bias or residual): the table is keyed by shape only."""
    from dualfuse import executors, presets
    from dualfuse.adapters import to_spec
    from dualfuse.kernels.gemm import GroupedLinear, LinearProblem
    from dualfuse.kernels.gemm.regime import byte_bound_candidates, shape_key
    from dualfuse.hostmem import place_executor
    from dualfuse.timing import percentile, time_calls

    best: dict[str, dict] = {}
    measured = []
    for preset in (TUNE_MODELS if not args.smoke else ("clip-tiny",)):
        model = presets.load(preset, seed=0)
        spec = to_spec(model)
        for fmt in ("fp16", "int8"):
            ex = executors.get("fused", model, dtype=torch.float16 if device.type == "cuda" else torch.float32,
                               device=device, spec=spec, weights=None if fmt == "fp16" else fmt, **stand_kw)
            place_executor(ex, placement)
            runner = ex.runner(1, 1, spec.text.context_length)
            launches = []
            for op in runner.ops:
                if isinstance(op, GroupedLinear):
                    launches.append(op)
            seen = set()
            for op in launches:
                probs = [LinearProblem(p.x, p.weight, torch.empty(p.x.shape[0], p.weight.shape[0], dtype=p.x.dtype,
                                                                  device=device), weight_scale=p.weight_scale)
                         for p in op.problems]
                dims = [(p.x.shape[0], p.weight.shape[0], p.x.shape[1]) for p in probs]
                w_elt = max(p.weight.element_size() for p in probs)
                key = shape_key(dims, w_elt, sms)
                if key in seen:
                    continue
                seen.add(key)
                results = []
                cands = byte_bound_candidates(max(m for m, _, _ in dims), sms)
                model_pick = _tile_config(op.config)  # what the model picked in the runner
                cands.append(model_pick)
                for cfg in cands:
                    cfg = _tile_config(cfg)
                    try:
                        g = GroupedLinear(probs, config=cfg)
                        g()
                        us = percentile(time_calls(lambda i: g(), args.tune_calls, device,
                                                   flush_l2=device.type == "cuda"), 50) * 1e3
                        results.append((us, cfg, list(g.splits)))
                    except Exception as e:  # noqa: BLE001 - a config that does not fit is skipped
                        results.append((float("inf"), cfg, _short(e)))
                results.sort(key=lambda t: t[0])
                us, cfg, splits = results[0]
                model_us = next((u for u, c, _ in results if c == model_pick), float("nan"))
                wbytes = sum(n * k for _, n, k in dims) * w_elt
                print(f"  tune {key:40s} best {us:8.1f} µs ({wbytes / us / 1e3:6.1f} GB/s) "
                      f"BN {cfg['BLOCK_N']} BK {cfg['BLOCK_K']} st {cfg['num_stages']} w {cfg['num_warps']} "
                      f"splits {splits}; model's pick {model_us:8.1f} µs", flush=True)
                if math.isfinite(us):
                    best[key] = {k: v for k, v in cfg.items() if k not in ("num_sms", "tma")}
                measured.append(dict(key=key, model=preset, weights=fmt, weight_bytes=wbytes, best_us=us,
                                     model_pick_us=model_us, best=cfg, splits=splits,
                                     all=[dict(us=u, config=c, splits=s) for u, c, s in results]))
            ex = None
            gc.collect()
    return best, measured


def merge(out_dir: str, package_dir: str | os.PathLike | None = None) -> int:
    """tune-sms*.json -> kernels/gemm/standin_gemm.json; shares recomputed over every run of the fewest SMs measured
    (8, else 16, the full card last; one card; a case in two runs: the later one's) -> dualfuse/standin_shares.json.
    Returns 2 where those runs come from different cards."""
    src = Path(package_dir) if package_dir else HERE.parent / "src" / "dualfuse"
    configs, sources = {}, []
    for p in sorted(glob.glob(os.path.join(out_dir, "tune-sms*.json"))):
        with open(p) as f:
            doc = json.load(f)
        configs.update(doc["configs"])
        sources.append(doc["source"])
    if configs:
        (src / "kernels" / "gemm").mkdir(parents=True, exist_ok=True)
        with open(src / "kernels" / "gemm" / "standin_gemm.json", "w") as f:
            json.dump(dict(schema="dualfuse.standin-gemm/1", sources=sources, configs=configs), f, indent=1)
        print(f"{len(configs)} tuned configs -> {src / 'kernels' / 'gemm' / 'standin_gemm.json'}")
    # the fewest SMs measured (8: Orin Nano / NX; else 16: AGX Orin; the full card last), every run of that count
    # (tagged subsets included) joined: the shares are recomputed over all their cases; a case in two runs: the
    # later run's
    docs = []
    for p in sorted(glob.glob(os.path.join(out_dir, "standin-sms*.json"))):
        try:
            with open(p) as f:
                doc = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            print(f"merge: skipped {p}: unreadable ({_short(e)})")
            continue
        stage = doc.get("stage_shares") or {}
        if not all(isinstance(v, dict) and "kinds" in v and "forward" in v for v in stage.values()):
            print(f"merge: skipped {p}: its stage shares predate the per-kind format (no 'kinds' / 'forward')")
            continue
        if stage:
            docs.append(doc)
    if not docs:
        print(f"merge: no stand-in run with stage shares in {out_dir}; {src / 'standin_shares.json'} left as it is")
        return 0
    fewest = min((d["sms"] or 1 << 30) for d in docs)
    docs = sorted((d for d in docs if (d["sms"] or 1 << 30) == fewest), key=lambda d: d["env"]["date"])
    cards = sorted({d["env"]["card"] for d in docs})
    if len(cards) > 1:
        print(f"merge: refused: runs of {fewest} SMs from different cards {cards}; keep one card's runs in {out_dir}")
        return 2
    stage, per_case = {}, {}
    for d in docs:
        for c, per in d["stage_shares"].items():
            stage[c] = per
            per_case[c] = dict(date=d["env"]["date"], commit=d["env"].get("commit"),
                               bandwidth_gbps=round(d["bandwidth_gbps"], 1),
                               fold_ln=next((r.get("fold_ln") for r in d["rows"]
                                             if r["case"] == c and r["row"] == "fused fp16"), None))
    bandwidth = statistics.median(d["bandwidth_gbps"] for d in docs) * 1e9
    last = docs[-1]["env"]
    sh = shares_from_stages(stage, bandwidth, dict(card=cards[0], sms=docs[-1]["shares"]["source"]["sms"],
                                                   date=last["date"], commit=last.get("commit"), per_case=per_case))
    src.mkdir(parents=True, exist_ok=True)
    with open(src / "standin_shares.json", "w") as f:
        json.dump(sh.to_dict(), f, indent=1)
    print(f"shares {sh.to_dict()['shares']} from {sorted(stage)} -> {src / 'standin_shares.json'}")
    return 0


# --------------------------------------------------------------------------------------------- main

def print_table(doc):
    print()
    print(f"stand-in, {doc['sms'] or 'full card'} SMs, {doc['env']['card']} · weights host-mapped · measured weight "
          f"bandwidth {doc['bandwidth_gbps']:.1f} GB/s (Triton stream read) · {doc['env']['date']}")
    print(f"{'case':15s} {'row':26s} {'median ms':>10s} {'p90 ms':>8s} {'weight MB':>9s} {'floor share':>11s} "
          f"{'÷fused16':>8s} {'÷stock16':>8s} {'min cos':>9s}")
    for r in doc["rows"]:
        if r["status"] != "ok":
            print(f"{r['case']:15s} {r['row']:26s} {r['status']}: {r.get('message', '')[:80]}")
            continue
        print(f"{r['case']:15s} {r['row']:26s} {r['median_ms']:10.3f} {r['p90_ms']:8.3f} "
              f"{r['weight_bytes'] / 1e6:9.1f} {(r.get('floor_share') or float('nan')):11.1%} "
              f"{r.get('vs_fused_fp16', float('nan')):8.2f} {r.get('vs_best_stock_fp16', float('nan')):8.2f} "
              f"{r['min_cosine']:9.5f}{'' if r['cosine_ok'] else ' WRONG'}")
    if doc.get("shares"):
        print("shares of bandwidth per step kind (fused fp16): " +
              ", ".join(f"{k} {v:.0%}" for k, v in doc["shares"]["shares"].items()))
    from dualfuse.standin import IS_NOT
    print(f"note: {IS_NOT}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sms", type=int, default=8, help="green context SMs (0 = the full card; default 8)")
    ap.add_argument("--out", default="out/standin", help="output folder (default out/standin)")
    ap.add_argument("--cases", default=None, help=f"comma-separated subset of: {', '.join(CASES)}")
    ap.add_argument("--rows", default=None, help="'targets' or comma-separated row names (default: every row)")
    ap.add_argument("--tag", default="", help="file name suffix for a run of a subset (standin-sms8-TAG.json)")
    ap.add_argument("--calls", type=int, default=50, help="timed calls per row (default 50)")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up calls per row after the parity check")
    ap.add_argument("--probe-mib", type=int, default=256, help="probe buffer (default 256 MiB)")
    ap.add_argument("--no-compile", action="store_true", help="skip the compile and torchao rows (faster)")
    ap.add_argument("--tune", action="store_true", help="GEMM config sweep instead of the cases")
    ap.add_argument("--tune-calls", type=int, default=15, help="timed launches per config in --tune")
    ap.add_argument("--merge", metavar="DIR", help="write the package's tuned table and shares from DIR, then exit")
    ap.add_argument("--smoke", action="store_true", help="CPU: tiny model, interpreter, copy placement")
    args = ap.parse_args(argv)
    try:
        args.rows = parse_rows(args.rows)
    except ValueError as e:
        ap.error(str(e))
    if args.tag and not args.tag.replace("-", "").replace("_", "").isalnum():
        ap.error(f"--tag must be letters, digits, '-' or '_'; got {args.tag!r}")
    if args.merge:
        return merge(args.merge)
    green_info = None
    if args.sms and not args.smoke:
        from dualfuse import green  # before anything touches CUDA

        green_info = green.enter(args.sms)
    import torch
    import triton

    from dualfuse.kernels.gemm.regime import regime_for_target

    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    placement = "host" if cuda else "copy"
    env = dict(torch=torch.__version__, triton=triton.__version__, date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
               card=torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter)")
    # the commit as the caller names it (DUALFUSE_COMMIT; gpu_figures.sh passes it on): a copied work tree may carry
    # no .git, or an older one, so `git rev-parse` there can name the wrong commit
    env["commit"] = os.environ.get("DUALFUSE_COMMIT") or "unknown"
    os.makedirs(args.out, exist_ok=True)
    sms = args.sms or (torch.cuda.get_device_properties(0).multi_processor_count if cuda else 8)
    print(f"stand-in run: {env['card']}, {args.sms or 'all'} SMs, torch {env['torch']}, triton {env['triton']}",
          flush=True)
    probe_rows = probe(args, torch) if cuda else []
    bandwidth = next((p["gbps"] * 1e9 for p in probe_rows if p["reader"] == "triton" and p["memory"] == "host"), 50e9)
    # every SM count streams its weights over the link: the byte-bound GEMM model at the measured bandwidth
    # and launches without PDL, as on an Orin (sm_87): the fused executor then folds its LayerNorms (its no-PDL
    # default), the path the target runs (dualfuse.standin.fused_config does the same for bench / stream / profile)
    stand_kw = {"gemm_config": {"tma": False, "num_sms": sms,
                                "regime": regime_for_target("orin-nano", bandwidth=bandwidth)}, "pdl": False}
    suffix = f"sms{args.sms}" + (f"-{args.tag}" if args.tag else "")
    if args.tune:
        best, measured = tune(args, torch, device, stand_kw, placement, sms)
        path = os.path.join(args.out, f"tune-{suffix}.json")
        with open(path, "w") as f:
            json.dump(dict(source=dict(env, sms=sms, bandwidth_gbps=bandwidth / 1e9), configs=best,
                           measured=measured), f, indent=1)
        print(f"tuned configs: {path}")
        return 0
    cases = SMOKE_CASES if args.smoke else CASES
    if args.cases:
        wanted = [c.strip() for c in args.cases.split(",")]
        bad = [c for c in wanted if c not in cases]
        if bad:
            ap.error(f"unknown case(s) {bad}; expected from {list(cases)}")
        cases = {c: cases[c] for c in wanted}
    path = os.path.join(args.out, f"standin-{suffix}.json")
    rows, stage = [], {}

    def save(case_rows=(), done=()):
        """The run so far, rows of the case under way included: a run cut off by a time limit keeps them."""
        doc = dict(schema="dualfuse.standin-run/1", sms=args.sms, green_context=green_info, env=env,
                   bandwidth_gbps=bandwidth / 1e9, probe=probe_rows, rows=rows + list(case_rows), stage_shares=stage,
                   cases_done=list(done), cases_asked=list(cases))
        sh = shares_from_stages(stage, bandwidth, dict(card=env["card"], sms=sms, date=env["date"],
                                                       commit=env.get("commit")))
        if sh is not None:
            doc["shares"] = sh.to_dict()
            with open(os.path.join(args.out, f"shares-{suffix}.json"), "w") as f:
                json.dump(sh.to_dict(), f, indent=1)
        tmp = path + ".tmp"  # a process killed mid-write leaves the previous file whole
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, path)
        return doc

    done = []
    for case, (preset, ni, nt) in cases.items():
        r, shares = run_case(args, torch, case, preset, ni, nt, bandwidth if cuda else None, stand_kw, placement,
                             device, dtype, checkpoint=lambda case_rows: save(case_rows, done))
        rows += r
        done.append(case)
        if shares:
            stage[case] = shares
        doc = save(done=done)
    print_table(doc)
    print(f"results: {path}")
    bad = [r for r in rows if r["status"] == "ok" and not r["cosine_ok"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

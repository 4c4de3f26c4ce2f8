"""`dualfuse plan`: the fused stage plan of a model and call shape (:func:`dualfuse.plan.make_plan`), and with
``--target`` the device floors of :func:`dualfuse.floors.floors`, printed as tables; ``--json`` writes both."""
from __future__ import annotations

from ..floors import LAUNCH_GAP_US, Floor, format_bytes
from ..plan import DEFAULT_BANDWIDTH, DEFAULT_MATMUL_RATE, make_plan

HELP = "print the fused stage plan: per stage the tower steps it covers, FLOPs, bytes and balance"


def add_arguments(parser) -> None:
    import argparse

    parser.description = HELP
    parser.add_argument("--model", default="clip-vit-b-32", metavar="NAME|PATH",
                        help="preset name, open_clip:ARCH, HF model directory or open_clip checkpoint "
                             "(default clip-vit-b-32)")
    parser.add_argument("--arch", default=None, help="open_clip architecture of a checkpoint file")
    parser.add_argument("--batch", type=int, default=1, help="image and text batch (default 1)")
    parser.add_argument("--image-batch", type=int, default=None, help="image batch (0 = text-only call)")
    parser.add_argument("--text-batch", type=int, default=None, help="text batch (0 = image-only call)")
    parser.add_argument("--text-length", type=int, default=None, dest="text_length",
                        help="tokens per text (default: the context length)")
    parser.add_argument("--text-len", type=int, dest="text_length", help=argparse.SUPPRESS)  # old name, deprecated
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    parser.add_argument("--fold-ln", action="store_true",
                        help="fold each LayerNorm into the GEMM it feeds (the fused executor's fold_ln=True)")
    parser.add_argument("--target", action="append", default=None, metavar="NAME",
                        help="also print the device floor on this target (repeatable): "
                             "orin-nano, orin-nano-super, orin-nx, agx-orin, h100, h200 (dualfuse.floors)")
    parser.add_argument("--shares", default=None, metavar="PATH",
                        help="measured shares of bandwidth per step kind (dualfuse.shares; default the package's "
                             "stand-in measurement, if any): with --target, also a prediction from them")
    parser.add_argument("--json", default=None, help="write the plan (and floors) as JSON here")


def run(args) -> int:
    import json

    from rich.console import Console
    from rich.table import Table

    from ..adapters import to_spec
    from ..presets import PRESETS, build_hf, load

    targets = []
    if getattr(args, "target", None):
        from ..targets import get_target

        targets = [get_target(n) for arg in args.target for n in arg.split(",") if n.strip()]
    if args.model in PRESETS:  # shapes are all a plan needs: build on the meta device, instantly
        spec = to_spec(build_hf(args.model, meta=True))
    else:
        spec = to_spec(load(args.model, arch=args.arch))
    bi = args.batch if args.image_batch is None else args.image_batch
    bt = args.batch if args.text_batch is None else args.text_batch
    ctx = spec.text.context_length
    if args.text_length is not None and not 1 <= args.text_length <= ctx:
        raise ValueError(f"--text-length must be in [1, {ctx}] for {args.model}, got {args.text_length}")
    if bi < 0 or bt < 0 or bi + bt == 0:
        raise ValueError(f"--image-batch / --text-batch must be >= 0 and not both 0 (got image {bi}, text {bt})")
    plan = make_plan(spec, bi, bt, args.text_length, elt=4 if args.dtype == "fp32" else 2, fold_ln=args.fold_ln)
    console = Console()
    table = Table(title=f"{args.model}: {bi} image(s) x {bt} text(s), {plan.text_len} tokens, {args.dtype} — "
                        f"{plan.num_launches} launches, {plan.fused_stages} fused")
    for col in ("#", "kernel", "vision step", "text step", "GFLOP", "MB", "est. µs", "balance"):
        table.add_column(col, justify="right" if col in ("#", "GFLOP", "MB", "est. µs", "balance") else "left")
    for r, s in zip(plan.table(), plan.stages):
        table.add_row(str(r["stage"]), r["kind"], r["vision"], r["text"], f"{r['gflops']:.3f}", f"{r['mbytes']:.2f}",
                      f"{max(st.time() for st in s.steps) * 1e6:.1f}", f"{r['balance']:.2f}")
    console.print(table)
    tot = plan.totals()
    for tower in ("vision", "text"):
        t = tot[tower]
        console.print(f"{tower}: {t['steps']} steps, {t['gflops']:.2f} GFLOP, {t['mbytes']:.1f} MB, "
                      f"estimated {t['est_us']:.0f} µs at {DEFAULT_BANDWIDTH / 1e12:.1f} TB/s / "
                      f"{DEFAULT_MATMUL_RATE / 1e12:.0f} TFLOP/s (estimates, not measurements)")
    found = []
    if targets:
        from ..floors import floors

        for i, t in enumerate(targets):
            found.append(floors(spec, t, bi, bt, args.text_length, model=args.model))
            print_floors(found[-1], console, notes=i == len(targets) - 1)
    predictions = []
    if targets:
        from .. import shares as S

        measured = S.load(getattr(args, "shares", None))
        for t in targets if measured is not None else ():
            for w in ("fp16", "int8"):
                predictions.append(S.predict(spec, t, bi, bt, args.text_length, shares=measured, weights=w))
        for line in shares_lines(predictions):
            console.print(line, highlight=False)
    if args.json:
        doc = dict(model=args.model, image_batch=bi, text_batch=bt, text_len=plan.text_len,
                   stages=plan.table(), totals=tot)
        if found:
            doc["floors"] = [f.to_dict() for f in found]
        if predictions:
            doc["predictions_measured_shares"] = predictions
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
    return 0


def shares_lines(predictions: list[dict]) -> list[str]:
    """Predictions from measured shares of bandwidth, one line per target and weights, plus where they come from."""
    if not predictions:
        return []
    src = predictions[0]["source"]
    where = ", ".join(f"{k} {src[k]}" for k in ("card", "sms", "bandwidth_gbps", "date", "commit") if k in src)
    shares = ", ".join(f"{k} {v:.0%}" for k, v in predictions[0]["shares"].items())
    scale = predictions[0].get("scale", 1.0)
    scaled = f", x{scale:.2f} to match whole forwards measured there" if scale != 1.0 else ""
    lines = [f"predicted ms from measured shares of bandwidth ({shares}; measured in the stand-in: {where}{scaled})"
             " — predictions, not measurements:"]
    for p in predictions:
        lines.append(f"  {p['target']} {p['weights']}: {p['predicted_ms']:.3f} ms ({p['launches']} launches)")
    return lines


def print_floors(floor: Floor, console=None, notes: bool = True) -> None:
    """The floor as a rich table (the CLI's rendering of a Floor)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = floor.target
    table = Table(title=f"{floor.model} on {t.name} ({t.description}, {t.arch}, {t.num_sms} SMs): "
                        f"{floor.image_batch} image(s) x {floor.text_batch} text(s) of {floor.text_len} tokens — "
                        f"{floor.launches} launches (fold_ln {'on' if floor.fold_ln else 'off'})")
    for col in ("weights", "weight bytes", "activation bytes", "GFLOP", "memory ms", "compute ms", "floor ms",
                "bound", "predicted ms †"):
        table.add_column(col, justify="left" if col in ("weights", "bound") else "right")
    for p in floor.precisions:
        table.add_row(p.weights, format_bytes(p.weight_bytes), format_bytes(p.activation_bytes), f"{p.flops / 1e9:.2f}",
                      f"{p.memory_ms:.3f}", f"{p.compute_ms:.3f}", f"{p.floor_ms:.3f}", p.bound,
                      f"{floor.predicted_ms(p.weights):.3f}")
    console.print(table)
    console.print(f"{t.name}: {t.dram_bandwidth / 1e9:.1f} GB/s, dense fp16 tensor {t.fp16_dense / 1e12:.1f} TFLOP/s, "
                  f"dense INT8 tensor {t.int8_dense / 1e12:.1f} TOPS (sources: dualfuse.targets, "
                  f"`plan --json`); floor = max(bytes / bandwidth, FLOPs / fp16 peak), per call")
    console.print(f"† a prediction, not a measurement: floor + {floor.launches} launches x {LAUNCH_GAP_US} µs (a launch "
                  "boundary without PDL in a CUDA graph, measured on an H200); assumes full DRAM bandwidth in every "
                  "kernel")
    for n in (floor.notes if notes else []):
        console.print(f"  note: {n}")

"""`dualfuse eval`: accuracy parity of an executor with the fp32 reference (cosine, error, zero-shot, retrieval).

The command line of :func:`dualfuse.evaluate.run_eval`: parses the flags, prints the setting and a table with a
PASS/FAIL line per executor, writes ``--json``.
"""
from __future__ import annotations

import argparse
import math

from .. import evaluate as E
from ..evaluate import DEFAULT_EXECUTOR, DEFAULT_MODEL
from ..util import Progress, write_json
from . import fail, user_command

DESCRIPTION = E.__doc__


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME|PATH",
                   help=f"preset name, open_clip:ARCH, HF model directory or open_clip checkpoint (default "
                        f"{DEFAULT_MODEL})")
    p.add_argument("--arch", default=None, help="open_clip architecture of a checkpoint file (e.g. ViT-B-32)")
    p.add_argument("--executor", "--executors", dest="executor", default=DEFAULT_EXECUTOR,
                   help=f"executor(s) to compare with the reference, comma-separated (default {DEFAULT_EXECUTOR}; "
                        "on CPU it needs TRITON_INTERPRET=1 and a tiny model, e.g. --model clip-tiny)")
    p.add_argument("--dtype", default=None, help="fp16 | bf16 | fp32 (default fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default cuda when available)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", default=None,
                     help="folder of images in class subfolders, or images + a captions file (captions.tsv, "
                          "captions.json, captions.jsonl)")
    src.add_argument("--demo", action="store_true", help="the photos that scikit-image ships (no files needed)")
    p.add_argument("--captions", default=None, help="captions file for --data (image<TAB>caption lines or JSON)")
    p.add_argument("--samples", type=int, default=32, help="synthetic images (default 32)")
    p.add_argument("--classes", type=int, default=10, help="synthetic class prompts (default 10)")
    p.add_argument("--limit", type=int, default=None, help="use at most this many images from --data")
    p.add_argument("--template", default="a photo of a {}.", help="zero-shot prompt template")
    p.add_argument("--batch-size", type=int, default=32, help="images/texts per executor call (default 32)")
    p.add_argument("--synthetic-tokenizer", action="store_true",
                   help="use the synthetic tokenizer even when a real one is available")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", choices=["fp16", "int8", "fp8"], default=None,
                   help="weights of the fused executor: fp16 (default: --dtype, unquantized), int8 or fp8 (weight-only, "
                        "per-channel scales); PASS then uses the quantized bounds (dualfuse.quantize)")
    p.add_argument("--json", default=None, help="write the results as JSON here (read by `dualfuse report`)")



def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..executors.base import ExecutorUnavailable

    out = Console()
    try:
        result = E.run_eval(
            args.model, args.executor.split(","), arch=args.arch, dtype=args.dtype, device=args.device,
            data_dir=args.data, captions=args.captions, demo=args.demo, samples=args.samples, classes=args.classes,
            limit=args.limit, template=args.template, batch_size=args.batch_size,
            synthetic_tokenizer=args.synthetic_tokenizer, seed=args.seed, weights=getattr(args, "weights", None),
            progress=_Printer(out))
    except (ValueError, ExecutorUnavailable) as e:
        return fail("eval", str(e))
    if args.json:
        result.command = user_command(getattr(args, "_argv", None), "eval")
        write_json(args.json, result.to_dict())
        out.print(f"results written to {args.json}")
    return 0 if result.passed else 1


class _Printer(Progress):
    """The setting once the data is loaded, then each executor's table as soon as it is done."""

    def __init__(self, out):
        self.out = out

    def start(self, result) -> None:
        out, data, tok, pre = self.out, result.data, result.tokenizer, result.preprocessing
        out.print(f"[bold]dualfuse eval[/]: {result.model} ({result.family}; weights {result.weights}) · "
                  f"{result.dtype} on {result.device}"
                  + (f" · fused with {result.weights_format} weights" if result.weights_format != "fp16" else ""))
        out.print(f"data: {data['description']}")
        out.print(f"tokenizer: {tok['description']}" + ("  [yellow](synthetic: texts are hashed words, not a real "
                                                        "vocabulary)[/]" if tok["kind"] == "synthetic" else ""))
        out.print(f"preprocessing: resize+center-crop to {pre['image_size']}, mean/std from {pre['source']}")
        for msg in data["problems"]:
            out.print(f"[yellow]warning[/]: {msg}", highlight=False)

    def end(self, name, res) -> None:
        print_result(self.out, res)


def _f(x, spec="{:.4f}"):
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else spec.format(x)


def print_result(out, res: dict) -> None:
    from rich.table import Table

    name = res["executor"]
    if res["status"] != "ok":
        out.print(f"[bold]{name}[/]: [yellow]{res['status']}[/]: {res.get('message', '')}", highlight=False)
        out.print(f"[bold red]FAIL[/] {name}: could not run")
        return
    t = Table(show_edge=False, header_style="bold", title=f"{name} vs fp32 reference")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for tower in ("image", "text"):
        m = res.get(tower)
        if m is None:  # a single tower
            continue
        t.add_row(f"{tower} cosine min / mean ({m['n']})", f"{_f(m['min_cosine'], '{:.6f}')} / "
                  f"{_f(m['mean_cosine'], '{:.6f}')}")
        t.add_row(f"{tower} rel. error max / mean", f"{_f(m['max_rel_err'], '{:.2e}')} / "
                  f"{_f(m['mean_rel_err'], '{:.2e}')}")
    if "single_tower" in res:  # embedding parity only: no logits without the other tower
        out.print(t)
        out.print(f"a single {res['single_tower']} tower: embedding parity only (zero-shot and retrieval need both "
                  "towers)", style="dim")
        c = res["criteria"]
        if res["passed"]:
            out.print(f"[bold green]PASS[/] {name}: cosine ≥ {c['min_cosine']}, rel. error ≤ {c['max_rel_err']:g}")
        else:
            out.print(f"[bold red]FAIL[/] {name}: " + "; ".join(res["failures"]), highlight=False)
        return
    zs = res["zero_shot"]
    t.add_row("zero-shot top-1 agreement", _f(zs["top1_agreement"]))
    t.add_row(f"zero-shot top-{zs['k']} agreement (ref's top-1 in X's top-{zs['k']})", _f(zs["top5_agreement"]))
    t.add_row(f"decisive top-1 agreement ({zs['decisive']}/{zs['images']} images)", _f(zs["decisive_top1_agreement"]))
    r = res["retrieval"]
    for k, v in r["agreement"].items():
        t.add_row(f"retrieval {k} agreement (target: ref's top-1)", _f(v))
    if "true" in r:
        for k in r["true"]["executor"]:
            t.add_row(f"retrieval {k} true: {name} / reference",
                      f"{_f(r['true']['executor'][k])} / {_f(r['true']['reference'][k])}")
    if "zero_shot_accuracy" in res:
        acc = res["zero_shot_accuracy"]
        for k in acc["executor"]:
            t.add_row(f"zero-shot accuracy {k}: {name} / reference",
                      f"{_f(acc['executor'][k])} / {_f(acc['reference'][k])}")
    out.print(t)
    out.print(f"zero-shot: {zs['images']} images × {zs['classes']} class prompts; decisive = reference top-2 margin "
              f"> {zs['margin']:g} (cosine units). retrieval: each image ranks {r['n_texts']} {r['texts']}",
              style="dim")
    if "zero_shot_accuracy" in res or "true" in r:
        out.print("true accuracy / R@k use the data's labels; with random weights they are chance level",
                  style="dim")
    if res["passed"]:
        c = res["criteria"]
        out.print(f"[bold green]PASS[/] {name}: cosine ≥ {c['min_cosine']}, rel. error ≤ {c['max_rel_err']:g}, "
                  "no decisive zero-shot flip")
    else:
        out.print(f"[bold red]FAIL[/] {name}: " + "; ".join(res["failures"]), highlight=False)

"""`dualfuse eval`: accuracy parity of an executor with the fp32 reference (cosine, error, zero-shot, retrieval).

    dualfuse eval --model clip-vit-b-32 --executor fused            # synthetic data (no ground truth)
    dualfuse eval --model clip-tiny --executor eager,onnxruntime --demo --json eval.json
    dualfuse eval --model /ckpt/clip-vit-base-patch32 --executor fused --data ~/imagenette   # class folders
    dualfuse eval --model /ckpt/siglip --executor graph --data ~/flickr --captions ~/flickr/captions.tsv

Both the executor X and the reference (reference.py, fp32, on the same device) embed the same images and texts.
Metrics, X vs reference (docs/evaluation.md has the definitions):

- embeddings: per-embedding cosine (min, mean) and relative error ||x - ref|| / ||ref|| (max, mean), images and
  texts separately;
- zero-shot (images vs class prompts "a photo of a {class}."): top-1 agreement = fraction of images where X's
  argmax class equals the reference's; top-5 agreement = fraction of images where the reference's top-1 class is
  among X's top 5; decisive top-1 agreement = top-1 agreement over the images whose reference top-2 margin (in
  cosine units) exceeds 2x the relative-error tolerance (those must never flip);
- retrieval (each image ranks all captions; class prompts when there are no captions): R@k = TorchMetrics
  ``RetrievalHitRate(top_k=k)``, with the reference's top-1 text per image as the target (agreement, works on any
  data) and, when the data has ground truth (captions with their images, class folders), true R@k and true
  zero-shot accuracy (TorchMetrics ``MulticlassAccuracy``) for both X and the reference.

PASS needs: min cosine >= 0.999 (both towers), max relative error <= 1e-2 for fp16/bf16 (1e-5 for fp32), and
decisive top-1 agreement = 1. With ``--weights int8`` / ``fp8`` (the fused executor's weight-only quantization) the
cosine and error bounds are dualfuse.quantize.COSINE_MIN and REL_ERR_MAX, the decisive margin 2x that error. Exit code 0 when every executor passes, 1 otherwise, 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys

import torch

COSINE_PASS = 0.999
REL_TOL = {torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float32: 1e-5}
RETRIEVAL_KS = (1, 5, 10)
DEFAULT_MODEL = "clip-vit-b-32"  # the same default as every other command
DEFAULT_EXECUTOR = "fused"  # compare dualfuse's executor with the reference (eager would compare it with itself)


# --------------------------------------------------------------------------------------------- metrics

def embedding_metrics(x: torch.Tensor, ref: torch.Tensor) -> dict:
    """Per-row cosine and relative error of x [N, E] vs ref [N, E] (computed in float64)."""
    if x.shape != ref.shape:
        raise ValueError(f"embedding shapes differ: {list(x.shape)} vs reference {list(ref.shape)}")
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    cos = torch.nn.functional.cosine_similarity(x, ref, dim=-1)
    rel = (x - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)
    finite = bool(torch.isfinite(x).all())
    return dict(min_cosine=float(cos.min()) if finite else float("nan"),
                mean_cosine=float(cos.mean()) if finite else float("nan"),
                max_rel_err=float(rel.max()) if finite else float("inf"),
                mean_rel_err=float(rel.mean()) if finite else float("inf"), n=int(x.shape[0]), finite=finite)


def normalized(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().double().cpu()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-30)


def similarity(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Cosine similarity [N_images, N_texts] (CLIP/SigLIP logits are an increasing affine map of it, so rankings
    and argmaxes are the same)."""
    return normalized(image_embeds) @ normalized(text_embeds).t()


def zero_shot_agreement(scores: torch.Tensor, ref_scores: torch.Tensor, *, k: int = 5,
                        margin: float | None = None) -> dict:
    """Agreement of X's zero-shot decisions with the reference's; scores [N_images, N_classes].

    top1_agreement: mean(argmax X == argmax ref). topk_agreement: mean(ref's top-1 in X's top-k), k capped at the
    number of classes. With ``margin``: images whose reference top-2 gap is > margin are 'decisive';
    decisive_top1_agreement is top-1 agreement over them (1.0 when there are none)."""
    if scores.shape != ref_scores.shape:
        raise ValueError(f"score shapes differ: {list(scores.shape)} vs {list(ref_scores.shape)}")
    n, c = scores.shape
    k = max(1, min(k, c))
    ref_top1 = ref_scores.argmax(dim=-1)
    agree = scores.argmax(dim=-1) == ref_top1
    topk = scores.topk(k, dim=-1).indices
    in_topk = (topk == ref_top1[:, None]).any(dim=-1)
    out = dict(top1_agreement=float(agree.double().mean()), top5_agreement=float(in_topk.double().mean()), k=k,
               images=n, classes=c, disagreements=int((~agree).sum()))
    if margin is not None:
        if c >= 2:
            top2 = ref_scores.topk(2, dim=-1).values
            decisive = (top2[:, 0] - top2[:, 1]) > margin
        else:
            decisive = torch.ones(n, dtype=torch.bool)
        nd = int(decisive.sum())
        out.update(margin=margin, decisive=nd,
                   decisive_top1_agreement=float(agree[decisive].double().mean()) if nd else 1.0)
    return out


def retrieval_hit_rates(scores: torch.Tensor, targets: torch.Tensor, ks=RETRIEVAL_KS) -> dict:
    """R@k (TorchMetrics RetrievalHitRate) for image queries ranking texts: scores [N_images, N_texts], targets
    bool [N_images, N_texts] (True = relevant). k larger than the number of texts is left out (trivially 1)."""
    from torchmetrics.retrieval import RetrievalHitRate

    n, t = scores.shape
    indexes = torch.arange(n).unsqueeze(1).expand(n, t).reshape(-1)
    preds, tgt = scores.float().reshape(-1), targets.bool().reshape(-1)
    out = {}
    for k in ks:
        if k > t:
            continue
        metric = RetrievalHitRate(top_k=k)
        out[f"R@{k}"] = float(metric(preds, tgt, indexes=indexes))
    return out


def top1_targets(ref_scores: torch.Tensor) -> torch.Tensor:
    """One-hot of the reference's best text per image: the agreement target when there is no ground truth."""
    t = torch.zeros_like(ref_scores, dtype=torch.bool)
    t[torch.arange(ref_scores.shape[0]), ref_scores.argmax(dim=-1)] = True
    return t


def zero_shot_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict:
    """True zero-shot accuracy (TorchMetrics MulticlassAccuracy, micro average) for top-k, k <= classes."""
    from torchmetrics.classification import MulticlassAccuracy

    c = scores.shape[1]
    out = {}
    for k in ks:
        if k > c:
            continue
        metric = MulticlassAccuracy(num_classes=c, top_k=k, average="micro")
        out[f"top{k}"] = float(metric(scores.float(), labels.long()))
    return out


def pass_criteria(dtype: torch.dtype, weights: str | None = None) -> dict:
    """PASS bounds for an executor of ``dtype``; ``weights`` "int8" / "fp8": the quantized-weight bounds."""
    rel, cos = REL_TOL.get(dtype, 1e-2), COSINE_PASS
    if weights not in (None, "fp16"):
        from .quantize import COSINE_MIN, REL_ERR_MAX
        rel, cos = REL_ERR_MAX, COSINE_MIN
    return dict(min_cosine=cos, max_rel_err=rel, decisive_top1_agreement=1.0,
                decisive_margin=2 * rel)


def verdict(metrics: dict, criteria: dict) -> list[str]:
    """The failed criteria (empty list = PASS)."""
    fails = []
    for tower in ("image", "text"):
        m = metrics.get(tower)
        if not m:
            continue
        if not m["finite"]:
            fails.append(f"{tower} embeddings contain NaN/Inf")
            continue
        if not m["min_cosine"] >= criteria["min_cosine"]:
            fails.append(f"{tower} min cosine {m['min_cosine']:.6f} < {criteria['min_cosine']}")
        if not m["max_rel_err"] <= criteria["max_rel_err"]:
            fails.append(f"{tower} max relative error {m['max_rel_err']:.3g} > {criteria['max_rel_err']:g}")
    zs = metrics.get("zero_shot")
    if zs and zs.get("decisive_top1_agreement", 1.0) < criteria["decisive_top1_agreement"]:
        fails.append(f"zero-shot argmax differs on decisive images (agreement {zs['decisive_top1_agreement']:.3f} "
                     f"over {zs['decisive']} images with reference margin > {zs['margin']:g})")
    return fails


def parity(x_img, x_cls, x_txt, r_img, r_cls, r_txt, *, dtype=torch.float16, labels=None, caption_image=None,
           ks=RETRIEVAL_KS, weights=None) -> dict:
    """All parity metrics of X vs the reference from embeddings.

    x_img/r_img [N, E] image embeddings; x_cls/r_cls [C, E] class-prompt embeddings; x_txt/r_txt [T, E] retrieval
    texts (None: use the class prompts). ``labels`` [N] (true class per image) and ``caption_image`` (image index
    per retrieval text) add true accuracy / true R@k for X and the reference."""
    criteria = pass_criteria(dtype, weights)
    m: dict = dict(image=embedding_metrics(x_img, r_img), criteria=criteria)
    text_x = torch.cat([x_cls] + ([x_txt] if x_txt is not None else []))
    text_r = torch.cat([r_cls] + ([r_txt] if r_txt is not None else []))
    m["text"] = embedding_metrics(text_x, text_r)
    zs_x, zs_r = similarity(x_img, x_cls), similarity(r_img, r_cls)
    m["zero_shot"] = zero_shot_agreement(zs_x, zs_r, margin=criteria["decisive_margin"])
    rx, rr = (x_txt, r_txt) if x_txt is not None else (x_cls, r_cls)
    sx, sr = similarity(x_img, rx), similarity(r_img, rr)
    m["retrieval"] = dict(texts="captions" if x_txt is not None else "class prompts", n_texts=int(rx.shape[0]),
                          agreement=retrieval_hit_rates(sx, top1_targets(sr), ks))
    if labels is not None:
        m["zero_shot_accuracy"] = dict(executor=zero_shot_accuracy(zs_x, labels),
                                       reference=zero_shot_accuracy(zs_r, labels))
    if caption_image is not None and x_txt is not None:
        gt = torch.zeros(sx.shape, dtype=torch.bool)
        gt[torch.as_tensor(caption_image), torch.arange(sx.shape[1])] = True
        m["retrieval"]["true"] = dict(executor=retrieval_hit_rates(sx, gt, ks), reference=retrieval_hit_rates(sr, gt, ks))
    m["failures"] = verdict(m, criteria)
    m["passed"] = not m["failures"]
    return m


# --------------------------------------------------------------------------------------------- running

def _batched(fn, x: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    outs = []
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            outs.append(fn(x[i:i + batch_size].to(device)).detach().float().cpu())
    return torch.cat(outs)


def check_token_ids(spec, ids: torch.Tensor, what: str) -> torch.Tensor:
    """Token ids must index the model's vocabulary (the reference does not check; an executor would refuse)."""
    vocab = spec.text.embed.vocab_size
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        from .data import DataError

        raise DataError(f"the tokenizer produced ids in [{int(ids.min())}, {int(ids.max())}] for the {what}, but the "
                        f"model's vocabulary has {vocab} tokens: tokenizer and model do not match")
    return ids


def reference_embeddings(spec, data, tokenizer, device, batch_size: int = 32) -> dict:
    """fp32 reference embeddings of the dataset's images, class prompts and captions."""
    from . import reference

    check_token_ids(spec, tokenizer(data.prompts), "class prompts")
    if data.captions:
        check_token_ids(spec, tokenizer(data.captions), "captions")

    ref_spec = spec.to(device=device, dtype=torch.float32)
    out = dict(image=_batched(lambda x: reference.encode_image(ref_spec, x.float()), data.pixel_values,
                              batch_size, device),
               cls=_batched(lambda i: reference.encode_text(ref_spec, i), tokenizer(data.prompts), batch_size,
                            device))
    out["txt"] = (_batched(lambda i: reference.encode_text(ref_spec, i), tokenizer(data.captions), batch_size,
                           device) if data.captions else None)
    return out


def executor_embeddings(ex, data, tokenizer, batch_size: int = 32) -> dict:
    dev = ex.device
    out = dict(image=_batched(ex.encode_image, data.pixel_values, batch_size, dev),
               cls=_batched(ex.encode_text, tokenizer(data.prompts), batch_size, dev))
    out["txt"] = _batched(ex.encode_text, tokenizer(data.captions), batch_size, dev) if data.captions else None
    return out


def evaluate_executor(ex, data, tokenizer, ref: dict, *, batch_size: int = 32) -> dict:
    """Parity metrics of a built executor on ``data`` against precomputed reference embeddings."""
    got = executor_embeddings(ex, data, tokenizer, batch_size)
    return parity(got["image"], got["cls"], got["txt"], ref["image"], ref["cls"], ref["txt"], dtype=ex.dtype,
                  labels=data.labels, caption_image=data.caption_image, weights=getattr(ex, "weight_format", None))


# --------------------------------------------------------------------------------------------- CLI

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


def _err(msg: str) -> int:
    print(f"dualfuse eval: error: {msg}", file=sys.stderr)
    return 2


def _f(x, spec="{:.4f}"):
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else spec.format(x)


def run(args: argparse.Namespace) -> int:
    from . import data as D
    from . import executors, presets
    from .adapters import to_spec
    from .executors.base import ExecutorUnavailable, dtype_name, resolve_device, resolve_dtype

    try:
        device = resolve_device(args.device)
    except (ValueError, ExecutorUnavailable) as e:
        return _err(str(e))
    try:
        dtype = resolve_dtype(args.dtype, device)
    except ValueError as e:
        return _err(str(e))
    if args.batch_size < 1 or args.samples < 1:
        return _err("--batch-size and --samples must be >= 1")
    if "{}" not in args.template:
        return _err(f"--template must contain '{{}}' for the class name, got {args.template!r}")
    wanted = [n.strip() for n in args.executor.split(",") if n.strip()]
    known = executors.names()
    unknown = [n for n in wanted if n not in known]
    if unknown or not wanted:
        return _err(f"unknown executor(s): {', '.join(unknown) or '(none)'}; known: {', '.join(known)}")
    try:
        model = presets.load(args.model, seed=args.seed, arch=args.arch)
    except ValueError as e:
        return _err(str(e))
    spec = to_spec(model)
    path = args.model if os.path.exists(str(args.model)) else None
    arch = args.arch or (args.model.split(":", 1)[1] if str(args.model).startswith("open_clip:") else None)
    pre = D.preprocess_for(spec, model, path)
    tok = D.make_tokenizer(spec, model, path, arch, prefer_synthetic=args.synthetic_tokenizer)
    try:
        if args.demo:
            data = D.demo(pre, args.template)
        elif args.data:
            data = D.load_dir(args.data, pre, captions=args.captions, limit=args.limit, template=args.template)
        else:
            if args.captions:
                return _err("--captions needs --data DIR (the images' folder)")
            data = D.synthetic(pre, args.samples, args.classes, seed=args.seed, template=args.template)
    except D.DataError as e:
        return _err(str(e))
    weights = "checkpoint" if path else "random (seeded preset)"

    from rich.console import Console

    out = Console()
    out.print(f"[bold]dualfuse eval[/]: {args.model} ({spec.family}; weights {weights}) · {dtype_name(dtype)} on "
              f"{device}")
    out.print(f"data: {data.description}")
    out.print(f"tokenizer: {tok.describe()}" + ("  [yellow](synthetic: texts are hashed words, not a real "
                                                 "vocabulary)[/]" if tok.kind == "synthetic" else ""))
    out.print(f"preprocessing: resize+center-crop to {pre.image_size}, mean/std from {pre.source}")
    for msg in data.problems:
        out.print(f"[yellow]warning[/]: {msg}", highlight=False)

    try:
        ref = reference_embeddings(spec, data, tok, device, args.batch_size)
    except D.DataError as e:
        return _err(str(e))
    results = []
    for name in wanted:
        res = dict(executor=name, status="ok")
        try:
            wkw = {"weights": args.weights} if name == "fused" and getattr(args, "weights", None) not in (None, "fp16") \
                else {}
            ex = executors.get(name, model, dtype=dtype, device=device, spec=spec, **wkw)
            res.update(evaluate_executor(ex, data, tok, ref, batch_size=args.batch_size))
            del ex
        except ExecutorUnavailable as e:
            res.update(status="unavailable", message=str(e), passed=False, failures=[str(e)])
        except Exception as e:  # noqa: BLE001 - report and go on with the next executor
            res.update(status="error", message=f"{type(e).__name__}: {e}", passed=False,
                       failures=[f"{type(e).__name__}: {e}"])
        results.append(res)
        _print_result(out, res, data)

    passed = all(r.get("passed") for r in results)
    if args.json:
        from .bench import environment

        env = environment(device)
        from .cli import user_command

        doc = dict(schema="dualfuse.eval/1", command=user_command(getattr(args, "_argv", None), "eval"),
                   model=args.model, family=spec.family, weights=weights, dtype=dtype_name(dtype), device=str(device),
                   card=env.get("card"), environment=env, date=_dt.datetime.now().isoformat(timespec="seconds"),
                   data=data.summary(), tokenizer=dict(kind=tok.kind, description=tok.describe()),
                   preprocessing=dict(image_size=pre.image_size, mean=list(pre.mean), std=list(pre.std),
                                      source=pre.source),
                   criteria=pass_criteria(dtype, getattr(args, "weights", None)),
                   weights_format=getattr(args, "weights", None) or "fp16", passed=passed, results=results)
        d = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(d, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1, default=str)
        out.print(f"results written to {args.json}")
    return 0 if passed else 1


def _print_result(out, res: dict, data) -> None:
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
        m = res[tower]
        t.add_row(f"{tower} cosine min / mean ({m['n']})", f"{_f(m['min_cosine'], '{:.6f}')} / "
                  f"{_f(m['mean_cosine'], '{:.6f}')}")
        t.add_row(f"{tower} rel. error max / mean", f"{_f(m['max_rel_err'], '{:.2e}')} / "
                  f"{_f(m['mean_rel_err'], '{:.2e}')}")
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

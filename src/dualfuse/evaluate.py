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
fused executor's cosine and error bounds are dualfuse.quantize.COSINE_MIN and REL_ERR_MAX, the decisive margin 2x
that error; the other executors keep the unquantized bounds. Exit code 0 when every executor passes, 1 otherwise,
2 for bad arguments.

A single tower (``--model`` a tower checkpoint directory or ``PRESET:vision``): embedding parity only (the image
or text embeddings vs the reference's; no zero-shot or retrieval, which need both towers).

Python: :func:`run_eval` returns an :class:`EvalResult` (``to_dict()``: the ``--json`` document, schema
``dualfuse.eval/1``); the metrics work on any embeddings (:func:`parity`). The command line is
``dualfuse.cli.evaluate``.
"""
from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass, field

import torch

from .config import FusedConfig
from .util import Progress

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
    per retrieval text) add true accuracy / true R@k for X and the reference. ``weights``: X's weight format
    ("int8" / "fp8": judged with the quantized bounds, :func:`pass_criteria`)."""
    criteria = pass_criteria(dtype, weights)
    if x_img is None or x_cls is None:  # a single tower: embedding parity only (no logits to rank)
        m = dict(criteria=criteria, single_tower="image" if x_img is not None else "text")
        if x_img is not None:
            m["image"] = embedding_metrics(x_img, r_img)
        else:
            m["text"] = embedding_metrics(torch.cat([x_cls] + ([x_txt] if x_txt is not None else [])),
                                          torch.cat([r_cls] + ([r_txt] if r_txt is not None else [])))
        m["failures"] = verdict(m, criteria)
        m["passed"] = not m["failures"]
        return m
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

    ref_spec = spec.to(device=device, dtype=torch.float32)
    out = dict(image=None, cls=None, txt=None)
    if spec.vision is not None:
        out["image"] = _batched(lambda x: reference.encode_image(ref_spec, x.float()), data.pixel_values,
                                batch_size, device)
    if spec.text is None:  # a vision tower alone
        return out
    check_token_ids(spec, tokenizer(data.prompts), "class prompts")
    if data.captions:
        check_token_ids(spec, tokenizer(data.captions), "captions")
    out["cls"] = _batched(lambda i: reference.encode_text(ref_spec, i), tokenizer(data.prompts), batch_size, device)
    out["txt"] = (_batched(lambda i: reference.encode_text(ref_spec, i), tokenizer(data.captions), batch_size,
                           device) if data.captions else None)
    return out


def executor_embeddings(ex, data, tokenizer, batch_size: int = 32) -> dict:
    dev, towers = ex.device, ex.io.towers
    out = dict(image=None, cls=None, txt=None)
    if "vision" in towers:
        out["image"] = _batched(ex.encode_image, data.pixel_values, batch_size, dev)
    if "text" in towers:
        out["cls"] = _batched(ex.encode_text, tokenizer(data.prompts), batch_size, dev)
        out["txt"] = _batched(ex.encode_text, tokenizer(data.captions), batch_size, dev) if data.captions else None
    return out


def evaluate_executor(ex, data, tokenizer, ref: dict, *, batch_size: int = 32) -> dict:
    """Parity metrics of a built executor on ``data`` against precomputed reference embeddings (a fused executor
    with quantized weights: the quantized bounds; one that fell back runs unquantized weights and keeps the usual
    ones)."""
    got = executor_embeddings(ex, data, tokenizer, batch_size)
    weights = getattr(ex, "weight_format", None) if getattr(ex, "fallback", None) is None else None
    return parity(got["image"], got["cls"], got["txt"], ref["image"], ref["cls"], ref["txt"], dtype=ex.dtype,
                  labels=data.labels, caption_image=data.caption_image, weights=weights)


# --------------------------------------------------------------------------------------------- the command's run

@dataclass
class EvalResult:
    """A ``dualfuse eval`` run: the setting (model, data, tokenizer, preprocessing, criteria) and one result dict
    per executor (``parity()``'s metrics plus ``executor`` and ``status``: ok | unavailable | error).
    ``to_dict()`` is the ``dualfuse.eval/1`` JSON document (read by ``dualfuse report``)."""

    model: str
    family: str
    weights: str  # "checkpoint" or "random (seeded preset)"
    dtype: str
    device: str
    environment: dict
    data: dict  # Dataset.summary()
    tokenizer: dict  # kind, description
    preprocessing: dict  # image_size, mean, std, source
    criteria: dict  # the fused executor's PASS bounds (quantized ones with weights_format int8 / fp8); each result
    #                 holds the bounds it was judged by
    weights_format: str = "fp16"  # the fused executor's weights: "fp16" (the dtype, unquantized), "int8" or "fp8"
    fused_config: FusedConfig = field(default_factory=FusedConfig)  # the fused executor's options
    results: list[dict] = field(default_factory=list)
    date: str = ""
    command: str | None = None

    @property
    def passed(self) -> bool:
        return all(r.get("passed") for r in self.results)

    def to_dict(self) -> dict:
        return dict(schema="dualfuse.eval/1", command=self.command, model=self.model, family=self.family,
                    weights=self.weights, dtype=self.dtype, device=self.device, card=self.environment.get("card"),
                    environment=self.environment, date=self.date, data=self.data, tokenizer=self.tokenizer,
                    preprocessing=self.preprocessing, criteria=self.criteria, weights_format=self.weights_format,
                    passed=self.passed, fused_config=self.fused_config.to_dict(),
                    results=self.results)


def run_eval(model: str = DEFAULT_MODEL, executors: list[str] = (DEFAULT_EXECUTOR,), *, arch: str | None = None,
             dtype=None, device=None, data_dir: str | None = None, captions: str | None = None, demo: bool = False,
             samples: int = 32, classes: int = 10, limit: int | None = None, template: str = "a photo of a {}.",
             batch_size: int = 32, synthetic_tokenizer: bool = False, seed: int = 0, weights: str | None = None,
             progress: Progress | None = None) -> EvalResult:
    """Each of ``executors`` against the fp32 reference on the same data (see the module docstring).

    Data: ``demo`` (scikit-image's photos), ``data_dir`` (class folders, or images + ``captions``), else
    ``samples`` synthetic images and ``classes`` class prompts. Bad arguments and unusable data raise ValueError
    (:class:`dualfuse.data.DataError` is one); an executor that cannot run gets a failed result saying why.
    ``weights``: the fused executor's weights (None / "fp16": unquantized; "int8" / "fp8": weight-only,
    dualfuse.quantize), judged with the quantized bounds; the other executors run the model's own weights.
    ``progress.start(result)`` runs once the data is loaded, ``progress.end(name, result_dict)`` after each
    executor."""
    from . import data as D
    from . import executors as registry
    from . import presets
    from .adapters import to_spec
    from .environment import environment
    from .executors.base import ExecutorUnavailable, dtype_name, resolve_device, resolve_dtype
    from .quantize import resolve_weights

    progress = progress or Progress()
    weights = resolve_weights(weights)  # ValueError for an unknown format (fp8 on this device: the fused result says)
    device = resolve_device(device)
    dt = resolve_dtype(dtype, device)
    if batch_size < 1 or samples < 1:
        raise ValueError("--batch-size and --samples must be >= 1")
    if "{}" not in template:
        raise ValueError(f"--template must contain '{{}}' for the class name, got {template!r}")
    wanted = [n.strip() for n in executors if n.strip()]
    known = registry.names()
    unknown = [n for n in wanted if n not in known]
    if unknown or not wanted:
        raise ValueError(f"unknown executor(s): {', '.join(unknown) or '(none)'}; known: {', '.join(known)}")
    source = presets.load(model, seed=seed, arch=arch)
    spec = to_spec(source)
    path = model if os.path.exists(str(model)) else None
    arch = arch or (model.split(":", 1)[1] if str(model).startswith("open_clip:") else None)
    pre = D.preprocess_for(spec, source, path)
    tok = (D.make_tokenizer(spec, source, path, arch, prefer_synthetic=synthetic_tokenizer) if spec.text is not None
           else None)  # a vision tower alone: no texts to tokenize
    if demo:
        data = D.demo(pre, template)
    elif data_dir:
        data = D.load_dir(data_dir, pre, captions=captions, limit=limit, template=template)
    else:
        if captions:
            raise ValueError("--captions needs --data DIR (the images' folder)")
        data = D.synthetic(pre, samples, classes, seed=seed, template=template)
    result = EvalResult(
        model=model, family=spec.family, weights="checkpoint" if path else "random (seeded preset)",
        dtype=dtype_name(dt), device=str(device), environment=environment(device), data=data.summary(),
        tokenizer=(dict(kind=tok.kind, description=tok.describe()) if tok is not None
                   else dict(kind="none", description="a vision tower alone: no text")),
        preprocessing=dict(image_size=pre.image_size, mean=list(pre.mean), std=list(pre.std), source=pre.source),
        criteria=pass_criteria(dt, weights), weights_format=weights, fused_config=FusedConfig(weights=weights))
    progress.start(result)

    ref = reference_embeddings(spec, data, tok, device, batch_size)
    for name in wanted:
        progress.begin(name)
        res = dict(executor=name, status="ok")
        try:
            fkw = {"config": result.fused_config} if name == "fused" else {}  # the others: the model's own weights
            ex = registry.get(name, source, dtype=dt, device=device, spec=spec, **fkw)
            res.update(evaluate_executor(ex, data, tok, ref, batch_size=batch_size))
            del ex
        except ExecutorUnavailable as e:
            res.update(status="unavailable", message=str(e), passed=False, failures=[str(e)])
        except Exception as e:  # noqa: BLE001 - report and go on with the next executor
            res.update(status="error", message=f"{type(e).__name__}: {e}", passed=False,
                       failures=[f"{type(e).__name__}: {e}"])
        result.results.append(res)
        progress.end(name, res)
    result.date = _dt.datetime.now().isoformat(timespec="seconds")
    return result

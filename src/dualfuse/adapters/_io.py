"""ModelIO read from a model's config and attributes, without copying weights: also for models whose towers
the spec cannot describe (the stock executors still run those and need their inputs' shapes)."""
from __future__ import annotations

from torch import nn

from ..spec import ModelIO
from ._common import scalar
from .hf_clip import clip_text_pooling
from .hf_siglip2 import from_hf_siglip2
from .open_clip import TEXT_POOLING


def _int(size) -> int:
    """An image size given as an int or (h, w): the height, as PatchEmbed.image_size is."""
    return int(size if isinstance(size, int) else size[0])


def _hf_io(model, family: str) -> ModelIO:

    cfg = model.config
    vcfg, tcfg = cfg.vision_config, cfg.text_config
    if family == "hf_siglip":
        pooling, eos, embed_dim = "last", None, model.text_model.head.out_features
        bias = scalar(model.logit_bias)
    else:
        if family == "hf_metaclip2":  # always the first eos_token_id (hf_metaclip2.py)
            pooling, eos = "first_eos", int(model.text_model.eos_token_id)
        else:
            pooling, eos = clip_text_pooling(tcfg.eos_token_id)
        embed_dim, bias = model.visual_projection.out_features, None
    return ModelIO(name=getattr(cfg, "_name_or_path", "") or family, family=family,
                   image_size=_int(vcfg.image_size), channels=vcfg.num_channels,
                   context_length=tcfg.max_position_embeddings, vocab_size=tcfg.vocab_size, embed_dim=embed_dim,
                   logit_scale=scalar(model.logit_scale), logit_bias=bias, text_pooling=pooling,
                   eos_token_id=eos, patch_size=_int(vcfg.patch_size))


def _open_clip_text(model) -> tuple[int, str, int | None]:
    """(embed_dim, text pooling, eos id) of an open_clip model's text tower."""

    text = model if type(model).__name__ == "CLIP" else model.text
    if type(text).__name__ == "HFTextEncoder":
        pooler = type(getattr(text, "pooler", None)).__name__.lower()
        return int(text.output_dim), ("cls" if "cls" in pooler else "argmax"), None
    proj = text.text_projection
    if proj is None:
        dim = text.token_embedding.weight.shape[1]
    else:
        dim = proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]
    pool_type = getattr(model, "text_pool_type", None) or getattr(text, "pool_type", "argmax")
    eos = getattr(model, "text_eos_id", None) if text is model else getattr(text, "eos_id", None)
    pooling = TEXT_POOLING.get(pool_type, "argmax")
    return int(dim), pooling, (int(eos) if pooling == "first_eos" else None)


def _open_clip_io(model) -> ModelIO:
    visual = model.visual
    first_conv = next((m for m in visual.modules() if isinstance(m, nn.Conv2d)), None)
    patch_conv = getattr(visual, "conv1", None) if type(visual).__name__ == "VisionTransformer" else \
        getattr(getattr(getattr(visual, "trunk", None), "patch_embed", None), "proj", None)
    patch = patch_conv.kernel_size[0] if isinstance(patch_conv, nn.Conv2d) else None  # None: no patch grid
    embed_dim, pooling, eos = _open_clip_text(model)
    bias = getattr(model, "logit_bias", None)
    return ModelIO(name="open_clip", family="open_clip", image_size=_int(visual.image_size),
                   channels=first_conv.in_channels if first_conv is not None else 3,
                   context_length=int(model.context_length), vocab_size=int(model.vocab_size), embed_dim=embed_dim,
                   logit_scale=scalar(model.logit_scale), logit_bias=scalar(bias) if bias is not None else None,
                   text_pooling=pooling, eos_token_id=eos, patch_size=patch)


def read_model_io(model, family: str) -> ModelIO:
    if family == "open_clip":
        return _open_clip_io(model)
    if family == "hf_siglip2":  # NaFlex inputs: its adapter (hf_siglip2.py) knows them
        return from_hf_siglip2(model).io
    return _hf_io(model, family)

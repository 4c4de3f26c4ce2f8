"""Single towers -> DualEncoderSpec with one tower (``text=None`` or ``vision=None``).

transformers: CLIPVisionModel / CLIPVisionModelWithProjection / CLIPTextModel / CLIPTextModelWithProjection, the
same four of MetaCLIP 2, SiglipVisionModel (also without its pooling head, as VLMs build it), SiglipTextModel,
Siglip2VisionModel (NaFlex); open_clip: ``model.visual`` (VisionTransformer or a timm ViT). The towers are read by
the same functions as the pairs' towers (hf_clip.py, hf_siglip.py, hf_siglip2.py, open_clip.py).
"""
from __future__ import annotations

from ..spec import DualEncoderSpec, ModelIO
from ._common import NotCovered
from .hf_clip import clip_text, clip_text_pooling, clip_vision
from .hf_siglip import siglip_text_tower, siglip_vision
from .hf_siglip2 import siglip2_vision
from .open_clip import vision_tower

# single towers: class name -> (family, tower); the module prefix must be transformers' or open_clip's
TOWER_CLASSES = {
    "CLIPVisionModel": ("hf_clip", "vision"), "CLIPVisionModelWithProjection": ("hf_clip", "vision"),
    "CLIPTextModel": ("hf_clip", "text"), "CLIPTextModelWithProjection": ("hf_clip", "text"),
    "MetaClip2VisionModel": ("hf_metaclip2", "vision"), "MetaClip2VisionModelWithProjection": ("hf_metaclip2", "vision"),
    "MetaClip2TextModel": ("hf_metaclip2", "text"), "MetaClip2TextModelWithProjection": ("hf_metaclip2", "text"),
    "SiglipVisionModel": ("hf_siglip", "vision"), "SiglipTextModel": ("hf_siglip", "text"),
    "Siglip2VisionModel": ("hf_siglip2", "vision"),
    "VisionTransformer": ("open_clip", "vision"), "TimmModel": ("open_clip", "vision"),  # open_clip model.visual
}


def from_tower(model) -> DualEncoderSpec:
    cls = type(model).__name__
    family, tower = TOWER_CLASSES[cls]
    proj = getattr(model, "visual_projection", None) if tower == "vision" else getattr(model, "text_projection", None)
    label = {"hf_clip": "HF CLIP", "hf_metaclip2": "HF MetaCLIP 2", "hf_siglip": "HF SigLIP",
             "hf_siglip2": "HF SigLIP2", "open_clip": "open_clip"}[family]
    extra = {}
    # transformers 5.2x: CLIPVisionModel / SiglipVisionModel / ... are the transformer itself; earlier releases
    # and the *WithProjection classes wrap it as vision_model / text_model
    inner = getattr(model, "vision_model" if tower == "vision" else "text_model", model)
    if family == "open_clip":
        if getattr(model, "output_tokens", False):
            raise ValueError("open_clip model.visual with output_tokens=True (it returns (pooled, tokens)): the fused "
                             "tower returns the pooled embeddings only; set visual.output_tokens = False before "
                             "fusing")
        spec = vision_tower(model)
        if getattr(model, "image_mean", None) is not None and getattr(model, "image_std", None) is not None:
            extra = {"image_mean": tuple(model.image_mean), "image_std": tuple(model.image_std)}
    elif family in ("hf_clip", "hf_metaclip2"):
        if tower == "vision":
            spec = clip_vision(model.config, inner, proj, label)
        else:
            tm = inner
            if family == "hf_metaclip2":  # always the first eos_token_id (hf_metaclip2.py)
                pooling, eos = "first_eos", int(tm.eos_token_id)
            else:
                pooling, eos = clip_text_pooling(model.config.eos_token_id)
            spec = clip_text(model.config, tm, proj, label, pooling, eos)
    elif family == "hf_siglip":
        spec = (siglip_vision(model.config, inner, head_required=False) if tower == "vision"
                else siglip_text_tower(model.config, inner, label))
    else:  # hf_siglip2: the NaFlex vision tower
        spec = siglip2_vision(model.config, inner)
    cfg = getattr(model, "config", None)
    name = (getattr(cfg, "_name_or_path", "") if cfg is not None else "") or f"{family} {tower} tower"
    towers = dict(vision=spec, text=None) if tower == "vision" else dict(vision=None, text=spec)
    return DualEncoderSpec(**towers, logit_scale=0.0, family=family, name=name, extra=extra)


def tower_io(model) -> ModelIO:
    """The ModelIO of a single tower, also one the spec cannot describe (read from its config / attributes)."""
    try:
        return from_tower(model).io
    except NotCovered:
        pass
    family, tower = TOWER_CLASSES[type(model).__name__]
    if family == "open_clip":
        from torch import nn

        size = model.image_size
        conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        return ModelIO(name="open_clip visual", family=family, image_size=int(size if isinstance(size, int)
                       else size[0]), channels=conv.in_channels if conv is not None else 3, context_length=0,
                       vocab_size=0, embed_dim=int(getattr(model, "output_dim", 0)), logit_scale=0.0,
                       towers=("vision",))
    cfg = model.config
    if tower == "vision":
        size, patch = cfg.image_size, cfg.patch_size
        return ModelIO(name=family, family=family, image_size=int(size if isinstance(size, int) else size[0]),
                       channels=cfg.num_channels, context_length=0, vocab_size=0, embed_dim=cfg.hidden_size,
                       logit_scale=0.0, patch_size=int(patch if isinstance(patch, int) else patch[0]),
                       towers=("vision",))
    return ModelIO(name=family, family=family, image_size=0, channels=0, context_length=cfg.max_position_embeddings,
                   vocab_size=cfg.vocab_size, embed_dim=cfg.hidden_size, logit_scale=0.0, towers=("text",))

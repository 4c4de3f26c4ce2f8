"""open_clip CLIP / CustomTextCLIP -> DualEncoderSpec.

Both classes share one text-tower reader: CLIP keeps the text modules on the model itself, CustomTextCLIP in
``model.text`` (an open_clip TextTransformer). Vision towers: open_clip's VisionTransformer here, a TimmModel
wrapping a timm VisionTransformer in timm_vit.py. Block parameters are matched by name (the attention module
class changed between open_clip versions); open_clip projections are ``x @ proj``, transposed here into
nn.Linear layout.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..spec import Block, DualEncoderSpec, Linear, PatchEmbed, TokenEmbed, TowerSpec
from ._common import NotCovered, checked_layer_norm, layer_norm, module_activation, patch_weight, scalar, t
from ._norm import image_normalization
from .timm_vit import timm_vision_tower

VISION = "open_clip vision tower"
TEXT = "open_clip text tower"
TEXT_POOLING = {"argmax": "argmax", "eos": "first_eos", "last": "last", "first": "cls"}


def _lin(sd: dict, prefix: str) -> Linear:
    bias = sd.get(prefix + ".bias")
    return Linear(t(sd[prefix + ".weight"]), t(bias) if bias is not None else None)



def resblocks(transformer: nn.Module, tower: str) -> tuple[list[Block], str, int, int]:
    """(blocks, activation, heads, mlp_dim) of an open_clip Transformer of plain ResidualAttentionBlocks."""
    blocks, acts = [], set()
    for i, blk in enumerate(transformer.resblocks):
        where = f"resblocks.{i}"
        if type(blk).__name__ != "ResidualAttentionBlock":
            raise NotCovered(tower, f"block {where} of type {type(blk).__name__}",
                             "qk-norm / scaled-cosine attention / extra norms")
        if not isinstance(blk.ls_1, nn.Identity) or not isinstance(blk.ls_2, nn.Identity):
            raise NotCovered(tower, f"LayerScale ({where}.ls_1 / ls_2)")
        if hasattr(blk, "ln_1_kv"):
            raise NotCovered(tower, f"cross-attention block {where}")
        attn = blk.attn
        if not isinstance(attn, nn.MultiheadAttention) or attn.bias_k is not None or attn.add_zero_attn:
            raise NotCovered(tower, f"attention {where}.attn ({type(attn).__name__})", "plain nn.MultiheadAttention")
        sd = blk.state_dict()
        if "attn.in_proj_weight" not in sd:
            raise NotCovered(tower, f"attention {where}.attn with separate q/k/v widths")
        acts.add(module_activation(blk.mlp.gelu if hasattr(blk.mlp, "gelu") else blk.mlp[1], tower))
        blocks.append(Block(
            ln1=checked_layer_norm(blk.ln_1, tower, f"{where}.ln_1"),
            qkv=Linear(t(sd["attn.in_proj_weight"]),
                       t(sd["attn.in_proj_bias"]) if sd.get("attn.in_proj_bias") is not None else None),
            out=_lin(sd, "attn.out_proj"),
            ln2=checked_layer_norm(blk.ln_2, tower, f"{where}.ln_2"),
            fc1=_lin(sd, "mlp.c_fc"),
            fc2=_lin(sd, "mlp.c_proj"),
        ))
    if len(acts) != 1:
        raise NotCovered(tower, f"mix of activations {sorted(acts)}")
    first = transformer.resblocks[0]
    return blocks, acts.pop(), first.attn.num_heads, blocks[0].fc1.out_features


def projection(p) -> Linear | None:
    if p is None:
        return None
    if isinstance(p, nn.Linear):
        return Linear(t(p.weight), t(p.bias) if p.bias is not None else None)
    return Linear(t(p.t()))  # open_clip stores [in, out] and computes x @ proj


@dataclass
class TextParts:
    """The modules of an open_clip text transformer, wherever the model keeps them."""

    token_embedding: nn.Embedding
    positional_embedding: torch.Tensor
    transformer: nn.Module
    ln_final: nn.Module
    text_projection: object  # nn.Parameter [width, out], nn.Linear, or None
    attn_mask: torch.Tensor | None
    pool_type: str
    eos_id: int | None


def text_parts(model) -> TextParts:
    if type(model).__name__ == "CLIP":
        return TextParts(model.token_embedding, model.positional_embedding, model.transformer, model.ln_final,
                         model.text_projection, getattr(model, "attn_mask", None),
                         getattr(model, "text_pool_type", "argmax"), getattr(model, "text_eos_id", None))
    text = model.text
    kind = type(text).__name__
    if kind != "TextTransformer":
        why = "a Hugging Face text model" if kind == "HFTextEncoder" else "not open_clip's TextTransformer"
        raise NotCovered(TEXT, f"{kind} ({why})")
    if getattr(text, "cls_emb", None) is not None:
        raise NotCovered(TEXT, "appended class token (embed_cls, CoCa-style)")
    if getattr(text, "use_pad_mask", False):
        raise NotCovered(TEXT, "padding attention mask (use_pad_mask)")
    return TextParts(text.token_embedding, text.positional_embedding, text.transformer, text.ln_final,
                     text.text_projection, text.attn_mask, text.pool_type, getattr(text, "eos_id", None))


def _mask_kind(mask: torch.Tensor | None) -> str:
    if mask is None:
        return "none"
    if not mask.is_meta:  # a meta buffer has no values: open_clip only ever builds the causal one
        n = mask.shape[0]
        if not torch.equal(mask.float().cpu(), torch.full((n, n), float("-inf")).triu(1)):
            raise NotCovered(TEXT, "attention mask that is not plain causal")
    return "causal"


def text_tower(parts: TextParts) -> TowerSpec:
    if parts.pool_type not in TEXT_POOLING:
        raise NotCovered(TEXT, f"pool_type {parts.pool_type!r}", f"covered: {', '.join(TEXT_POOLING)}")
    blocks, act, heads, mlp_dim = resblocks(parts.transformer, TEXT)
    pooling = TEXT_POOLING[parts.pool_type]
    return TowerSpec(
        kind="text", width=parts.token_embedding.weight.shape[1], heads=heads, mlp_dim=mlp_dim, activation=act,
        mask=_mask_kind(parts.attn_mask), embed=TokenEmbed(t(parts.token_embedding.weight)),
        pos_embedding=t(parts.positional_embedding), blocks=blocks,
        final_ln=checked_layer_norm(parts.ln_final, TEXT, "ln_final"), pooling=pooling,
        eos_token_id=int(parts.eos_id) if pooling == "first_eos" else None,
        projection=projection(parts.text_projection),
    )


def _image_hw(size) -> tuple[int, int | None]:
    """(image_size, image_width or None when square) from an int or (h, w)."""
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(h), (None if h == w else int(w))


def vit_vision_tower(visual) -> TowerSpec:
    """open_clip's own VisionTransformer, pooled at the class token."""
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "attn_pool_contrastive", None) is not None:
        raise NotCovered(VISION, "attentional pooler (attn_pool, CoCa-style)")
    if getattr(visual, "pool_type", "tok") != "tok":
        raise NotCovered(VISION, f"pool_type {visual.pool_type!r}", "covered: 'tok' (the class token)")
    # final_ln_after_pool needs nothing: LN is per token, so LN then pool == pool then LN
    blocks, act, heads, mlp_dim = resblocks(visual.transformer, VISION)
    w, b = patch_weight(visual.conv1, VISION)
    h, width = _image_hw(visual.image_size)
    pre_ln = None if isinstance(visual.ln_pre, nn.Identity) else checked_layer_norm(visual.ln_pre, VISION, "ln_pre")
    return TowerSpec(
        kind="vision", width=visual.conv1.out_channels, heads=heads, mlp_dim=mlp_dim, activation=act, mask="none",
        embed=PatchEmbed(w, b, visual.conv1.kernel_size[0], h, visual.conv1.in_channels,
                         **({"image_width": width} if width is not None else {})),
        pos_embedding=t(visual.positional_embedding), class_embedding=t(visual.class_embedding),
        pre_ln=pre_ln, blocks=blocks, final_ln=checked_layer_norm(visual.ln_post, VISION, "ln_post"), pooling="cls",
        projection=projection(visual.proj),
    )


def vision_tower(visual) -> TowerSpec:
    kind = type(visual).__name__
    if kind == "VisionTransformer":
        return vit_vision_tower(visual)
    if kind == "TimmModel":
        return timm_vision_tower(visual, VISION)
    if kind == "ModifiedResNet":
        raise NotCovered(VISION, "ModifiedResNet (a convolutional tower)")
    raise NotCovered(VISION, f"{kind}", "covered: open_clip VisionTransformer, timm VisionTransformer")


def from_open_clip(model) -> DualEncoderSpec:
    vision = vision_tower(model.visual)
    text = text_tower(text_parts(model))
    bias = getattr(model, "logit_bias", None)
    mean, std = image_normalization(model, "open_clip")  # kept for uint8 frames (executors fold it in)
    return DualEncoderSpec(vision, text, logit_scale=scalar(model.logit_scale),
                           logit_bias=scalar(bias) if bias is not None else None,
                           family="open_clip", name="open_clip", extra={"image_mean": mean, "image_std": std})

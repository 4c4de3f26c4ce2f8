"""open_clip CLIP -> DualEncoderSpec.

Parameters are matched by name (the attention module class changed between open_clip versions);
projections are ``x @ proj`` in open_clip, so they are transposed into nn.Linear layout here.
"""
from __future__ import annotations

import torch
from torch import nn

from ..spec import Block, DualEncoderSpec, LayerNorm, Linear, PatchEmbed, TokenEmbed, TowerSpec
from ._common import patch_weight, t

_UNSUPPORTED_VISUAL = ("attn_pool", "attn_pool_contrastive")


def _ln(sd: dict, prefix: str, eps: float) -> LayerNorm:
    return LayerNorm(t(sd[prefix + ".weight"]), t(sd[prefix + ".bias"]), eps)


def _lin(sd: dict, prefix: str) -> Linear:
    bias = sd.get(prefix + ".bias")
    return Linear(t(sd[prefix + ".weight"]), t(bias) if bias is not None else None)


def _blocks(sd: dict, prefix: str, n: int, eps: float) -> list[Block]:
    out = []
    for i in range(n):
        p = f"{prefix}.resblocks.{i}"
        if f"{p}.ls_1.gamma" in sd or f"{p}.ln_attn.weight" in sd or f"{p}.attn.head_scale" in sd:
            raise ValueError(f"open_clip block {p} uses LayerScale / scaled-cosine / extra norms, which are not supported")
        out.append(Block(
            ln1=_ln(sd, f"{p}.ln_1", eps),
            qkv=Linear(t(sd[f"{p}.attn.in_proj_weight"]), t(sd[f"{p}.attn.in_proj_bias"])),
            out=_lin(sd, f"{p}.attn.out_proj"),
            ln2=_ln(sd, f"{p}.ln_2", eps),
            fc1=_lin(sd, f"{p}.mlp.c_fc"),
            fc2=_lin(sd, f"{p}.mlp.c_proj"),
        ))
    return out


def _activation(transformer: nn.Module) -> str:
    mlp = transformer.resblocks[0].mlp
    act = mlp.gelu if hasattr(mlp, "gelu") else mlp[1]
    name = type(act).__name__
    if name == "QuickGELU":
        return "quick_gelu"
    if name == "GELU":
        return "gelu_tanh" if getattr(act, "approximate", "none") == "tanh" else "gelu"
    raise ValueError(f"open_clip MLP activation {name} is not supported (QuickGELU or GELU)")


def _eps(transformer: nn.Module) -> float:
    return float(transformer.resblocks[0].ln_1.eps)


def _proj(p) -> Linear:
    if isinstance(p, nn.Linear):
        return Linear(t(p.weight), t(p.bias) if p.bias is not None else None)
    return Linear(t(p.t()))  # open_clip stores [in, out] and computes x @ proj


def from_open_clip(model) -> DualEncoderSpec:
    visual = model.visual
    if type(visual).__name__ != "VisionTransformer":
        raise ValueError(f"open_clip visual tower {type(visual).__name__} is not supported (only VisionTransformer)")
    for attr in _UNSUPPORTED_VISUAL:
        if getattr(visual, attr, None) is not None:
            raise ValueError("open_clip vision towers with attentional pooling are not supported")
    if getattr(visual, "pool_type", "tok") != "tok" or getattr(visual, "final_ln_after_pool", False):
        raise ValueError(f"open_clip vision pool_type {visual.pool_type!r} is not supported (only 'tok')")
    text_pool = getattr(model, "text_pool_type", "argmax")
    pool_map = {"argmax": "argmax", "eos": "first_eos", "last": "last", "first": "cls"}
    if text_pool not in pool_map:
        raise ValueError(f"open_clip text pool_type {text_pool!r} is not supported ({list(pool_map)})")
    if not hasattr(model, "token_embedding"):
        raise ValueError("only open_clip CLIP with the built-in text transformer is supported (not CustomTextCLIP/HF text)")

    sd = {k: v for k, v in model.state_dict().items()}
    veps, teps = _eps(visual.transformer), _eps(model.transformer)
    w, b = patch_weight(visual.conv1)
    image_size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
    patch = visual.conv1.kernel_size[0]
    width = visual.conv1.out_channels
    if isinstance(visual.ln_pre, nn.Identity):
        pre_ln = None
    else:
        pre_ln = _ln(sd, "visual.ln_pre", float(visual.ln_pre.eps))
    vision = TowerSpec(
        kind="vision", width=width, heads=visual.transformer.resblocks[0].attn.num_heads,
        mlp_dim=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        activation=_activation(visual.transformer), mask="none",
        embed=PatchEmbed(w, b, patch, image_size, visual.conv1.in_channels),
        pos_embedding=t(sd["visual.positional_embedding"]), class_embedding=t(sd["visual.class_embedding"]),
        pre_ln=pre_ln, blocks=_blocks(sd, "visual.transformer", len(visual.transformer.resblocks), veps),
        final_ln=_ln(sd, "visual.ln_post", float(visual.ln_post.eps)), pooling="cls",
        projection=_proj(visual.proj) if visual.proj is not None else None,
    )
    mask = getattr(model, "attn_mask", None)
    if mask is not None:
        n = mask.shape[0]
        causal_ref = torch.full((n, n), float("-inf")).triu(1)
        if not torch.equal(mask.float().cpu(), causal_ref):
            raise ValueError("open_clip text attn_mask is not a plain causal mask; not supported")
    eos = getattr(model, "text_eos_id", None)
    text = TowerSpec(
        kind="text", width=model.token_embedding.weight.shape[1],
        heads=model.transformer.resblocks[0].attn.num_heads,
        mlp_dim=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        activation=_activation(model.transformer), mask="causal" if mask is not None else "none",
        embed=TokenEmbed(t(sd["token_embedding.weight"])), pos_embedding=t(sd["positional_embedding"]),
        blocks=_blocks(sd, "transformer", len(model.transformer.resblocks), teps),
        final_ln=_ln(sd, "ln_final", float(model.ln_final.eps)), pooling=pool_map[text_pool],
        eos_token_id=int(eos) if text_pool == "eos" else None,
        projection=_proj(model.text_projection) if model.text_projection is not None else None,
    )
    bias = getattr(model, "logit_bias", None)
    return DualEncoderSpec(vision, text, logit_scale=float(model.logit_scale.detach().reshape(())),
                           logit_bias=float(bias.detach().reshape(())) if bias is not None else None,
                           family="open_clip", name="open_clip")

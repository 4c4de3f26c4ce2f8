"""HF transformers Siglip2Model (NaFlex) -> DualEncoderSpec.

SigLIP2 is SigLIP with a NaFlex vision embedding: images come as patch sequences (see spec.PatchSequence), the
patch "convolution" is an nn.Linear over patches flattened in (ph, pw, c) order, and the position embedding is a
G x G grid resized to each image's patch grid. Everything after the embedding is SigLIP's.
"""
from __future__ import annotations

import math

import torch

from ..spec import DualEncoderSpec, PatchEmbed, TowerSpec
from ._common import hf_activation, layer_norm, scalar, t
from .hf_clip import encoder_blocks
from .hf_siglip import map_head, siglip_text_tower


def _patch_weight(lin, patch: int, channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """nn.Linear columns in (ph, pw, c) order -> the spec's [D, C*p*p] in (c, ph, pw) order."""
    w = lin.weight.detach()
    if w.shape[1] != channels * patch * patch:
        raise ValueError(f"patch_embedding has {w.shape[1]} inputs, expected channels*patch*patch = "
                         f"{channels}*{patch}*{patch}")
    w = w.reshape(w.shape[0], patch, patch, channels).permute(0, 3, 1, 2).reshape(w.shape[0], -1)
    return t(w), (t(lin.bias) if lin.bias is not None else None)


def from_hf_siglip2(model) -> DualEncoderSpec:
    vcfg, tcfg = model.config.vision_config, model.config.text_config
    vision = siglip2_vision(vcfg, model.vision_model)
    return DualEncoderSpec(vision, siglip_text_tower(tcfg, model.text_model, "HF SigLIP2"),
                           logit_scale=scalar(model.logit_scale), logit_bias=scalar(model.logit_bias),
                           family="hf_siglip2", name=getattr(model.config, "_name_or_path", "") or "hf_siglip2")


def siglip2_vision(vcfg, vm) -> TowerSpec:
    """SigLIP2's NaFlex vision transformer (position grid resized per image grid) with its attention-pooling head."""
    pool_head = map_head(vm)
    patch = vcfg.patch_size
    if not isinstance(patch, int):
        raise ValueError(f"only square int patch sizes are supported, got patch_size={patch!r}")
    emb = vm.embeddings
    grid = math.isqrt(vcfg.num_patches)
    if grid * grid != vcfg.num_patches:  # HF reshapes the table to int(sqrt(n)) squared and would fail too
        raise ValueError(f"num_patches {vcfg.num_patches} is not a square grid of position embeddings")
    w, b = _patch_weight(emb.patch_embedding, patch, vcfg.num_channels)
    vision = TowerSpec(
        kind="vision", width=vcfg.hidden_size, heads=vcfg.num_attention_heads, mlp_dim=vcfg.intermediate_size,
        activation=hf_activation(vcfg.hidden_act, "HF SigLIP2 vision tower"), mask="none",
        # image_size: the native resolution, where the position grid is used as is (no resize)
        embed=PatchEmbed(w, b, patch, grid * patch, vcfg.num_channels, pos_grid=grid),
        pos_embedding=t(emb.position_embedding.weight),  # [G*G, D], row-major over the grid
        blocks=encoder_blocks(vm.encoder), final_ln=layer_norm(vm.post_layernorm), pooling="map", pool_head=pool_head,
    )
    return vision

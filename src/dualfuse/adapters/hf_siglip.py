"""HF transformers SiglipModel -> DualEncoderSpec."""
from __future__ import annotations

from ..spec import AttentionPoolHead, DualEncoderSpec, Linear, PatchEmbed, TokenEmbed, TowerSpec
from ._common import hf_activation, layer_norm, linear, patch_weight, scalar, t
from .hf_clip import _blocks


def from_hf_siglip(model) -> DualEncoderSpec:
    vcfg, tcfg = model.config.vision_config, model.config.text_config
    vm, tm = model.vision_model, model.text_model
    if not getattr(vm, "use_head", True) or not hasattr(vm, "head"):
        raise ValueError("SigLIP vision towers without the attention-pooling head (vision_use_head=False) are not supported")
    w, b = patch_weight(vm.embeddings.patch_embedding)
    act = hf_activation(vcfg.hidden_act)
    head = vm.head
    mha = head.attention
    pool_head = AttentionPoolHead(
        probe=t(head.probe.reshape(-1)),
        qkv=Linear(t(mha.in_proj_weight), t(mha.in_proj_bias) if mha.in_proj_bias is not None else None),
        out=linear(mha.out_proj), ln=layer_norm(head.layernorm),
        fc1=linear(head.mlp.fc1), fc2=linear(head.mlp.fc2), heads=mha.num_heads,
    )
    vision = TowerSpec(
        kind="vision", width=vcfg.hidden_size, heads=vcfg.num_attention_heads, mlp_dim=vcfg.intermediate_size,
        activation=act, mask="none",
        embed=PatchEmbed(w, b, vcfg.patch_size, vcfg.image_size, vcfg.num_channels),
        pos_embedding=t(vm.embeddings.position_embedding.weight),
        blocks=_blocks(vm.encoder), final_ln=layer_norm(vm.post_layernorm), pooling="map", pool_head=pool_head,
    )
    text = TowerSpec(
        kind="text", width=tcfg.hidden_size, heads=tcfg.num_attention_heads, mlp_dim=tcfg.intermediate_size,
        activation=hf_activation(tcfg.hidden_act), mask="none",
        embed=TokenEmbed(t(tm.embeddings.token_embedding.weight)),
        pos_embedding=t(tm.embeddings.position_embedding.weight),
        blocks=_blocks(tm.encoder), final_ln=layer_norm(tm.final_layer_norm), pooling="last",
        projection=linear(tm.head),
    )
    return DualEncoderSpec(vision, text, logit_scale=scalar(model.logit_scale),
                           logit_bias=scalar(model.logit_bias), family="hf_siglip",
                           name=getattr(model.config, "_name_or_path", "") or "hf_siglip")

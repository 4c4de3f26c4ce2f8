"""HF transformers SiglipModel -> DualEncoderSpec."""
from __future__ import annotations

from ..spec import AttentionPoolHead, DualEncoderSpec, Linear, PatchEmbed, TokenEmbed, TowerSpec
from ._common import hf_activation, layer_norm, linear, patch_weight, scalar, t
from .hf_clip import encoder_blocks


def map_head(vm) -> AttentionPoolHead:
    """The vision tower's MAP head (SigLIP and SigLIP2 share it): probe, nn.MultiheadAttention, LN, MLP."""
    if not getattr(vm, "use_head", True) or not hasattr(vm, "head"):
        raise ValueError("SigLIP vision towers without the attention-pooling head (vision_use_head=False) are not supported")
    head = vm.head
    mha = head.attention
    return AttentionPoolHead(
        probe=t(head.probe.reshape(-1)),
        qkv=Linear(t(mha.in_proj_weight), t(mha.in_proj_bias) if mha.in_proj_bias is not None else None),
        out=linear(mha.out_proj), ln=layer_norm(head.layernorm),
        fc1=linear(head.mlp.fc1), fc2=linear(head.mlp.fc2), heads=mha.num_heads,
    )


def siglip_text_tower(tcfg, tm, label: str) -> TowerSpec:
    """SigLIP's (and SigLIP2's) text tower: no causal mask, pooled at the last token, then the `head` Linear."""
    return TowerSpec(
        kind="text", width=tcfg.hidden_size, heads=tcfg.num_attention_heads, mlp_dim=tcfg.intermediate_size,
        activation=hf_activation(tcfg.hidden_act, f"{label} text tower"), mask="none",
        embed=TokenEmbed(t(tm.embeddings.token_embedding.weight)),
        pos_embedding=t(tm.embeddings.position_embedding.weight),
        blocks=encoder_blocks(tm.encoder), final_ln=layer_norm(tm.final_layer_norm), pooling="last",
        projection=linear(tm.head),
    )


def siglip_vision(vcfg, vm, head_required: bool = True) -> TowerSpec:
    """SigLIP's vision transformer; without its attention-pooling head (``vision_use_head=False``, as in
    PaliGemma's tower) the tower has no pooled output (pooling "none"): only when ``head_required`` is False."""
    if not head_required and (not getattr(vm, "use_head", True) or not hasattr(vm, "head")):
        pool_head, pooling = None, "none"
    else:
        pool_head, pooling = map_head(vm), "map"
    w, b = patch_weight(vm.embeddings.patch_embedding, "HF SigLIP vision tower")
    return TowerSpec(
        kind="vision", width=vcfg.hidden_size, heads=vcfg.num_attention_heads, mlp_dim=vcfg.intermediate_size,
        activation=hf_activation(vcfg.hidden_act, "HF SigLIP vision tower"), mask="none",
        embed=PatchEmbed(w, b, vcfg.patch_size, vcfg.image_size, vcfg.num_channels),
        pos_embedding=t(vm.embeddings.position_embedding.weight),
        blocks=encoder_blocks(vm.encoder), final_ln=layer_norm(vm.post_layernorm), pooling=pooling, pool_head=pool_head,
    )


def from_hf_siglip(model) -> DualEncoderSpec:
    vcfg, tcfg = model.config.vision_config, model.config.text_config
    vision = siglip_vision(vcfg, model.vision_model)
    tm = model.text_model
    return DualEncoderSpec(vision, siglip_text_tower(tcfg, tm, "HF SigLIP"), logit_scale=scalar(model.logit_scale),
                           logit_bias=scalar(model.logit_bias), family="hf_siglip",
                           name=getattr(model.config, "_name_or_path", "") or "hf_siglip")

"""HF transformers CLIPModel -> DualEncoderSpec."""
from __future__ import annotations

from ..spec import Block, DualEncoderSpec, PatchEmbed, TokenEmbed, TowerSpec
from ._common import hf_activation, layer_norm, linear, packed_linear, patch_weight, scalar, t


def _blocks(encoder) -> list[Block]:
    return [
        Block(
            ln1=layer_norm(layer.layer_norm1),
            qkv=packed_linear(layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj),
            out=linear(layer.self_attn.out_proj),
            ln2=layer_norm(layer.layer_norm2),
            fc1=linear(layer.mlp.fc1),
            fc2=linear(layer.mlp.fc2),
        )
        for layer in encoder.layers
    ]


def from_hf_clip(model) -> DualEncoderSpec:
    vcfg, tcfg = model.config.vision_config, model.config.text_config
    vm, tm = model.vision_model, model.text_model
    w, b = patch_weight(vm.embeddings.patch_embedding)
    vision = TowerSpec(
        kind="vision", width=vcfg.hidden_size, heads=vcfg.num_attention_heads, mlp_dim=vcfg.intermediate_size,
        activation=hf_activation(vcfg.hidden_act), mask="none",
        embed=PatchEmbed(w, b, vcfg.patch_size, vcfg.image_size, vcfg.num_channels),
        pos_embedding=t(vm.embeddings.position_embedding.weight),
        class_embedding=t(vm.embeddings.class_embedding),
        pre_ln=layer_norm(vm.pre_layrnorm),
        blocks=_blocks(vm.encoder), final_ln=layer_norm(vm.post_layernorm), pooling="cls",
        projection=linear(model.visual_projection),
    )
    # Before HF PR #24773 CLIP configs carried eos_token_id 2 and pooled at input_ids.argmax().
    eos = tcfg.eos_token_id
    text = TowerSpec(
        kind="text", width=tcfg.hidden_size, heads=tcfg.num_attention_heads, mlp_dim=tcfg.intermediate_size,
        activation=hf_activation(tcfg.hidden_act), mask="causal",
        embed=TokenEmbed(t(tm.embeddings.token_embedding.weight)),
        pos_embedding=t(tm.embeddings.position_embedding.weight),
        blocks=_blocks(tm.encoder), final_ln=layer_norm(tm.final_layer_norm),
        pooling="argmax" if eos == 2 else "first_eos", eos_token_id=None if eos == 2 else int(eos),
        projection=linear(model.text_projection),
    )
    return DualEncoderSpec(vision, text, logit_scale=scalar(model.logit_scale), family="hf_clip",
                           name=getattr(model.config, "_name_or_path", "") or "hf_clip")

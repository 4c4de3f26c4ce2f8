"""HF transformers CLIPModel -> DualEncoderSpec (MetaClip2Model reuses the towers: hf_metaclip2.py)."""
from __future__ import annotations

from ..spec import Block, DualEncoderSpec, PatchEmbed, TokenEmbed, TowerSpec
from ._common import hf_activation, layer_norm, linear, packed_linear, patch_weight, scalar, t


def encoder_blocks(encoder) -> list[Block]:
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


def clip_vision_tower(model, label: str) -> TowerSpec:
    """CLIP's vision tower: class token, pre-LN, LN on the class token, visual_projection."""
    return clip_vision(model.config.vision_config, model.vision_model, model.visual_projection, label)


def clip_vision(vcfg, vm, projection, label: str) -> TowerSpec:
    """A CLIP vision transformer (``vision_model``) and its projection (None: the pooled, LN'd class token is the
    output, as CLIPVisionModel's pooler_output)."""
    w, b = patch_weight(vm.embeddings.patch_embedding, f"{label} vision tower")
    return TowerSpec(
        kind="vision", width=vcfg.hidden_size, heads=vcfg.num_attention_heads, mlp_dim=vcfg.intermediate_size,
        activation=hf_activation(vcfg.hidden_act, f"{label} vision tower"), mask="none",
        embed=PatchEmbed(w, b, vcfg.patch_size, vcfg.image_size, vcfg.num_channels),
        pos_embedding=t(vm.embeddings.position_embedding.weight),
        class_embedding=t(vm.embeddings.class_embedding),
        pre_ln=layer_norm(vm.pre_layrnorm),
        blocks=encoder_blocks(vm.encoder), final_ln=layer_norm(vm.post_layernorm), pooling="cls",
        projection=linear(projection) if projection is not None else None,
    )


def clip_text_tower(model, label: str, pooling: str, eos_token_id: int | None) -> TowerSpec:
    """CLIP's causal text tower pooled at one token, then text_projection."""
    return clip_text(model.config.text_config, model.text_model, model.text_projection, label, pooling, eos_token_id)


def clip_text(tcfg, tm, projection, label: str, pooling: str, eos_token_id: int | None) -> TowerSpec:
    """A CLIP text transformer (``text_model``) and its projection (None: the pooled token after the final LN)."""
    return TowerSpec(
        kind="text", width=tcfg.hidden_size, heads=tcfg.num_attention_heads, mlp_dim=tcfg.intermediate_size,
        activation=hf_activation(tcfg.hidden_act, f"{label} text tower"), mask="causal",
        embed=TokenEmbed(t(tm.embeddings.token_embedding.weight)),
        pos_embedding=t(tm.embeddings.position_embedding.weight),
        blocks=encoder_blocks(tm.encoder), final_ln=layer_norm(tm.final_layer_norm),
        pooling=pooling, eos_token_id=eos_token_id,
        projection=linear(projection) if projection is not None else None,
    )


def clip_text_pooling(eos: int) -> tuple[str, int | None]:
    """Before HF PR #24773 CLIP configs carried eos_token_id 2 and CLIPTextTransformer still pools those at
    input_ids.argmax(); newer configs pool at the first eos_token_id."""
    return ("argmax", None) if eos == 2 else ("first_eos", int(eos))


def from_hf_clip(model) -> DualEncoderSpec:
    pooling, eos = clip_text_pooling(model.config.text_config.eos_token_id)
    return DualEncoderSpec(clip_vision_tower(model, "HF CLIP"), clip_text_tower(model, "HF CLIP", pooling, eos),
                           logit_scale=scalar(model.logit_scale), family="hf_clip",
                           name=getattr(model.config, "_name_or_path", "") or "hf_clip")

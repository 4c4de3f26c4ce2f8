"""HF transformers MetaClip2Model -> DualEncoderSpec.

MetaCLIP 2 is CLIP's architecture (same modules), but its text tower always pools at the first
``eos_token_id``, also when that id is 2 (XLM-V's ``</s>``, as in the released configs), where CLIPModel
would fall back to argmax. Hence its own family.
"""
from __future__ import annotations

from ..spec import DualEncoderSpec
from ._common import scalar
from .hf_clip import clip_text_tower, clip_vision_tower


def from_hf_metaclip2(model) -> DualEncoderSpec:
    eos = int(model.text_model.eos_token_id)
    return DualEncoderSpec(clip_vision_tower(model, "HF MetaCLIP 2"),
                           clip_text_tower(model, "HF MetaCLIP 2", "first_eos", eos),
                           logit_scale=scalar(model.logit_scale), family="hf_metaclip2",
                           name=getattr(model.config, "_name_or_path", "") or "hf_metaclip2")

"""Adapters: read a user's model object (never modifying it) into a DualEncoderSpec."""
from __future__ import annotations

from ..spec import DualEncoderSpec

SUPPORTED = "transformers CLIPModel, transformers SiglipModel, open_clip CLIP (ViT towers), or a DualEncoderSpec"


def family_of(model) -> str:
    """'hf_clip' | 'hf_siglip' | 'open_clip' for supported model objects, else ValueError listing what is supported."""
    name = type(model).__name__
    module = type(model).__module__
    if name == "CLIPModel" and module.startswith("transformers"):
        return "hf_clip"
    if name == "SiglipModel" and module.startswith("transformers"):
        return "hf_siglip"
    if name in ("CLIP",) and module.startswith("open_clip"):
        return "open_clip"
    raise ValueError(f"unsupported model class {module}.{name}; supported: {SUPPORTED}")


def to_spec(model) -> DualEncoderSpec:
    """The canonical spec of a supported model (weights copied, fp32 unless the model is in another dtype)."""
    if isinstance(model, DualEncoderSpec):
        return model
    family = family_of(model)
    if family == "hf_clip":
        from .hf_clip import from_hf_clip
        return from_hf_clip(model)
    if family == "hf_siglip":
        from .hf_siglip import from_hf_siglip
        return from_hf_siglip(model)
    from .open_clip import from_open_clip
    return from_open_clip(model)

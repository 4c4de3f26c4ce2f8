"""Adapters: read a user's model object (never modifying it) into a DualEncoderSpec.

Three outcomes for a model object:
- a family the stock executors run whose towers the spec describes: ``to_spec`` returns the spec;
- a family the stock executors run, but a tower the spec cannot describe (a convolutional image tower,
  LayerScale, ...): ``to_spec`` raises :class:`NotCovered` naming the tower and why; ``model_io`` still works;
- anything else: ``ValueError("unsupported model class ...")``.
"""
from __future__ import annotations

from ..spec import DualEncoderSpec, ModelIO
from ._common import NotCovered
from ._io import read_model_io
from ._norm import image_normalization as _image_normalization
from .hf_clip import from_hf_clip
from .hf_metaclip2 import from_hf_metaclip2
from .hf_siglip import from_hf_siglip
from .hf_siglip2 import from_hf_siglip2
from .open_clip import from_open_clip
from .towers import TOWER_CLASSES, from_tower, tower_io

SUPPORTED = ("transformers CLIPModel, MetaClip2Model, SiglipModel, Siglip2Model, open_clip CLIP / CustomTextCLIP, "
             "or a DualEncoderSpec")

# (module prefix, class name) -> family; the family names how executors.base.source_forward calls the model
_FAMILIES = {
    ("transformers", "CLIPModel"): "hf_clip",
    ("transformers", "MetaClip2Model"): "hf_metaclip2",
    ("transformers", "SiglipModel"): "hf_siglip",
    ("transformers", "Siglip2Model"): "hf_siglip2",
    ("open_clip", "CLIP"): "open_clip",
    ("open_clip", "CustomTextCLIP"): "open_clip",
}


for _name, (_family, _) in TOWER_CLASSES.items():
    _FAMILIES[("open_clip" if _family == "open_clip" else "transformers", _name)] = _family
SUPPORTED += (", a single tower (" + ", ".join(n for n in TOWER_CLASSES if TOWER_CLASSES[n][0] != "open_clip")
              + ", open_clip model.visual)")


def tower_of(model) -> str | None:
    """"vision" or "text" for a single-tower model object (or spec), None for a dual encoder."""
    if isinstance(model, DualEncoderSpec):
        return model.tower
    family_of(model)
    return TOWER_CLASSES.get(type(model).__name__, (None, None))[1]


def family_of(model) -> str:
    """'hf_clip' | 'hf_metaclip2' | 'hf_siglip' | 'hf_siglip2' | 'open_clip' for runnable model objects,
    else ValueError listing what is supported."""
    cls = type(model)
    family = _FAMILIES.get((cls.__module__.split(".")[0], cls.__name__))
    if family is None:
        raise ValueError(f"unsupported model class {cls.__module__}.{cls.__name__}{_vlm_hint(model)}; supported: "
                         f"{SUPPORTED}")
    return family


def _vlm_hint(model) -> str:
    """For a VLM (a model with a vision_tower): how to fuse its tower in place."""
    for path in ("model.vision_tower", "vision_tower"):
        obj = model
        for name in path.split("."):
            obj = getattr(obj, name, None)
        if obj is not None and type(obj).__name__ in TOWER_CLASSES:
            return (f" (a VLM with a {type(obj).__name__} vision tower: fuse the tower in place, "
                    f"m.{path} = dualfuse.fuse(m.{path}); docs/towers.md)")
    return ""


def to_spec(model) -> DualEncoderSpec:
    """The canonical spec of a supported model (weights copied, fp32 unless the model is in another dtype).
    Raises NotCovered when the family is runnable but a tower is not expressible in the spec."""
    if isinstance(model, DualEncoderSpec):
        return model
    family = family_of(model)
    if tower_of(model) is not None:  # a single tower (adapters/towers.py)
        return from_tower(model)
    if family == "hf_clip":
        return from_hf_clip(model)
    if family == "hf_metaclip2":
        return from_hf_metaclip2(model)
    if family == "hf_siglip":
        return from_hf_siglip(model)
    if family == "hf_siglip2":
        return from_hf_siglip2(model)
    return from_open_clip(model)


def model_io(model) -> ModelIO:
    """Inputs and outputs of any runnable model, covered or not (read from its config / attributes, no weights
    copied); equals ``to_spec(model).io`` for a covered model."""
    if isinstance(model, DualEncoderSpec):
        return model.io
    if tower_of(model) is not None:  # a single tower (adapters/towers.py)
        return tower_io(model)
    return read_model_io(model, family_of(model))


def image_normalization(model, family: str | None = None, **kwargs):
    """The model's image ``(mean, std)`` per channel (family default, open_clip's ``visual.image_mean/std``,
    overrides); see adapters/_norm.py."""
    if family is None and not isinstance(model, DualEncoderSpec):
        family = family_of(model)
    return _image_normalization(model, family, **kwargs)

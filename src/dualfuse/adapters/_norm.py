"""The image normalization a model was trained with (mean / std per channel), for camera frames passed as uint8:
the fused executor folds it into the patch-embedding weights, the stock executors apply it on the host.

Family defaults: CLIP and MetaCLIP 2 use OpenAI's mean/std; SigLIP and SigLIP 2 use 0.5 / 0.5; open_clip models
use ``model.visual.image_mean`` / ``image_std`` when set (open_clip's ``create_model`` sets them from the
pretrained config), else OpenAI's. A spec carries what its adapter read in ``spec.extra["image_mean"]`` /
``["image_std"]``.
"""
from __future__ import annotations

import torch

from ..spec import DualEncoderSpec

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

FAMILY_DEFAULTS = {
    "hf_clip": (OPENAI_MEAN, OPENAI_STD),
    "hf_metaclip2": (OPENAI_MEAN, OPENAI_STD),
    "hf_siglip": (SIGLIP_MEAN, SIGLIP_STD),
    "hf_siglip2": (SIGLIP_MEAN, SIGLIP_STD),
    "open_clip": (OPENAI_MEAN, OPENAI_STD),
}


def _floats(x, what: str, channels: int | None) -> tuple[float, ...]:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().reshape(-1).tolist()
    if isinstance(x, (int, float)):
        x = (float(x),) * (channels or 3)
    try:
        if isinstance(x, (str, bytes)):
            raise TypeError
        vals = tuple(float(v) for v in x)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: expected a sequence of {channels or 3} floats (one per channel), got "
                         f"{type(x).__name__}") from None
    if channels is not None and len(vals) != channels:
        raise ValueError(f"{what}: expected {channels} values (one per channel), got {len(vals)}: {vals}")
    if not all(v == v and abs(v) != float("inf") for v in vals):
        raise ValueError(f"{what}: expected finite values, got {vals}")
    return vals


def image_normalization(model, family: str | None = None, *, image_mean=None, image_std=None,
                        channels: int | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` per channel for a source model or a DualEncoderSpec; ``image_mean`` / ``image_std``
    override (a sequence per channel, or one number for all). ValueError for a wrong count or a std <= 0."""
    mean = std = None
    if isinstance(model, DualEncoderSpec):
        family = family or model.family
        mean, std = model.extra.get("image_mean"), model.extra.get("image_std")
    elif family == "open_clip":
        vis = getattr(model, "visual", model)  # a CLIP model, or its visual tower alone
        mean, std = getattr(vis, "image_mean", None), getattr(vis, "image_std", None)
    if mean is None or std is None:
        mean, std = FAMILY_DEFAULTS.get(family, (OPENAI_MEAN, OPENAI_STD))
    if image_mean is not None:
        mean = image_mean
    if image_std is not None:
        std = image_std
    mean = _floats(mean, "image_mean", channels)
    std = _floats(std, "image_std", channels)
    if len(mean) != len(std):
        raise ValueError(f"image_mean / image_std: expected one value per channel each, got {len(mean)} and "
                         f"{len(std)}")
    if any(s <= 0 for s in std):
        raise ValueError(f"image_std: expected positive values, got {std}")
    return mean, std

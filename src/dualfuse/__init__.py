"""dualfuse: profile, fuse and evaluate dual-encoder vision-language models (CLIP, SigLIP)."""
from __future__ import annotations

from .adapters import to_spec
from .config import FusedConfig, GemmConfig
from .presets import PRESETS, load
from .spec import DualEncoderSpec, TowerSpec
from .version import __version__


def fuse(model, dtype=None, device=None, config: FusedConfig | None = None, **kwargs):
    """The source model as a drop-in nn.Module running both towers as one co-scheduled stream of fused launches;
    see dualfuse.executors.dropin (the drop-in) and dualfuse.executors.fused (the executor). ``config``: the
    executor's options (:class:`FusedConfig`); ``kwargs``: any of its fields, applied over ``config``. A single tower
    (CLIPVisionModel, SiglipVisionModel, a VLM's ``vision_tower``, ...) gives a FusedTower: ``hidden_states=(-2,)``
    and ``pooled=False`` say what its callers read (docs/towers.md)."""
    from .executors.dropin import fuse as _fuse

    return _fuse(model, dtype=dtype, device=device, config=config, **kwargs)


__all__ = ["DualEncoderSpec", "FusedConfig", "GemmConfig", "PRESETS", "TowerSpec", "fuse", "load", "to_spec", "__version__"]

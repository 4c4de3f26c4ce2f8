"""Real model architectures by name, built with seeded random weights (nothing is downloaded),
and loading of real weights from local files.

Names:
- HF presets (configs as published for the real checkpoints): clip-vit-b-32, clip-vit-b-16, clip-vit-l-14,
  siglip-base-patch16-224; tiny test models: clip-tiny, siglip-tiny.
- ``open_clip:ARCH`` (e.g. ``open_clip:ViT-B-32``) builds open_clip's architecture with random weights
  (needs open_clip_torch); ``open_clip-tiny`` is a tiny open_clip CLIP for tests.
- A local path: an HF model directory (config.json + weights, read with local_files_only) or an open_clip
  checkpoint file (``arch`` names its architecture, e.g. ``load(path, arch="ViT-B-32")``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Preset:
    family: str  # "hf_clip" | "hf_siglip" | "open_clip"
    vision: dict
    text: dict
    top: dict = field(default_factory=dict)
    description: str = ""


_CLIP_TEXT_B = dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_hidden_layers=12,
                    max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu",
                    bos_token_id=0, eos_token_id=2, pad_token_id=1)
_CLIP_VIS_B = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                   image_size=224, hidden_act="quick_gelu")

PRESETS: dict[str, Preset] = {
    "clip-vit-b-32": Preset("hf_clip", dict(_CLIP_VIS_B, patch_size=32), _CLIP_TEXT_B, dict(projection_dim=512),
                            "openai/clip-vit-base-patch32 architecture: 50 image tokens, 77 text tokens"),
    "clip-vit-b-16": Preset("hf_clip", dict(_CLIP_VIS_B, patch_size=16), _CLIP_TEXT_B, dict(projection_dim=512),
                            "openai/clip-vit-base-patch16 architecture: 197 image tokens"),
    "clip-vit-l-14": Preset(
        "hf_clip",
        dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24, image_size=224,
             patch_size=14, hidden_act="quick_gelu"),
        dict(_CLIP_TEXT_B, hidden_size=768, intermediate_size=3072, num_attention_heads=12),
        dict(projection_dim=768), "openai/clip-vit-large-patch14 architecture: 24 vision layers, 257 tokens"),
    "siglip-base-patch16-224": Preset(
        "hf_siglip",
        dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, image_size=224,
             patch_size=16),
        dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
             max_position_embeddings=64, vocab_size=32000),
        {}, "google/siglip-base-patch16-224 architecture: 196 image tokens, 64 text tokens, MAP head"),
    "clip-tiny": Preset(
        "hf_clip",
        dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_hidden_layers=2, image_size=32,
             patch_size=8, hidden_act="quick_gelu"),
        dict(hidden_size=48, intermediate_size=80, num_attention_heads=4, num_hidden_layers=2,
             max_position_embeddings=16, vocab_size=100, hidden_act="quick_gelu", bos_token_id=0,
             eos_token_id=99, pad_token_id=1),
        dict(projection_dim=32), "tiny CLIP for tests (17 image tokens, 16 text tokens)"),
    "siglip-tiny": Preset(
        "hf_siglip",
        dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_hidden_layers=2, image_size=32,
             patch_size=8),
        dict(hidden_size=64, intermediate_size=80, num_attention_heads=4, num_hidden_layers=2,
             max_position_embeddings=12, vocab_size=100, bos_token_id=98, eos_token_id=99, pad_token_id=1),
        {}, "tiny SigLIP for tests (16 image tokens, 12 text tokens)"),
}

OPEN_CLIP_TINY = dict(embed_dim=32,
                      vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8, head_width=16, mlp_ratio=1.5),
                      text_cfg=dict(context_length=16, vocab_size=100, width=48, heads=4, layers=2, mlp_ratio=1.5))


def available() -> list[str]:
    return list(PRESETS) + ["open_clip-tiny", "open_clip:<ARCH>"]


def build_hf(name: str, seed: int = 0, meta: bool = False):
    """The preset's HF model with seeded random weights; ``meta=True`` builds shapes only (no memory, instant),
    enough for planning and cost estimates."""
    preset = PRESETS[name]
    if meta:
        with torch.device("meta"):
            return build_hf(name, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if preset.family == "hf_clip":
            from transformers import CLIPConfig, CLIPModel
            cfg = CLIPConfig(text_config=preset.text, vision_config=preset.vision, **preset.top)
            model = CLIPModel(cfg)
        else:
            from transformers import SiglipConfig, SiglipModel
            cfg = SiglipConfig(text_config=preset.text, vision_config=preset.vision, **preset.top)
            model = SiglipModel(cfg)
            # HF's init zeroes logit scale/bias; give them values like a trained SigLIP so logits mean something.
            with torch.no_grad():  # (no-ops on meta tensors)
                model.logit_scale.fill_(2.3)
                model.logit_bias.fill_(-10.0)
    cfg._name_or_path = name
    return model.eval()


def build_open_clip(arch: str | None = None, seed: int = 0, pretrained: str | None = None):
    try:
        import open_clip
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ValueError("open_clip models need the optional extra: pip install 'dualfuse[openclip]'") from e
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if arch is None:
            from open_clip.model import CLIP
            model = CLIP(**OPEN_CLIP_TINY, quick_gelu=True)
        else:
            if arch not in open_clip.list_models():
                raise ValueError(f"unknown open_clip architecture {arch!r}; open_clip knows e.g. "
                                 f"{', '.join(open_clip.list_models()[:8])}, ...")
            model = open_clip.create_model(arch, pretrained=pretrained)
    return model.eval()


def load(name_or_path: str, *, seed: int = 0, arch: str | None = None):
    """Return the source model (HF CLIPModel / SiglipModel or open_clip CLIP) in eval mode."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ValueError(f"expected a preset name or a local path, got {type(name_or_path).__name__}")
    name = str(name_or_path)
    if name in PRESETS:
        return build_hf(name, seed)
    if name == "open_clip-tiny":
        return build_open_clip(None, seed)
    if name.startswith("open_clip:"):
        return build_open_clip(name.split(":", 1)[1], seed)
    if os.path.isdir(name):
        return _load_hf_dir(name)
    if os.path.isfile(name):
        if arch is None:
            raise ValueError(f"{name} is a checkpoint file: name its open_clip architecture, e.g. arch='ViT-B-32' "
                             "(CLI: --arch ViT-B-32)")
        return build_open_clip(arch, seed, pretrained=name)
    raise ValueError(f"unknown model {name!r}: expected one of {', '.join(available())}, "
                     "an HF model directory, or an open_clip checkpoint file")


def _load_hf_dir(path: str):
    import json

    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{path} has no config.json: expected a transformers model directory")
    with open(cfg_path) as f:
        model_type = json.load(f).get("model_type")
    if model_type == "clip":
        from transformers import CLIPModel as cls
    elif model_type == "siglip":
        from transformers import SiglipModel as cls
    else:
        raise ValueError(f"{path}: model_type {model_type!r} is not supported (expected 'clip' or 'siglip')")
    return cls.from_pretrained(path, local_files_only=True).eval()

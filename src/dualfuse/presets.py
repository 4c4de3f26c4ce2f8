"""Real model architectures by name, built with seeded random weights (nothing is downloaded),
and loading of real weights from local files.

Names:
- HF presets (configs as published for the real checkpoints, see each Preset's description):
  CLIP clip-vit-b-32, clip-vit-b-16, clip-vit-l-14, clip-vit-l-14-336, clip-vit-h-14, clip-vit-bigg-14;
  SigLIP siglip-base-patch16-224, siglip-base-patch16-256, siglip-base-patch16-384, siglip-large-patch16-256,
  siglip-so400m-patch14-384; SigLIP 2 NaFlex siglip2-base-patch16-naflex; MetaCLIP 2
  metaclip2-worldwide-huge-quickgelu; tiny test models: clip-tiny, siglip-tiny, siglip2-tiny, metaclip2-tiny.
- ``open_clip:ARCH`` (e.g. ``open_clip:ViT-B-32``) builds open_clip's architecture with random weights
  (needs open_clip_torch); ``open_clip-tiny`` is a tiny open_clip CLIP for tests, ``open_clip-siglip-tiny`` a
  tiny open_clip CustomTextCLIP with a timm SigLIP-style ViT (MAP head) vision tower (needs timm).
- ``PRESET:vision`` / ``PRESET:vision-proj`` / ``PRESET:text`` / ``PRESET:text-proj``: one tower of a preset
  (CLIPVisionModel / CLIPVisionModelWithProjection / ..., SiglipVisionModel, ...) with random weights.
- A local path: an HF model directory (config.json + weights, read with local_files_only; a single tower's
  directory too, e.g. a CLIPVisionModelWithProjection's) or an open_clip
  checkpoint file (``arch`` names its architecture, e.g. ``load(path, arch="ViT-B-32")``).
"""
from __future__ import annotations

import contextlib
import os
import pickle
import re
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Preset:
    family: str  # "hf_clip" | "hf_siglip" | "hf_siglip2" | "hf_metaclip2"
    vision: dict
    text: dict
    top: dict = field(default_factory=dict)
    description: str = ""


_CLIP_TEXT_B = dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_hidden_layers=12,
                    max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu",
                    bos_token_id=0, eos_token_id=2, pad_token_id=1)
_CLIP_VIS_B = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                   image_size=224, hidden_act="quick_gelu")

_CLIP_VIS_L = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                   image_size=224, patch_size=14, hidden_act="quick_gelu")
_CLIP_TEXT_L = dict(_CLIP_TEXT_B, hidden_size=768, intermediate_size=3072, num_attention_heads=12)
# SigLIP: HF's SiglipConfig defaults (gelu_pytorch_tanh, LayerNorm eps 1e-6, 64 text tokens, vocab 32000) are the
# published ones; only the sizes differ between checkpoints.
_SIGLIP_B = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12)
_SIGLIP_L = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24)
_SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16, num_hidden_layers=27)
_SIGLIP_TEXT = dict(max_position_embeddings=64, vocab_size=32000)

PRESETS: dict[str, Preset] = {
    "clip-vit-b-32": Preset("hf_clip", dict(_CLIP_VIS_B, patch_size=32), _CLIP_TEXT_B, dict(projection_dim=512),
                            "openai/clip-vit-base-patch32 architecture: 50 image tokens, 77 text tokens"),
    "clip-vit-b-16": Preset("hf_clip", dict(_CLIP_VIS_B, patch_size=16), _CLIP_TEXT_B, dict(projection_dim=512),
                            "openai/clip-vit-base-patch16 architecture: 197 image tokens"),
    "clip-vit-l-14": Preset(
        "hf_clip", _CLIP_VIS_L, _CLIP_TEXT_L,
        dict(projection_dim=768), "openai/clip-vit-large-patch14 architecture: 24 vision layers, 257 tokens"),
    "clip-vit-l-14-336": Preset(
        "hf_clip", dict(_CLIP_VIS_L, image_size=336), _CLIP_TEXT_L, dict(projection_dim=768),
        "openai/clip-vit-large-patch14-336 architecture: 336 px, 24x24 patches + class token = 577 tokens"),
    "clip-vit-h-14": Preset(
        "hf_clip",
        dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32, image_size=224,
             patch_size=14, hidden_act="gelu"),
        dict(_CLIP_TEXT_B, hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
             hidden_act="gelu"),
        dict(projection_dim=1024),
        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K architecture (open_clip ViT-H-14): vision 1280 wide, 32 layers, "
        "head dim 80, exact GELU; text 1024 wide, 24 layers"),
    "clip-vit-bigg-14": Preset(
        "hf_clip",
        dict(hidden_size=1664, intermediate_size=8192, num_attention_heads=16, num_hidden_layers=48, image_size=224,
             patch_size=14, hidden_act="gelu"),
        dict(_CLIP_TEXT_B, hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
             hidden_act="gelu"),
        dict(projection_dim=1280),
        "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k architecture (open_clip ViT-bigG-14): vision 1664 wide, 48 layers, "
        "head dim 104, mlp 8192; text 1280 wide, 32 layers, 20 heads"),
    "siglip-base-patch16-224": Preset(
        "hf_siglip", dict(_SIGLIP_B, image_size=224, patch_size=16), dict(_SIGLIP_B, **_SIGLIP_TEXT),
        {}, "google/siglip-base-patch16-224 architecture: 196 image tokens, 64 text tokens, MAP head"),
    "siglip-base-patch16-256": Preset(
        "hf_siglip", dict(_SIGLIP_B, image_size=256, patch_size=16), dict(_SIGLIP_B, **_SIGLIP_TEXT),
        {}, "google/siglip-base-patch16-256 architecture: 256 image tokens, 64 text tokens"),
    "siglip-base-patch16-384": Preset(
        "hf_siglip", dict(_SIGLIP_B, image_size=384, patch_size=16), dict(_SIGLIP_B, **_SIGLIP_TEXT),
        {}, "google/siglip-base-patch16-384 architecture: 576 image tokens, 64 text tokens"),
    "siglip-large-patch16-256": Preset(
        "hf_siglip", dict(_SIGLIP_L, image_size=256, patch_size=16), dict(_SIGLIP_L, **_SIGLIP_TEXT),
        {}, "google/siglip-large-patch16-256 architecture: 1024 wide, 24 layers, 256 image tokens"),
    "siglip-so400m-patch14-384": Preset(
        "hf_siglip", dict(_SIGLIP_SO400M, image_size=384, patch_size=14), dict(_SIGLIP_SO400M, **_SIGLIP_TEXT),
        {}, "google/siglip-so400m-patch14-384 architecture: 1152 wide (head dim 72), mlp 4304, 27 layers; "
            "384 px / patch 14 -> 27x27 = 729 image tokens (the last 6 px rows/columns are dropped)"),
    "siglip2-base-patch16-naflex": Preset(
        "hf_siglip2",
        dict(_SIGLIP_B, patch_size=16, num_patches=256),
        dict(_SIGLIP_B, vocab_size=256000, max_position_embeddings=64),
        {}, "google/siglip2-base-patch16-naflex architecture: 768 wide, 12 layers, patch 16, a 16x16 position grid "
            "resized to each image's patch grid, up to 256 patches per image; 64 text tokens, vocab 256000"),
    "metaclip2-worldwide-huge-quickgelu": Preset(
        "hf_metaclip2",
        dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32, image_size=224,
             patch_size=14, hidden_act="quick_gelu"),
        dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
             max_position_embeddings=77, vocab_size=901629, hidden_act="quick_gelu", bos_token_id=0,
             eos_token_id=2, pad_token_id=1),
        dict(projection_dim=1024),
        "facebook/metaclip-2-worldwide-huge-quickgelu architecture (open_clip ViT-H-14-worldwide-quickgelu): "
        "ViT-H/14 vision, XLM-V text vocabulary of 901629, pooled at the first </s> (id 2)"),
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
    "siglip2-tiny": Preset(
        "hf_siglip2",
        dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, patch_size=8,
             num_patches=16),
        dict(hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
             max_position_embeddings=12, pad_token_id=0, eos_token_id=1, bos_token_id=2),
        {}, "tiny SigLIP 2 NaFlex for tests (a 4x4 position grid, patch 8, up to 16 patches; 12 text tokens)"),
    "metaclip2-tiny": Preset(
        "hf_metaclip2",
        dict(hidden_size=80, intermediate_size=96, num_attention_heads=4, num_hidden_layers=2, image_size=36,
             patch_size=8, hidden_act="quick_gelu"),
        dict(hidden_size=72, intermediate_size=80, num_attention_heads=2, num_hidden_layers=2,
             max_position_embeddings=16, vocab_size=120, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2,
             pad_token_id=1),
        dict(projection_dim=40),
        "tiny MetaCLIP 2 for tests: 36 px / patch 8 (a 4x4 grid, 4 px dropped), head dims 20 and 36, eos id 2"),
}

OPEN_CLIP_TINY = dict(embed_dim=32,
                      vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8, head_width=16, mlp_ratio=1.5),
                      text_cfg=dict(context_length=16, vocab_size=100, width=48, heads=4, layers=2, mlp_ratio=1.5))


# open_clip CustomTextCLIP shaped like open_clip's ViT-B-16-SigLIP (bidirectional text pooled at the last token,
# projection with bias, LN eps 1e-6, logit bias) with a tiny timm SigLIP ViT (_timm_tiny.py): head dims 36
# (vision) and 18 (text).
OPEN_CLIP_SIGLIP_TINY = dict(
    embed_dim=72, init_logit_bias=-10.0,
    vision_cfg=dict(timm_model_name="dualfuse_test_vit_siglip_tiny", timm_pool="map", timm_proj="none",
                    image_size=32),
    text_cfg=dict(context_length=12, vocab_size=100, width=72, heads=4, layers=2, mlp_ratio=1.5,
                  no_causal_mask=True, proj_bias=True, pool_type="last", norm_kwargs=dict(eps=1e-6)))


def available() -> list[str]:
    return list(PRESETS) + ["open_clip-tiny", "open_clip-siglip-tiny", "open_clip:<ARCH>"]


def _forked_rng(device: torch.device | None):
    """Keep the caller's RNG state: the CPU's, and the CUDA device's when weights are drawn there."""
    if device is not None and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.random.fork_rng(devices=[index], device_type="cuda")
    return torch.random.fork_rng(devices=[])


def _on(device: torch.device | None):
    return torch.device(device) if device is not None else contextlib.nullcontext()


def build_hf(name: str, seed: int = 0, meta: bool = False, device=None):
    """The preset's HF model with seeded random weights, built directly on ``device`` (default CPU; large presets
    build in seconds on a GPU). The same seed gives the same weights on one kind of device. ``meta=True`` builds
    shapes only (no memory, instant), enough for planning and cost estimates."""
    preset = PRESETS[name]
    device = torch.device("meta") if meta else (torch.device(device) if device is not None else None)
    with _forked_rng(device), _on(device):
        torch.manual_seed(seed)
        model = _construct(preset)
    model.config._name_or_path = name
    return model.eval()


TOWER_SUFFIXES = (":vision", ":vision-proj", ":text", ":text-proj")


def build_tower(name: str, seed: int = 0, device=None):
    """``PRESET:vision`` (CLIPVisionModel / SiglipVisionModel / MetaClip2VisionModel / Siglip2VisionModel),
    ``PRESET:vision-proj`` (CLIPVisionModelWithProjection ...), ``PRESET:text``, ``PRESET:text-proj``: one tower of
    a preset's architecture with seeded random weights."""
    import transformers

    base, _, which = name.rpartition(":")
    if base not in PRESETS or f":{which}" not in TOWER_SUFFIXES:
        raise ValueError(f"unknown tower {name!r}: expected PRESET{'|'.join(TOWER_SUFFIXES)} with a preset of "
                         f"{', '.join(available())}")
    preset = PRESETS[base]
    prefix = {"hf_clip": "CLIP", "hf_metaclip2": "MetaClip2", "hf_siglip": "Siglip", "hf_siglip2": "Siglip2"}[
        preset.family]
    tower, proj = which.split("-")[0], which.endswith("-proj")
    if proj and not prefix.startswith(("CLIP", "MetaClip2")):
        raise ValueError(f"{name}: SigLIP towers have no *WithProjection class; use {base}:{tower}")
    if prefix == "Siglip2" and tower == "text":
        raise ValueError(f"{name}: transformers has no Siglip2TextModel class; use {base} (the pair)")
    kind = "Vision" if tower == "vision" else "Text"
    cfg_cls = getattr(transformers, f"{prefix}{kind}Config")
    cls = getattr(transformers, f"{prefix}{kind}Model" + ("WithProjection" if proj else ""))
    extra = {k: v for k, v in preset.top.items() if k == "projection_dim"} if proj else {}
    device = torch.device(device) if device is not None else None
    with _forked_rng(device), _on(device):
        torch.manual_seed(seed)
        model = cls(cfg_cls(**getattr(preset, tower), **extra))
    model.config._name_or_path = name
    return model.eval()


def _construct(preset: Preset):
    if preset.family == "hf_clip":
        from transformers import CLIPConfig, CLIPModel
        return CLIPModel(CLIPConfig(text_config=preset.text, vision_config=preset.vision, **preset.top))
    if preset.family == "hf_metaclip2":
        from transformers import MetaClip2Config, MetaClip2Model
        return MetaClip2Model(MetaClip2Config(text_config=preset.text, vision_config=preset.vision, **preset.top))
    if preset.family == "hf_siglip2":
        from transformers import Siglip2Config as config_cls, Siglip2Model as model_cls
    else:
        from transformers import SiglipConfig as config_cls, SiglipModel as model_cls
    model = model_cls(config_cls(text_config=preset.text, vision_config=preset.vision, **preset.top))
    # HF's init zeroes logit scale/bias; give them values like a trained SigLIP so logits mean something.
    with torch.no_grad():  # (no-ops on meta tensors)
        model.logit_scale.fill_(2.3)
        model.logit_bias.fill_(-10.0)
    return model


def build_open_clip(arch: str | None = None, seed: int = 0, pretrained: str | None = None, device=None):
    """open_clip architecture ``arch`` with seeded random weights (or ``pretrained`` weights) on ``device``
    ("meta": shapes only). ``arch=None``: the tiny CLIP; ``"siglip-tiny"``: the tiny CustomTextCLIP + timm ViT."""
    try:
        import open_clip
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ValueError("open_clip models need the optional extra: pip install 'dualfuse[openclip]'") from e
    device = torch.device(device) if device is not None else None
    with _forked_rng(device), _on(device):
        torch.manual_seed(seed)
        if arch is None:
            from open_clip.model import CLIP
            model = CLIP(**OPEN_CLIP_TINY, quick_gelu=True)
        elif arch == "siglip-tiny":
            from open_clip.model import CustomTextCLIP
            from . import _timm_tiny  # noqa: F401  (registers the tiny timm trunk)
            model = CustomTextCLIP(**OPEN_CLIP_SIGLIP_TINY)
        else:
            if arch not in open_clip.list_models():
                raise ValueError(f"unknown open_clip architecture {arch!r}; open_clip knows e.g. "
                                 f"{', '.join(open_clip.list_models()[:8])}, ...")
            kwargs = {"device": device} if device is not None else {}
            if pretrained is None:
                model = open_clip.create_model(arch, **kwargs)
            else:
                model = _open_clip_checkpoint(open_clip, arch, pretrained, kwargs)
    return model.eval()


def _open_clip_checkpoint(open_clip, arch: str, path: str, kwargs: dict):
    """open_clip's ``arch`` with the weights of the checkpoint file ``path``; a file that can't be read, or whose
    weights don't fit ``arch``, is a ValueError naming both (never torch's advice to load unsafely)."""
    import inspect
    import logging

    class _NotRandom(logging.Filter):  # the weights are loaded next: open_clip's "initialized randomly" is wrong
        def filter(self, record):
            return "No pretrained weights loaded" not in record.getMessage()

    quiet = _NotRandom()
    logging.getLogger().addFilter(quiet)
    try:
        model = open_clip.create_model(arch, **kwargs)
    finally:
        logging.getLogger().removeFilter(quiet)
    load = open_clip.load_checkpoint
    safe = {"weights_only": True} if "weights_only" in inspect.signature(load).parameters else {}
    what = (f"expected a state dict of tensors for open_clip {arch} (as written by torch.save(model.state_dict(), "
            "path), optionally under a 'state_dict' key), or a .safetensors file of those tensors")
    try:
        load(model, path, strict=True, **safe)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        inside = (f"it holds a Python object of type {found.group(1)}" if found else
                  "it is not a torch checkpoint, or it is truncated")
        raise ValueError(f"{path}: cannot load this checkpoint for open_clip architecture {arch}: {inside}. dualfuse "
                         "loads checkpoints with torch.load(weights_only=True), which reads only tensors and plain "
                         f"containers; {what}. Re-save the weights alone, or re-download the file") from None
    except Exception as e:  # noqa: BLE001 - whatever reading a bad file raises (torch, pickle, safetensors, zip)
        msg = str(e)
        if isinstance(e, RuntimeError) and "Error(s) in loading state_dict" in msg:
            missing = re.findall(r'"([^"]+)"', msg.split("Missing key(s) in state_dict:", 1)[1].split(
                "Unexpected key(s)", 1)[0]) if "Missing key(s)" in msg else []
            unexpected = re.findall(r'"([^"]+)"', msg.split("Unexpected key(s) in state_dict:", 1)[1]) \
                if "Unexpected key(s)" in msg else []
            sizes = msg.count("size mismatch")
            bits = [f"{len(missing)} missing (e.g. {', '.join(missing[:3])})" if missing else "",
                    f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})" if unexpected else "",
                    f"{sizes} with other shapes" if sizes else ""]
            raise ValueError(f"{path}: the checkpoint's weights do not fit open_clip architecture {arch}: "
                             f"{'; '.join(b for b in bits if b)}. Check --arch (the architecture this checkpoint was "
                             f"trained with); {what}") from None
        raise ValueError(f"{path}: cannot read this checkpoint for open_clip architecture {arch} "
                         f"({type(e).__name__}: {_first_line(msg)}): the file is not a torch checkpoint, or it is "
                         "corrupt or truncated. dualfuse loads checkpoints with torch.load(weights_only=True); "
                         f"{what}. Re-download or re-save it") from None
    return model


def _first_line(text: str, limit: int = 200) -> str:
    """The first line of an error message, without advice to load a file unsafely."""
    line = next((x.strip() for x in text.splitlines() if x.strip()), "")
    if "weights_only" in line:
        line = "the file is not a plain checkpoint of tensors"
    return line if len(line) <= limit else line[: limit - 1] + "…"


def load(name_or_path: str, *, seed: int = 0, arch: str | None = None, device=None):
    """Return the source model (HF CLIPModel / MetaClip2Model / SiglipModel / Siglip2Model, open_clip CLIP /
    CustomTextCLIP) in eval mode. Presets are built directly on ``device`` (default CPU); loaded weights are
    moved there."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ValueError(f"expected a preset name or a local path, got {type(name_or_path).__name__}")
    name = str(name_or_path)
    if name in PRESETS:
        return build_hf(name, seed, device=device)
    if name.endswith(TOWER_SUFFIXES) and name.rpartition(":")[0] in PRESETS:
        return build_tower(name, seed, device=device)
    if name == "open_clip-tiny":
        return build_open_clip(None, seed, device=device)
    if name == "open_clip-siglip-tiny":
        return build_open_clip("siglip-tiny", seed, device=device)
    if name.startswith("open_clip:"):
        return build_open_clip(name.split(":", 1)[1], seed, device=device)
    if os.path.isdir(name):
        model = _load_hf_dir(name)
        return model.to(device) if device is not None else model
    if os.path.isfile(name):
        if arch is None:
            raise ValueError(f"{name} is a checkpoint file: name its open_clip architecture, e.g. arch='ViT-B-32' "
                             "(CLI: --arch ViT-B-32)")
        return build_open_clip(arch, seed, pretrained=name, device=device)
    raise ValueError(_unknown_model(name))


def _unknown_model(name: str) -> str:
    """Why ``name`` is no model, and what to pass instead: a missing path, a Hub id (nothing is downloaded), or
    an unknown name; with the list of presets."""
    presets = f"presets: {', '.join(available())}"
    hub = re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name)
    if hub and not name.startswith((".", "~")):
        same = [k for k, p in PRESETS.items() if p.description.startswith(f"{name} architecture")]
        alike = (f"; preset {same[0]} has its architecture with seeded random weights (--model {same[0]})"
                 if same else "")
        local = name.rsplit("/", 1)[1]
        return (f"{name!r} is not a local path and looks like a Hugging Face Hub id: dualfuse downloads nothing. "
                f"Download it yourself, e.g. `hf download {name} --local-dir {local}` (huggingface_hub's CLI; "
                f"older versions call it huggingface-cli), and pass the directory: --model {local}{alike}. "
                f"Or use a preset ({presets})")
    if os.sep in name or "/" in name or name.startswith(("~", ".")) or name.endswith(_CHECKPOINT_SUFFIXES):
        return (f"{name}: no such file or directory (expected an HF model directory with config.json, or an "
                f"open_clip checkpoint file); check the path, or use a preset ({presets})")
    return (f"unknown model {name!r}: expected a preset, open_clip:ARCH, an HF model directory or an open_clip "
            f"checkpoint file; {presets}")


_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")


# config.json model_type of a single-tower checkpoint -> the class loaded when its "architectures" names none we know
TOWER_MODEL_TYPES = {
    "clip_vision_model": "CLIPVisionModel", "clip_text_model": "CLIPTextModel",
    "metaclip_2_vision_model": "MetaClip2VisionModel", "metaclip_2_text_model": "MetaClip2TextModel",
    "siglip_vision_model": "SiglipVisionModel", "siglip_text_model": "SiglipTextModel",
    "siglip2_vision_model": "Siglip2VisionModel",
}


def _load_hf_dir(path: str):
    import json

    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{path} has no config.json: expected a transformers model directory")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
        model_type = cfg.get("model_type")
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{cfg_path}: not a valid transformers config (JSON object with model_type): {e}") from None
    if model_type in TOWER_MODEL_TYPES:  # a single tower: its architectures entry, else the plain model class
        import transformers

        from .adapters import TOWER_CLASSES

        arch = next((a for a in cfg.get("architectures") or () if a in TOWER_CLASSES), None)
        cls = getattr(transformers, arch or TOWER_MODEL_TYPES[model_type])
    elif model_type == "clip":
        from transformers import CLIPModel as cls
    elif model_type == "metaclip_2":
        from transformers import MetaClip2Model as cls
    elif model_type == "siglip":
        from transformers import SiglipModel as cls
    elif model_type == "siglip2":
        from transformers import Siglip2Model as cls
    else:
        raise ValueError(f"{path}: model_type {model_type!r} is not supported (expected 'clip', 'metaclip_2', "
                         f"'siglip', 'siglip2', or a single tower: {', '.join(TOWER_MODEL_TYPES)})")
    try:
        return cls.from_pretrained(path, local_files_only=True).eval()
    except Exception as e:  # noqa: BLE001 - safetensors' SafetensorError has no importable base in old versions
        if type(e).__name__ != "SafetensorError" and not isinstance(e, (EOFError, pickle.UnpicklingError)):
            raise
        where = _unreadable_weights(path)
        raise ValueError(f"{where}: cannot read the weights ({type(e).__name__}: {_first_line(str(e))}): the file is "
                         "corrupt or truncated (an interrupted download or copy?). Re-download it, or re-save the "
                         "model with save_pretrained") from None


def _unreadable_weights(path: str) -> str:
    """The weights file of an HF model directory that fails to open (the directory if none can be singled out)."""
    files = sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".bin")))
    for f in files:
        full = os.path.join(path, f)
        try:
            if f.endswith(".safetensors"):
                from safetensors import safe_open
                with safe_open(full, framework="pt"):
                    pass
            else:
                torch.load(full, map_location="meta", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - this is the file
            return full
    return os.path.join(path, files[0]) if len(files) == 1 else path

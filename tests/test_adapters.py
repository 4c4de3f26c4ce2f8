"""Adapters for every family vs the source models' own forwards (fp32, tiny configs), NotCovered reasons,
ModelIO, and the published presets' shapes.

Every parameter is perturbed before comparing: the HF and timm inits zero biases (and SigLIP's logit bias),
which would hide a wrongly packed bias. Tiny configs use head dims that are not powers of two and image
sizes that are not multiples of the patch (the patch Conv2d drops the remainder).
"""
import math

import pytest
import torch
from torch import nn

import dualfuse
from dualfuse import reference
from dualfuse.adapters import NotCovered, family_of, model_io, to_spec
from dualfuse.presets import build_hf, build_open_clip


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def perturbed(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def make_inputs(spec, bi=3, bt=4, seed=0):
    """Images of the spec's size; token ids >= 3 with an end token at a different place per row and again at
    the end (so first-eos, argmax and last pooling all pick different tokens), zeros after the first."""
    g = torch.Generator().manual_seed(seed)
    v, t = spec.vision.embed, spec.text
    px = torch.randn(bi, v.channels, v.image_size, v.width, generator=g)
    n, vocab = t.context_length, t.embed.vocab_size
    ids = torch.randint(3, vocab - 1, (bt, n), generator=g)
    eos = t.eos_token_id if t.pooling == "first_eos" else vocab - 1
    for i in range(bt):
        pos = 2 + (3 * i) % (n - 3)
        ids[i, pos] = eos
        ids[i, pos + 1:] = 0
        if t.pooling == "first_eos":
            ids[i, -1] = eos
    return px, ids


def source_features(model, px, ids):
    with torch.no_grad():
        if family_of(model) == "open_clip":
            return model.encode_image(px), model.encode_text(ids)
        img = model.get_image_features(pixel_values=px)
        txt = model.get_text_features(input_ids=ids)
        return getattr(img, "pooler_output", img), getattr(txt, "pooler_output", txt)


def assert_matches_source(model):
    spec = to_spec(model)
    px, ids = make_inputs(spec)
    img_ref, txt_ref = source_features(model, px, ids)
    with torch.no_grad():
        img, txt = reference.encode_image(spec, px), reference.encode_text(spec, ids)
    assert img.shape == img_ref.shape and txt.shape == txt_ref.shape
    assert rel_err(img, img_ref) <= 1e-5
    assert rel_err(txt, txt_ref) <= 1e-5
    return spec


# ------------------------------------------------------------------------------------------ model builders

_HF_VISION = dict(hidden_size=72, intermediate_size=100, num_attention_heads=2, num_hidden_layers=2,
                  image_size=36, patch_size=8)  # head dim 36; 36 px / patch 8: a 4x4 grid, 4 px dropped
_HF_TEXT = dict(hidden_size=48, intermediate_size=80, num_attention_heads=4, num_hidden_layers=2,
                max_position_embeddings=12, vocab_size=100, bos_token_id=0, pad_token_id=1)


def hf_clip(eos_token_id=99, act="quick_gelu", seed=0, **vision):
    from transformers import CLIPConfig, CLIPModel
    torch.manual_seed(seed)
    cfg = CLIPConfig(vision_config=dict(_HF_VISION, hidden_act=act, **vision),
                     text_config=dict(_HF_TEXT, hidden_act=act, eos_token_id=eos_token_id), projection_dim=40)
    return perturbed(CLIPModel(cfg), seed)


def hf_siglip(seed=0):
    from transformers import SiglipConfig, SiglipModel
    torch.manual_seed(seed)
    cfg = SiglipConfig(vision_config=_HF_VISION, text_config=dict(_HF_TEXT, hidden_size=72, num_attention_heads=2,
                                                                  eos_token_id=99))
    return perturbed(SiglipModel(cfg), seed)


def open_clip_preset(name):
    """An open_clip preset; skips without the openclip extra."""
    pytest.importorskip("open_clip")
    return dualfuse.load(name)


def open_clip_clip(seed=0, vision=None, text=None, quick_gelu=False):
    """open_clip CLIP: 36 px / patch 8, head dims 36 and 12."""
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(seed)
    vision_cfg = dict(image_size=36, patch_size=8, width=72, head_width=36, layers=2, mlp_ratio=1.5, **(vision or {}))
    text_cfg = dict(context_length=12, vocab_size=100, width=48, heads=4, layers=2, mlp_ratio=1.5, **(text or {}))
    return perturbed(open_clip.model.CLIP(40, vision_cfg, text_cfg, quick_gelu=quick_gelu), seed)


def custom_text_clip(vision_cfg, seed=0, embed_dim=72, **text):
    """open_clip CustomTextCLIP with a SigLIP-style text tower (open_clip TextTransformer)."""
    pytest.importorskip("open_clip")
    from open_clip.model import CustomTextCLIP
    torch.manual_seed(seed)
    text_cfg = dict(context_length=12, vocab_size=100, width=72, heads=4, layers=2, mlp_ratio=1.5,
                    no_causal_mask=True, proj_bias=True, pool_type="last", norm_kwargs=dict(eps=1e-6))
    text_cfg.update(text)
    return perturbed(CustomTextCLIP(embed_dim, vision_cfg, text_cfg, init_logit_bias=-10.0), seed)


def timm_trunk(**overrides):
    """A tiny timm VisionTransformer, SigLIP settings unless overridden: 36 px / patch 8, width 72, head dim 36."""
    pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer
    args = dict(img_size=36, patch_size=8, embed_dim=72, depth=2, num_heads=2, mlp_ratio=1.5, class_token=False,
                global_pool="map", num_classes=0)
    args.update(overrides)
    return VisionTransformer(**args)


def timm_linear_proj():
    """The tiny timm SigLIP trunk (registered by dualfuse._timm_tiny) with open_clip's own Linear projection."""
    pytest.importorskip("timm")
    import dualfuse._timm_tiny  # noqa: F401
    return custom_text_clip(dict(timm_model_name="dualfuse_test_vit_siglip_tiny", timm_pool="map",
                                 timm_proj="linear", timm_proj_bias=True, image_size=32), embed_dim=40)


def with_trunk(trunk, seed=0):
    """open_clip-siglip-tiny with its timm trunk replaced (open_clip's TimmModel passes no size arguments)."""
    pytest.importorskip("timm")
    model = build_open_clip("siglip-tiny", seed)
    model.visual.trunk = trunk
    return perturbed(model, seed)


# ------------------------------------------------------------------------------------------ parity

PARITY = {
    "hf_clip first eos, head dim 36, 36 px": lambda: hf_clip(),
    "hf_clip legacy eos 2 (argmax), gelu": lambda: hf_clip(eos_token_id=2, act="gelu"),
    "hf_siglip head dim 36, 36 px": hf_siglip,
    "hf_metaclip2 preset": lambda: perturbed(dualfuse.load("metaclip2-tiny")),
    "open_clip CLIP, 36 px": lambda: open_clip_clip(quick_gelu=True),
    "open_clip CLIP, eos pooling, no ln_pre": lambda: open_clip_clip(vision=dict(no_ln_pre=True),
                                                                   text=dict(pool_type="eos", eos_id=2)),
    "open_clip CLIP, final LN after the token pool": lambda: open_clip_clip(vision=dict(final_ln_after_pool=True)),
    "CustomTextCLIP, open_clip ViT": lambda: custom_text_clip(
        dict(image_size=36, patch_size=8, width=72, head_width=36, layers=2, mlp_ratio=1.5), embed_dim=40),
    "CustomTextCLIP, timm SigLIP ViT (preset)": lambda: perturbed(open_clip_preset("open_clip-siglip-tiny")),
    "CustomTextCLIP, timm SigLIP ViT, 36 px, gelu_tanh": lambda: with_trunk(timm_trunk(act_layer="gelu_tanh")),
    "CustomTextCLIP, timm SigLIP ViT, open_clip linear proj": lambda: timm_linear_proj(),
    "CustomTextCLIP, timm class-token ViT, pre-norm, fc_norm, head as projection": lambda: with_trunk(
        timm_trunk(class_token=True, global_pool="token", no_embed_class=True, pre_norm=True, fc_norm=True,
                   num_classes=72)),
    "CustomTextCLIP, timm class-token ViT, final norm": lambda: with_trunk(
        timm_trunk(class_token=True, global_pool="token", act_layer="quick_gelu", num_classes=72)),
}


@pytest.mark.parametrize("case", list(PARITY))
def test_reference_matches_source_model(case):
    spec = assert_matches_source(PARITY[case]())
    assert spec.family in ("hf_clip", "hf_siglip", "hf_metaclip2", "open_clip")


def test_open_clip_siglip_tower_reads_as_map_pooling():
    pytest.importorskip("timm")
    spec = to_spec(open_clip_preset("open_clip-siglip-tiny"))
    v, t = spec.vision, spec.text
    assert (v.pooling, v.class_embedding, v.pre_ln, v.head_dim, v.final_ln.eps) == ("map", None, None, 36, 1e-6)
    assert v.pool_head.heads == 2 and v.pool_head.qkv.weight.shape == (3 * 72, 72)
    assert v.activation == "gelu"  # open_clip's timm SigLIP towers use exact GELU (HF SigLIP: tanh)
    assert (t.mask, t.pooling, t.projection.bias is not None) == ("none", "last", True)
    assert spec.logit_bias == -10.0


def test_metaclip2_pools_at_the_first_eos_even_when_it_is_2():
    """CLIPModel treats eos id 2 as the legacy config and pools at argmax; MetaClip2Model pools at the first 2."""
    model = perturbed(dualfuse.load("metaclip2-tiny"))
    spec = to_spec(model)
    assert (spec.family, spec.text.pooling, spec.text.eos_token_id) == ("hf_metaclip2", "first_eos", 2)
    ids = torch.tensor([[0, 50, 2, 7, 2, 119, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]])  # argmax would pick 119
    with torch.no_grad():
        ref = model.get_text_features(input_ids=ids).pooler_output
        ours = reference.encode_text(spec, ids)
    assert rel_err(ours, ref) <= 1e-5
    assert reference.pool_positions(spec.text, ids, 1, 16).item() == 2 and ids.argmax().item() == 5


# ------------------------------------------------------------------------------------------ NotCovered

def _not_covered(model, match):
    with pytest.raises(NotCovered, match=match) as info:
        to_spec(model)
    assert "is not covered by the fused kernels" in str(info.value)
    return info.value


def test_open_clip_resnet_is_not_covered():
    pytest.importorskip("open_clip")
    err = _not_covered(build_open_clip("RN50", device="meta"),
                       r"^open_clip vision tower ModifiedResNet \(a convolutional tower\) is not covered")
    assert isinstance(err, ValueError) and err.tower == "open_clip vision tower"


@pytest.mark.parametrize("arch, trunk", [("convnext_base", "ConvNeXt"), ("MobileCLIP-S1", "FastVit")])
def test_convolutional_timm_towers_are_not_covered(arch, trunk):
    pytest.importorskip("timm")
    _not_covered(build_open_clip(arch, device="meta"), rf"open_clip vision tower timm {trunk} \(a convolutional tower\)")


def test_layer_scale_is_not_covered():
    _not_covered(open_clip_clip(vision=dict(ls_init_value=1e-5)),
                 r"open_clip vision tower LayerScale \(resblocks.0.ls_1 / ls_2\)")
    _not_covered(open_clip_clip(text=dict(ls_init_value=1e-5)), r"open_clip text tower LayerScale")
    _not_covered(with_trunk(timm_trunk(init_values=1e-5)),
                 r"open_clip vision tower \(timm VisionTransformer\) LayerScale \(blocks.0.ls1 / ls2\)")


@pytest.mark.parametrize("make, match", [
    (lambda: open_clip_clip(vision=dict(attentional_pool=True)), r"vision tower attentional pooler"),
    (lambda: open_clip_clip(vision=dict(pool_type="avg")), r"vision tower pool_type 'avg'"),
    (lambda: open_clip_clip(text=dict(qk_norm=True)), r"text tower block resblocks.0 of type CustomResidual"),
    (lambda: with_trunk(timm_trunk(global_pool="avg")), r"global_pool 'avg'"),
    (lambda: with_trunk(timm_trunk(reg_tokens=4)), r"4 register tokens"),
    (lambda: with_trunk(timm_trunk(qk_norm=True)), r"qk-norm \(blocks.0.attn.q_norm\)"),
    (lambda: with_trunk(timm_trunk(class_token=True)), r"MAP head that skips the class token"),
    (lambda: with_trunk(timm_trunk(act_layer="silu")), r"activation SiLU"),
    (lambda: hf_clip(act="relu"), r"HF CLIP vision tower activation hidden_act='relu'"),
    (lambda: custom_text_clip(dict(image_size=36, patch_size=8, width=72, head_width=36, layers=2),
                              embed_cls=True), r"text tower appended class token"),
])
def test_uncovered_parts_name_the_tower_and_why(make, match):
    _not_covered(make(), match)


def test_open_clip_activation_swapped_in_is_not_covered():
    model = open_clip_clip()
    model.transformer.resblocks[1].mlp.gelu = nn.SiLU()
    _not_covered(model, r"open_clip text tower activation SiLU")


def test_unrunnable_classes_stay_plain_value_errors():
    with pytest.raises(ValueError, match="unsupported model class") as info:
        to_spec(nn.Linear(3, 3))
    assert not isinstance(info.value, NotCovered)
    with pytest.raises(ValueError, match="unsupported model class"):
        model_io(nn.Linear(3, 3))


# ------------------------------------------------------------------------------------------ ModelIO

COVERED_PRESETS = ["clip-tiny", "siglip-tiny", "metaclip2-tiny", "open_clip-tiny", "open_clip-siglip-tiny"]


@pytest.mark.parametrize("name", COVERED_PRESETS)
def test_model_io_equals_spec_io_for_covered_models(name):
    if name.startswith("open_clip"):
        pytest.importorskip("open_clip")
    model = dualfuse.load(name)
    io = model_io(model)
    assert io == to_spec(model).io
    assert model_io(to_spec(model)) == io


def _meta_features(model, io):
    """The embedding sizes the model really produces for inputs of io's shapes (meta tensors: shapes only)."""
    px = torch.empty(1, io.channels, io.image_size, io.image_size, device="meta")
    ids = torch.zeros(1, io.context_length, dtype=torch.long, device="meta")
    return model.encode_image(px).shape[-1], model.encode_text(ids).shape[-1]


def test_model_io_of_uncovered_open_clip_towers():
    pytest.importorskip("open_clip")
    rn50 = build_open_clip("RN50", device="meta")
    io = model_io(rn50)
    assert (io.family, io.name, io.image_size, io.channels, io.context_length, io.vocab_size, io.embed_dim) == \
        ("open_clip", "open_clip", 224, 3, 77, 49408, 1024)
    assert (io.patch_size, io.logit_bias, io.text_pooling, io.eos_token_id, io.naflex) == \
        (None, None, "argmax", None, False)
    assert math.isnan(io.logit_scale)  # meta: shapes only
    assert _meta_features(rn50, io) == (1024, 1024)

    pytest.importorskip("timm")
    for arch, size, dim in [("convnext_base", 224, 512), ("MobileCLIP-S1", 256, 512)]:
        model = build_open_clip(arch, device="meta")
        io = model_io(model)
        assert (io.image_size, io.channels, io.context_length, io.vocab_size, io.embed_dim, io.patch_size) == \
            (size, 3, 77, 49408, dim, None)
        assert _meta_features(model, io) == (dim, dim)


def test_model_io_reads_the_logit_scale():
    pytest.importorskip("open_clip")
    io = model_io(build_open_clip(None, seed=0))
    assert io.logit_scale == pytest.approx(math.log(1 / 0.07)) and io.logit_bias is None


# ------------------------------------------------------------------------------------------ presets

# name -> published shapes: vision (seq_len, width, head_dim, mlp, layers), text (width, heads, mlp, layers,
# context, vocab), embed dim, vision activation
PUBLISHED = {
    "clip-vit-l-14-336": ((577, 1024, 64, 4096, 24), (768, 12, 3072, 12, 77, 49408), 768, "quick_gelu"),
    "clip-vit-h-14": ((257, 1280, 80, 5120, 32), (1024, 16, 4096, 24, 77, 49408), 1024, "gelu"),
    "clip-vit-bigg-14": ((257, 1664, 104, 8192, 48), (1280, 20, 5120, 32, 77, 49408), 1280, "gelu"),
    "siglip-base-patch16-256": ((256, 768, 64, 3072, 12), (768, 12, 3072, 12, 64, 32000), 768, "gelu_tanh"),
    "siglip-base-patch16-384": ((576, 768, 64, 3072, 12), (768, 12, 3072, 12, 64, 32000), 768, "gelu_tanh"),
    "siglip-large-patch16-256": ((256, 1024, 64, 4096, 24), (1024, 16, 4096, 24, 64, 32000), 1024, "gelu_tanh"),
    "siglip-so400m-patch14-384": ((729, 1152, 72, 4304, 27), (1152, 16, 4304, 27, 64, 32000), 1152, "gelu_tanh"),
    "metaclip2-worldwide-huge-quickgelu": ((257, 1280, 80, 5120, 32), (1024, 16, 4096, 24, 77, 901629), 1024,
                                           "quick_gelu"),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_new_presets_build_on_meta_with_published_shapes(name):
    spec = to_spec(build_hf(name, meta=True))
    s = spec.summary()
    v, t = s["vision"], s["text"]
    (seq, width, head_dim, mlp, layers), text, embed_dim, act = PUBLISHED[name]
    assert (v["seq_len"], v["width"], v["head_dim"], v["mlp_dim"], v["layers"]) == (seq, width, head_dim, mlp, layers)
    assert (t["width"], t["heads"], t["mlp_dim"], t["layers"], t["context_length"], t["vocab_size"]) == text
    assert (s["embed_dim"], v["activation"]) == (embed_dim, act)
    assert spec.device.type == "meta"


# HF preset -> the open_clip architecture of the same published model: every shape must agree (activations may
# not: open_clip builds ViT-L-14-336 with GELU, OpenAI's weights use QuickGELU; timm's SigLIP towers use exact
# GELU where HF uses tanh)
SAME_AS_OPEN_CLIP = {
    "clip-vit-l-14-336": "ViT-L-14-336", "clip-vit-h-14": "ViT-H-14", "clip-vit-bigg-14": "ViT-bigG-14",
    "siglip-base-patch16-224": "ViT-B-16-SigLIP", "siglip-base-patch16-256": "ViT-B-16-SigLIP-256",
    "siglip-base-patch16-384": "ViT-B-16-SigLIP-384", "siglip-large-patch16-256": "ViT-L-16-SigLIP-256",
    "siglip-so400m-patch14-384": "ViT-SO400M-14-SigLIP-384",
    "metaclip2-worldwide-huge-quickgelu": "ViT-H-14-worldwide-quickgelu",
}
_SHAPE_KEYS = ("width", "heads", "mlp_dim", "layers", "seq_len", "mask", "pooling", "pre_ln", "class_token",
               "out_dim", "eps", "image_size", "patch_size", "vocab_size", "context_length")


@pytest.mark.parametrize("name", list(SAME_AS_OPEN_CLIP))
def test_presets_agree_with_open_clip_configs(name):
    pytest.importorskip("timm")
    hf = to_spec(build_hf(name, meta=True)).summary()
    oc = to_spec(build_open_clip(SAME_AS_OPEN_CLIP[name], device="meta")).summary()
    for tower in ("vision", "text"):
        ours = {k: v for k, v in hf[tower].items() if k in _SHAPE_KEYS}
        theirs = {k: v for k, v in oc[tower].items() if k in _SHAPE_KEYS}
        assert ours == theirs, tower
    assert hf["embed_dim"] == oc["embed_dim"] and hf["logit_bias"] == oc["logit_bias"]


def test_tiny_presets_cover_odd_head_dims_and_image_sizes():
    spec = to_spec(build_hf("metaclip2-tiny", meta=True))
    assert (spec.vision.head_dim, spec.text.head_dim) == (20, 36)
    assert spec.vision.embed.image_size % spec.vision.embed.patch_size != 0
    assert spec.vision.seq_len == 4 * 4 + 1


def test_build_hf_on_a_device_is_seeded():
    a = to_spec(build_hf("metaclip2-tiny", seed=2))
    b = to_spec(build_hf("metaclip2-tiny", seed=2, device="cpu"))
    assert torch.equal(a.vision.blocks[1].fc1.weight, b.vision.blocks[1].fc1.weight)
    assert not torch.equal(a.vision.blocks[1].fc1.weight, to_spec(build_hf("metaclip2-tiny")).vision.blocks[1].fc1.weight)
    assert next(build_hf("clip-vit-bigg-14", device="meta").parameters()).is_meta


def test_open_clip_siglip_tiny_is_seeded():
    pytest.importorskip("timm")
    a, b = to_spec(dualfuse.load("open_clip-siglip-tiny")), to_spec(dualfuse.load("open_clip-siglip-tiny"))
    assert torch.equal(a.vision.pool_head.qkv.weight, b.vision.pool_head.qkv.weight)
    c = to_spec(dualfuse.load("open_clip-siglip-tiny", seed=1))
    assert not torch.equal(a.vision.pool_head.qkv.weight, c.vision.pool_head.qkv.weight)


def test_local_metaclip2_directory_loads(tmp_path):
    model = dualfuse.load("metaclip2-tiny", seed=3)
    model.save_pretrained(tmp_path)
    loaded = dualfuse.load(str(tmp_path))
    assert type(loaded).__name__ == "MetaClip2Model" and family_of(loaded) == "hf_metaclip2"
    assert torch.equal(to_spec(model).text.blocks[0].qkv.weight, to_spec(loaded).text.blocks[0].qkv.weight)


def test_local_siglip2_directory_loads(tmp_path):
    from transformers import Siglip2Config, Siglip2Model
    cfg = Siglip2Config(vision_config=dict(hidden_size=32, intermediate_size=40, num_attention_heads=2,
                                           num_hidden_layers=1, num_patches=16, patch_size=4),
                        text_config=dict(hidden_size=32, intermediate_size=40, num_attention_heads=2,
                                         num_hidden_layers=1, vocab_size=50, max_position_embeddings=8))
    Siglip2Model(cfg).save_pretrained(tmp_path)
    loaded = dualfuse.load(str(tmp_path))
    assert type(loaded).__name__ == "Siglip2Model" and family_of(loaded) == "hf_siglip2"

"""Every supported family through the fused executor (CPU: Triton interpreter, tiny configs) against the source
model's own forward, and fuse()'s decision: covered models run fused, the rest fall back once with the reason."""
import warnings

import pytest
import torch

import dualfuse
from dualfuse import executors, presets
from dualfuse.adapters import family_of
from dualfuse.bench import random_inputs
from dualfuse.executors.base import source_forward

FAMILIES = ["clip-tiny", "siglip-tiny", "metaclip2-tiny", "siglip2-tiny", "open_clip-tiny", "open_clip-siglip-tiny"]


def _needs(name):
    if name.startswith("open_clip"):
        pytest.importorskip("open_clip")
        pytest.importorskip("timm")


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _check_against_source(model, fused, bi=2, bt=3, length=None):
    io = fused.executor.io
    (px, ids), = random_inputs(io, bi, bt, length, sets=1, seed=7)
    image_fn, text_fn = source_forward(model, family_of(model))
    with torch.no_grad():
        want_img, want_txt = image_fn(px), text_fn(ids)
    got_img, got_txt = fused.executor.encode(px, ids)
    assert got_img.shape == want_img.shape and got_txt.shape == want_txt.shape
    assert _rel(got_img, want_img) < 1e-4, _rel(got_img, want_img)
    assert _rel(got_txt, want_txt) < 1e-4, _rel(got_txt, want_txt)


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_runs_fused_and_matches_its_source_model(name):
    _needs(name)
    model = presets.load(name, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a covered model must not fall back
        fused = dualfuse.fuse(model, dtype=torch.float32)
    assert fused.executor.fallback is None
    _check_against_source(model, fused)


def _siglip_variant(**vision):
    from transformers import SiglipConfig, SiglipModel

    p = presets.PRESETS["siglip-tiny"]
    torch.manual_seed(5)
    return SiglipModel(SiglipConfig(text_config=p.text, vision_config=dict(p.vision, **vision))).eval()


def _clip_variant(vision=None, text=None):
    from transformers import CLIPConfig, CLIPModel

    p = presets.PRESETS["clip-tiny"]
    torch.manual_seed(6)
    cfg = CLIPConfig(text_config=dict(p.text, **(text or {})), vision_config=dict(p.vision, **(vision or {})),
                     **p.top)
    return CLIPModel(cfg).eval()


@pytest.mark.slow
def test_image_size_not_a_multiple_of_the_patch():
    # like so400m (384 px, patch 14): the Conv2d drops the remainder; 36 px / patch 8 -> 4x4 patches
    model = _siglip_variant(image_size=36)
    fused = dualfuse.fuse(model, dtype=torch.float32)
    assert fused.executor.spec.vision.seq_len == 16
    _check_against_source(model, fused, bi=2, bt=1)


@pytest.mark.slow
@pytest.mark.parametrize("width,heads", [(72, 2), (80, 1), (104, 1), (112, 1)])  # head dims 36, 80, 104, 112
def test_head_dims_that_are_not_powers_of_two(width, heads):
    model = _clip_variant(vision=dict(hidden_size=width, num_attention_heads=heads, intermediate_size=3 * width - 8),
                          text=dict(hidden_size=width, num_attention_heads=heads))
    fused = dualfuse.fuse(model, dtype=torch.float32)
    assert fused.executor.spec.vision.head_dim == width // heads
    _check_against_source(model, fused, bi=1, bt=2)


@pytest.mark.slow
def test_siglip2_naflex_mixed_grids_and_padding():
    pytest.importorskip("transformers.models.siglip2")
    from dualfuse.spec import PatchSequence

    model = presets.load("siglip2-tiny", seed=4)
    fused = dualfuse.fuse(model, dtype=torch.float32)
    spec = fused.executor.spec
    p, c = spec.vision.embed.patch_size, spec.vision.embed.channels
    g = torch.Generator().manual_seed(11)
    n = 20  # patches per image, padded
    grids = [(4, 4), (2, 6), (4, 4), (5, 3)]
    px = torch.randn(len(grids), n, p * p * c, generator=g)
    shapes = torch.tensor(grids)
    mask = (torch.arange(n)[None] < shapes.prod(-1)[:, None]).int()
    px = px * mask[..., None]  # the processor pads with zeros
    seq = PatchSequence(px, shapes, mask)
    with torch.no_grad():
        want = model.get_image_features(pixel_values=px, spatial_shapes=shapes,
                                        pixel_attention_mask=mask).pooler_output
    got = fused.get_image_features(pixel_values=px, spatial_shapes=shapes, pixel_attention_mask=mask).pooler_output
    assert _rel(got, want) < 1e-4
    assert torch.equal(fused.encode_image(seq), got)
    assert len(fused.executor._grids) == 3  # one fixed-resolution executor per grid
    bad = PatchSequence(px, shapes, torch.ones_like(mask))
    with pytest.raises(ValueError, match="pixel_attention_mask: image 0 should mark its first 16 patches"):
        fused.encode_image(bad)
    with pytest.raises(ValueError, match="spatial_shapes"):
        fused.encode_image(PatchSequence(px, torch.tensor([[5, 5]] * 4), mask))
    with pytest.raises(ValueError, match="SigLIP2 NaFlex: pass pixel_values with spatial_shapes"):
        fused.get_image_features(pixel_values=px)


def _fallback_cases():
    cases = [pytest.param(lambda: _clip_variant(vision=dict(hidden_size=136, num_attention_heads=1,
                                                            intermediate_size=96)),
                          "head dim 136 > 128", id="head-dim-136")]
    cases.append(pytest.param(lambda: presets.load("open_clip:RN50"), "ModifiedResNet", id="open_clip-RN50"))
    return cases


@pytest.mark.parametrize("build,reason", _fallback_cases())
def test_models_the_kernels_do_not_cover_fall_back_once_with_the_reason(build, reason):
    if "RN50" in str(reason) or "ResNet" in reason:
        pytest.importorskip("open_clip")
    model = build()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = dualfuse.fuse(model, dtype=torch.float32)
        ex = fused.executor
        io = ex.io
        (px, ids), = random_inputs(io, 1, 2, sets=1, seed=2)
        got_img, got_txt = ex.encode(px, ids)
        ex.encode(px, ids)
    ours = [w for w in caught if "dualfuse fused" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert reason in str(ours[0].message) and "falling back" in str(ours[0].message)
    assert ex.fallback is not None and reason in ex.notes
    image_fn, text_fn = source_forward(model, family_of(model))
    with torch.no_grad():
        assert _rel(got_img, image_fn(px)) < 1e-5 and _rel(got_txt, text_fn(ids)) < 1e-5
    with pytest.raises(ValueError, match=r"cannot run this model \(fallback=False\)"):
        executors.get("fused", model, dtype=torch.float32, fallback=False)


def test_fuse_refuses_a_model_class_outside_the_families():
    with pytest.raises(ValueError, match="unsupported model class .*supported: transformers CLIPModel"):
        dualfuse.fuse(torch.nn.Linear(4, 4))

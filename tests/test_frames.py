"""Camera frames straight in: uint8 [B, H, W, 3] or [B, 3, H, W] at the model's resolution, the model's mean/std
folded into the patch embedding (no float image built); the same as the source model on the normalized image."""
import warnings

import pytest
import torch

import dualfuse
from dualfuse import presets
from dualfuse.adapters import family_of, image_normalization
from dualfuse.adapters._norm import OPENAI_MEAN, OPENAI_STD, SIGLIP_MEAN, SIGLIP_STD
from dualfuse.executors.base import source_forward
from dualfuse.executors.fused import FusedExecutor

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _load(name):
    if name.startswith("open_clip"):
        pytest.importorskip("open_clip")
    return dualfuse.load(name)


def _frames(b, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, s, s, 3), generator=g, dtype=torch.uint8)


def _normalized(nhwc, mean, std):
    x = nhwc.permute(0, 3, 1, 2).float()
    return (x / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("name,mean,std", [("clip-tiny", OPENAI_MEAN, OPENAI_STD),
                                           ("siglip-tiny", SIGLIP_MEAN, SIGLIP_STD),
                                           ("open_clip-tiny", OPENAI_MEAN, OPENAI_STD)])
@pytest.mark.slow
def test_uint8_frames_match_the_source_model_on_the_normalized_image(name, mean, std):
    model = _load(name)
    fused = dualfuse.fuse(model, dtype=torch.float32, device=DEV)
    ex = fused.executor
    assert (ex.image_mean, ex.image_std) == (mean, std)
    s = ex.io.image_size
    nhwc = _frames(3, s, seed=1)
    image_fn, text_fn = source_forward(model, family_of(model))
    with torch.no_grad():
        want = image_fn(_normalized(nhwc, mean, std))
    got_nhwc = fused.encode_image(nhwc.to(DEV))
    got_nchw = fused.encode_image(nhwc.permute(0, 3, 1, 2).contiguous().to(DEV))
    assert _rel(got_nhwc, want) < 1e-4 and _rel(got_nchw, want) < 1e-4
    torch.testing.assert_close(got_nhwc, got_nchw, rtol=1e-5, atol=1e-5)
    # the float path is unchanged and gives the same
    assert _rel(fused.encode_image(_normalized(nhwc, mean, std).to(DEV)), want) < 1e-4
    # a runner of its own, with a uint8 (channels-last) input buffer
    key = (3, 0, ex.spec.text.context_length, "uint8")
    r = ex.runners[key]
    assert r.buf["vision"].input.dtype == torch.uint8 and r.buf["vision"].input.permute(0, 2, 3, 1).is_contiguous()
    assert (3, 0, ex.spec.text.context_length) in ex.runners  # the float call's own runner
    # the full call: frames next to texts
    ids = torch.randint(1, ex.io.vocab_size - 1, (2, ex.io.context_length))
    img, txt = ex.encode(nhwc[:2].to(DEV), ids.to(DEV))
    with torch.no_grad():
        want_txt = text_fn(ids)
    assert _rel(img, want[:2]) < 1e-4 and _rel(txt, want_txt) < 1e-4
    if ex.family != "open_clip":
        out = fused(input_ids=ids.to(DEV), pixel_values=nhwc[:2].to(DEV))
        assert _rel(out.image_embeds, torch.nn.functional.normalize(want[:2], dim=-1)) < 1e-4


@pytest.mark.slow
def test_mean_std_overrides_and_open_clip_image_mean():
    model = _load("clip-tiny")
    mean, std = (0.1, 0.2, 0.3), (0.3, 0.25, 0.2)
    fused = dualfuse.fuse(model, dtype=torch.float32, device=DEV, image_mean=mean, image_std=std)
    nhwc = _frames(2, 32, seed=2)
    image_fn, _ = source_forward(model, family_of(model))
    with torch.no_grad():
        want = image_fn(_normalized(nhwc, mean, std))
    assert _rel(fused.encode_image(nhwc.to(DEV)), want) < 1e-4
    one = FusedExecutor(model, dtype=torch.float32, device=DEV, image_mean=0.5, image_std=0.5)
    assert one.image_mean == SIGLIP_MEAN and one.image_std == SIGLIP_STD
    for kw, match in ((dict(image_std=(0.5, 0.0, 0.5)), "image_std: expected positive"),
                      (dict(image_mean=(0.5, 0.5)), "image_mean: expected 3 values"),
                      (dict(image_std="wide"), "image_std: expected")):
        with pytest.raises(ValueError, match=match):
            FusedExecutor(model, dtype=torch.float32, device=DEV, **kw)
    # open_clip: the model's visual.image_mean / image_std (set by open_clip.create_model) are the default
    oc = _load("open_clip-tiny")
    oc.visual.image_mean, oc.visual.image_std = (0.4, 0.4, 0.4), (0.2, 0.2, 0.2)
    assert image_normalization(oc) == ((0.4,) * 3, (0.2,) * 3)
    fused = dualfuse.fuse(oc, dtype=torch.float32, device=DEV)
    assert fused.executor.image_mean == (0.4,) * 3
    image_fn, _ = source_forward(oc, "open_clip")
    with torch.no_grad():
        want = image_fn(_normalized(nhwc, (0.4,) * 3, (0.2,) * 3))
    assert _rel(fused.encode_image(nhwc.to(DEV)), want) < 1e-4
    # kept through a rebuild from the spec (.to() / .half() re-fuse from it)
    assert FusedExecutor(fused.executor.spec, dtype=torch.float32, device=DEV).image_mean == (0.4,) * 3


@pytest.mark.parametrize("bad,match", [
    (torch.zeros(2, 64, 64, 3, dtype=torch.uint8), r"uint8 frames of 64x64, but the model takes 32x32 .*resize"),
    (torch.zeros(2, 3, 48, 32, dtype=torch.uint8), r"uint8 frames of 48x32, but the model takes 32x32"),
    (torch.zeros(2, 32, 5, 32, dtype=torch.uint8), r"expected \[batch, 32, 32, 3\] \(channels-last\) or "
                                                   r"\[batch, 3, 32, 32\], got shape \[2, 32, 5, 32\]"),
    (torch.zeros(32, 32, 3, dtype=torch.uint8), r"uint8 frames must be a 4-D tensor .*got 3-D"),
    (torch.zeros(0, 32, 32, 3, dtype=torch.uint8), r"empty batch"),
    (torch.zeros(2, 32, 32, 3, dtype=torch.int32), r"floating-point tensor .*or uint8 frames.*got torch.int32"),
    (torch.zeros(2, 32, 32, 3, dtype=torch.uint8, device="meta"), r"expected a tensor on"),
])
def test_bad_frames_say_what_was_expected(bad, match):
    fused = dualfuse.fuse(_load("clip-tiny"), dtype=torch.float32, device=DEV)
    if bad.device.type != "meta":
        bad = bad.to(DEV)
    with pytest.raises(ValueError, match=match):
        fused.encode_image(bad)


@pytest.mark.slow
def test_naflex_refuses_frames_and_stock_executors_keep_rejecting_them():
    fused = dualfuse.fuse(_load("siglip2-tiny"), dtype=torch.float32, device=DEV)
    with pytest.raises(ValueError, match="uint8 frames are not supported for SigLIP2 NaFlex"):
        fused.encode_image(torch.zeros(1, 32, 32, 3, dtype=torch.uint8, device=DEV))
    with pytest.raises(ValueError, match="uint8 frames are not supported for SigLIP2 NaFlex"):
        fused.executor.warmup([(1, 0, None, "uint8")])
    from dualfuse import executors

    eager = executors.get("eager", _load("clip-tiny"), dtype="fp32", device="cpu")
    with pytest.raises(ValueError, match="floating-point tensor .*got torch.uint8.*fused executor"):
        eager.encode_image(torch.zeros(1, 32, 32, 3, dtype=torch.uint8))


def test_fallback_normalizes_frames_on_the_device():
    from transformers import CLIPConfig, CLIPModel

    p = presets.PRESETS["clip-tiny"]
    torch.manual_seed(6)
    model = CLIPModel(CLIPConfig(text_config=p.text, vision_config=dict(p.vision, hidden_size=136,
                      num_attention_heads=1, intermediate_size=96), **p.top)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = dualfuse.fuse(model, dtype=torch.float32, device=DEV)
    assert fused.executor.fallback is not None and fused.executor.warmup([(1, 1, 4)]) == {}
    nhwc = _frames(2, 32, seed=3)
    with torch.no_grad():
        want = model.get_image_features(pixel_values=_normalized(nhwc, OPENAI_MEAN, OPENAI_STD)).pooler_output
    got = fused.encode_image(nhwc.to(DEV))
    assert _rel(got, want) < 1e-5
    with pytest.raises(ValueError, match="resize"):
        fused.encode_image(torch.zeros(1, 40, 40, 3, dtype=torch.uint8, device=DEV))


def test_patch_embed_kernel_reads_channels_last_uint8_through_strides():
    from dualfuse.kernels.embed import fold_normalization, patch_embed

    g = torch.Generator().manual_seed(4)
    d, p = 32, 8
    w, b = torch.randn(d, 3, p, p, generator=g) * 0.05, torch.randn(d, generator=g)
    cls, pos = torch.randn(d, generator=g), torch.randn(17, d, generator=g)
    nhwc = _frames(2, 32, seed=5)
    view = nhwc.permute(0, 3, 1, 2)  # no copy: the kernel reads the channels-last frame via strides
    assert not view.is_contiguous()
    want = patch_embed(_normalized(nhwc, OPENAI_MEAN, OPENAI_STD), w, b, cls, pos, p)
    wf, bf = fold_normalization(w, b, OPENAI_MEAN, OPENAI_STD)
    got = patch_embed(view.to(DEV), wf.to(DEV), bf.to(DEV), cls.to(DEV), pos.to(DEV), p)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
    # no bias in the conv: the folded bias carries the mean alone
    wf, bf = fold_normalization(w, None, OPENAI_MEAN, OPENAI_STD)
    want = patch_embed(_normalized(nhwc, OPENAI_MEAN, OPENAI_STD), w, None, cls, pos, p)
    torch.testing.assert_close(patch_embed(view, wf, bf, cls, pos, p), want, rtol=1e-5, atol=1e-5)

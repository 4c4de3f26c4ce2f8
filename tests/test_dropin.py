"""dualfuse.fuse(model) as a drop-in for the source model (CPU: Triton interpreter, tiny configs, fp32): every call
form against the source model's own outputs, the arguments it refuses and why, and the nn.Module side
(.to / .half / .float, .config, .logit_scale, state_dict)."""
import gc
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dualfuse
from dualfuse import presets
from dualfuse.bench import random_inputs
from dualfuse.executors.dropin import FusedModel

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # fuse()'s default device (tests/conftest.py: interpreter on CPU)

TOL = 1e-4 if DEV == "cpu" else 3e-3  # fp32 on the GPU: Triton's fp32 dots use TF32
HF = ["clip-tiny", "metaclip2-tiny", "siglip-tiny"]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _close(a, b, tol=None):
    tol = TOL if tol is None else max(tol, TOL)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert _rel(a, b) < tol, _rel(a, b)


def _inputs(fused, bi=3, bt=3, seed=7):
    (px, ids), = random_inputs(fused.executor.io, bi, bt, sets=1, seed=seed, device=DEV)
    return px, ids


def _right_mask(io, ids):
    """What a tokenizer's right padding gives: 1 up to and including the pooled (EOS) token, 0 after."""
    if io.text_pooling == "first_eos":
        pos = (ids == io.eos_token_id).int().argmax(-1)
    else:
        pos = ids.argmax(-1)
    return (torch.arange(ids.shape[1], device=ids.device)[None] <= pos[:, None]).long()


@pytest.fixture(scope="module")
def clip():
    model = presets.load("clip-tiny", seed=3, device=DEV)
    return model, dualfuse.fuse(model, dtype=torch.float32)


@pytest.fixture(scope="module")
def siglip():
    model = presets.load("siglip-tiny", seed=3, device=DEV)
    return model, dualfuse.fuse(model, dtype=torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("name", HF)
def test_hf_forward_and_features_with_processor_style_inputs(name):
    model = presets.load(name, seed=3, device=DEV)
    fused = dualfuse.fuse(model, dtype=torch.float32)
    assert isinstance(fused, nn.Module) and isinstance(fused, FusedModel)
    px, ids = _inputs(fused)
    io = fused.executor.io
    # causal towers: a right-padded mask; SigLIP: its processor's padding="max_length" without zeros in the mask
    mask = _right_mask(io, ids) if name != "siglip-tiny" else torch.ones_like(ids)
    if name != "siglip-tiny":
        assert (mask == 0).any()  # the test really pads
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, pixel_values=px, return_loss=True)
        want_txt = model.get_text_features(ids, attention_mask=mask).pooler_output
        want_img = model.get_image_features(pixel_values=px).pooler_output
    got = fused(input_ids=ids, attention_mask=mask, pixel_values=px, return_loss=True)
    assert type(got) is type(want)
    for k in ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds"):
        _close(getattr(got, k), getattr(want, k))
    assert abs(got.loss.item() - want.loss.item()) < TOL * max(1.0, abs(want.loss.item())), (got.loss, want.loss)
    assert got.text_model_output is None and got.vision_model_output is None
    _close(fused.get_text_features(ids, attention_mask=mask).pooler_output, want_txt)
    _close(fused.get_text_features(input_ids=ids).pooler_output, want_txt)
    _close(fused.get_image_features(pixel_values=px).pooler_output, want_img)
    _close(fused(ids, px).logits_per_image, want.logits_per_image)  # transformers' positional order


@pytest.mark.slow
def test_siglip2_naflex_forward_with_mask_and_loss():
    pytest.importorskip("transformers.models.siglip2")
    model = presets.load("siglip2-tiny", seed=3, device=DEV)
    fused = dualfuse.fuse(model, dtype=torch.float32)
    seq, ids = _inputs(fused, 2, 2)
    kw = dict(pixel_values=seq.pixel_values, spatial_shapes=seq.spatial_shapes,
              pixel_attention_mask=seq.pixel_attention_mask)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=torch.ones_like(ids), return_loss=True, **kw)
    got = fused(input_ids=ids, attention_mask=torch.ones_like(ids), return_loss=True, **kw)
    assert type(got) is type(want)
    _close(got.logits_per_image, want.logits_per_image)
    assert abs(got.loss.item() - want.loss.item()) < TOL * max(1.0, abs(want.loss.item()))
    with pytest.raises(ValueError, match="max_length=64"):
        fused(input_ids=ids, attention_mask=_right_mask(fused.executor.io, ids), **kw)


@pytest.mark.slow
def test_causal_masks_that_would_change_the_output_are_refused(clip):
    model, fused = clip
    px, ids = _inputs(fused, 2, 2)
    mask = _right_mask(fused.executor.io, ids)
    left = mask.flip(-1)  # 0s then 1s
    with pytest.raises(ValueError, match="attention_mask must be right-padded"):
        fused(input_ids=ids, attention_mask=left, pixel_values=px)
    with pytest.raises(ValueError, match="right-padded"):
        fused.get_text_features(ids, attention_mask=left)
    short = mask.clone()
    short[0, 1:] = 0  # masks the EOS token of row 0
    with pytest.raises(ValueError, match="masks the pooled token"):
        fused.get_text_features(ids, attention_mask=short)
    with pytest.raises(ValueError, match="expected 0s and 1s"):
        fused.get_text_features(ids, attention_mask=mask * 2)
    with pytest.raises(ValueError, match=r"attention_mask: expected a tensor of input_ids' shape \[2, "):
        fused.get_text_features(ids, attention_mask=mask[:, :3])
    with torch.no_grad():  # why refused: the source model's output does change under a left-padded mask
        a = model.get_text_features(ids, attention_mask=left).pooler_output
        b = model.get_text_features(ids).pooler_output
    assert _rel(a, b) > 1e-3


@pytest.mark.slow
def test_siglip_mask_with_padding_is_refused_all_ones_accepted(siglip):
    model, fused = siglip
    _, ids = _inputs(fused, 0, 2)
    padded = torch.ones_like(ids)
    padded[:, -3:] = 0
    with pytest.raises(ValueError, match=r"not supported for SigLIP.*padding='max_length' \(max_length=64\)"):
        fused.get_text_features(ids, attention_mask=padded)
    with torch.no_grad():  # HF's SigLIP text tower does use the mask: ignoring it would be wrong
        a = model.get_text_features(ids, attention_mask=padded).pooler_output
        b = model.get_text_features(ids).pooler_output
    assert _rel(a, b) > 1e-3
    _close(fused.get_text_features(ids, attention_mask=torch.ones_like(ids)).pooler_output, b)
    _close(fused.get_text_features(ids, attention_mask=torch.ones_like(ids, dtype=torch.bool)).pooler_output, b)


@pytest.mark.slow
def test_return_dict_false_gives_the_source_models_tuple(clip, siglip):
    for model, fused in (clip, siglip):
        px, ids = _inputs(fused, 2, 2)
        with torch.no_grad():
            want = model(input_ids=ids, pixel_values=px, return_loss=True, return_dict=False)
        got = fused(input_ids=ids, pixel_values=px, return_loss=True, return_dict=False)
        assert isinstance(got, tuple)
        # ours: (loss, logits_per_image, logits_per_text, text_embeds, image_embeds); the source model's tuple
        # goes on with text_model_output and vision_model_output, which the fused model does not keep
        assert len(got) == 5 and len(want) == 7
        for g, w in zip(got, want[:5]):
            _close(g, w)
        assert len(fused(ids, px, return_dict=False)) == 4


@pytest.mark.slow
def test_return_loss_needs_pairs(clip):
    _, fused = clip
    px, ids = _inputs(fused, 2, 3)
    with pytest.raises(ValueError, match="return_loss=True needs as many texts as images.*3 texts and 2 images"):
        fused(input_ids=ids, pixel_values=px, return_loss=True)


@pytest.mark.slow
def test_position_ids_only_the_default(clip):
    model, fused = clip
    px, ids = _inputs(fused, 1, 2)
    n = ids.shape[1]
    want = fused.get_text_features(ids).pooler_output
    ar = torch.arange(n, device=DEV)
    for pos in (ar[None], ar.expand(2, n)):
        _close(fused.get_text_features(ids, position_ids=pos).pooler_output, want, 1e-6)
    fused(input_ids=ids, pixel_values=px, position_ids=ar[None])
    with pytest.raises(ValueError, match=r"position_ids must be the default positions 0\.\.%d" % (n - 1)):
        fused.get_text_features(ids, position_ids=ar.flip(0)[None])
    with pytest.raises(ValueError, match=r"position_ids: expected an integer tensor \[1 or 2, %d\]" % n):
        fused.get_text_features(ids, position_ids=ar[None, :-1])


@pytest.mark.slow
def test_interpolate_pos_encoding_and_unknown_arguments_are_refused(clip):
    _, fused = clip
    px, ids = _inputs(fused, 1, 1)
    s = fused.executor.io.image_size
    with pytest.raises(ValueError, match=f"interpolate_pos_encoding=True is not supported.*{s}x{s}"):
        fused(input_ids=ids, pixel_values=px, interpolate_pos_encoding=True)
    with pytest.raises(ValueError, match="interpolate_pos_encoding=True"):
        fused.get_image_features(pixel_values=px, interpolate_pos_encoding=True)
    fused.get_image_features(px, interpolate_pos_encoding=False)
    with pytest.raises(ValueError, match=r"forward: unsupported argument\(s\) \['foo'\]; the fused model takes "
                                         r"input_ids, pixel_values, attention_mask"):
        fused(input_ids=ids, pixel_values=px, foo=1)
    with pytest.raises(ValueError, match=r"get_text_features: unsupported argument\(s\) \['output_hidden_states'\]"):
        fused.get_text_features(ids, output_hidden_states=True)
    fused(input_ids=ids, pixel_values=px, output_attentions=False, output_hidden_states=None)
    with pytest.raises(ValueError, match="return_dict=False is not supported.*pooler_output"):
        fused.get_text_features(ids, return_dict=False)
    with pytest.raises(ValueError, match="expected both input_ids and pixel_values"):
        fused(input_ids=ids)
    with pytest.raises(ValueError, match="both positionally and by keyword"):
        fused(ids, input_ids=ids, pixel_values=px)


def test_config_logit_scale_and_bias_as_the_source_model(clip, siglip):
    for model, fused in (clip, siglip):
        assert fused.config.to_dict() == model.config.to_dict()
        assert fused.logit_scale.shape == model.logit_scale.shape
        assert isinstance(fused.logit_scale, nn.Parameter) and not fused.logit_scale.requires_grad
        assert torch.equal(fused.logit_scale, model.logit_scale.detach())
    model, fused = siglip
    assert fused.logit_bias.shape == model.logit_bias.shape and torch.equal(fused.logit_bias, model.logit_bias.detach())
    assert clip[1].logit_bias is None
    assert fused.dtype == torch.float32 and fused.device.type == DEV
    assert next(fused.parameters()).device == fused.device


def test_train_refused_eval_kept(clip):
    _, fused = clip
    assert fused.eval() is fused and not fused.training
    with pytest.raises(ValueError, match="inference-only"):
        fused.train()
    assert not fused.training


@pytest.mark.slow
def test_to_half_float_rebuild_from_the_spec_and_keep_fuse_options():
    model = presets.load("clip-tiny", seed=4, device=DEV)
    fused = dualfuse.fuse(model, dtype=torch.float32, max_graphs=3)
    px, ids = _inputs(fused, 2, 2)
    with torch.no_grad():
        want = model(input_ids=ids, pixel_values=px)
    first = fused.executor
    assert fused.to(DEV) is fused and fused.executor is first and fused.float().executor is first
    assert fused.half() is fused and fused.dtype == torch.float16 and fused.executor is not first
    assert fused.executor.max_graphs == 3 and fused.logit_scale.dtype == torch.float16
    got = fused(input_ids=ids, pixel_values=px.half())
    assert got.logits_per_image.dtype == torch.float16
    _close(got.image_embeds, want.image_embeds, 1e-2)
    if DEV == "cpu":  # the interpreter's bf16 dots are wrong: a rebuild from the spec (no source to fall back to)
        with pytest.raises(ValueError, match="computes bf16 dot products wrongly"):
            fused.to(torch.bfloat16)
        assert fused.dtype == torch.float16  # unchanged
    else:
        fused.to(torch.bfloat16)
        assert fused.dtype == torch.bfloat16
    fused.float()
    assert fused.dtype == torch.float32
    _close(fused(input_ids=ids, pixel_values=px).logits_per_image, want.logits_per_image)  # exact again: from the spec
    with pytest.raises(ValueError, match="fp16, bf16 or fp32.*torch.float64"):
        fused.double()


@pytest.mark.slow
def test_fuse_defaults_to_the_source_models_dtype():
    model = presets.load("clip-tiny", seed=5, device=DEV)
    assert dualfuse.fuse(model).dtype == torch.float32
    half = model.half()
    fused = dualfuse.fuse(half)  # CPU: runs fp16 (interpreter), not silently fp32
    assert fused.dtype == torch.float16
    px, ids = _inputs(fused, 1, 2)
    with torch.no_grad():
        want = presets.load("clip-tiny", seed=5, device=DEV).get_text_features(ids).pooler_output
    _close(fused.get_text_features(ids).pooler_output, want, 1e-2)


def test_fuse_a_preset_name_or_a_spec():
    from dualfuse.adapters import to_spec

    fused = dualfuse.fuse("clip-tiny")
    assert fused.dtype == torch.float32 and fused.config.model_type == "clip"
    model = presets.load("clip-tiny", seed=1, device=DEV)
    from_spec = dualfuse.fuse(to_spec(model))
    px, ids = _inputs(from_spec, 1, 1)
    with torch.no_grad():
        want = model(input_ids=ids, pixel_values=px)
    _close(from_spec(input_ids=ids, pixel_values=px).logits_per_image, want.logits_per_image)
    from_spec.load_state_dict(from_spec.state_dict())
    with pytest.raises(ValueError, match="keys match neither this FusedModel's state_dict"):
        from_spec.load_state_dict(model.state_dict())


@pytest.mark.slow
def test_state_dict_round_trip_and_source_checkpoints():
    model = presets.load("clip-tiny", seed=6, device=DEV)
    fused = dualfuse.fuse(model, dtype=torch.float32)
    px, ids = _inputs(fused, 2, 2)
    before = fused(input_ids=ids, pixel_values=px)
    sd = fused.state_dict()
    assert "vision.blocks.0.qkv.weight" in sd and "logit_scale" in sd
    fused.load_state_dict(sd)
    assert torch.equal(fused(input_ids=ids, pixel_values=px).logits_per_image, before.logits_per_image)
    sd = {k: v.clone() for k, v in sd.items()}
    sd["logit_scale"] += 0.5
    fused.load_state_dict(sd)
    _close(fused(input_ids=ids, pixel_values=px).logits_per_image, before.logits_per_image * torch.exp(torch.tensor(0.5)))
    assert abs(fused.logit_scale.item() - (model.logit_scale.item() + 0.5)) < 1e-6
    with pytest.raises(ValueError, match=r"keys do not match.*missing \['logit_scale'\]"):
        fused.load_state_dict({k: v for k, v in sd.items() if k != "logit_scale"})
    with pytest.raises(ValueError, match=r"text.projection.weight: expected shape"):
        fused.load_state_dict(dict(sd, **{"text.projection.weight": torch.zeros(3, 3, device=DEV)}))
    # the source model's own state dict (a fine-tuned checkpoint of the same architecture) loads too
    tuned = presets.load("clip-tiny", seed=6, device=DEV)
    with torch.no_grad():
        tuned.text_projection.weight.mul_(2.0)
        tuned.vision_model.encoder.layers[0].mlp.fc1.weight.add_(0.1)
        want = tuned(input_ids=ids, pixel_values=px)
    fused.load_state_dict(tuned.state_dict())
    got = fused(input_ids=ids, pixel_values=px)
    _close(got.logits_per_image, want.logits_per_image)
    _close(got.image_embeds, want.image_embeds)
    with pytest.raises(ValueError, match="lacks 1 tensor"):
        fused.load_state_dict({k: v for k, v in tuned.state_dict().items() if k != "logit_scale"}, strict=False)


def test_the_fused_model_does_not_keep_the_source_model():
    model = presets.load("clip-tiny", seed=2, device=DEV)
    ref = weakref.ref(model)
    fused = dualfuse.fuse(model, dtype=torch.float32)
    del model
    gc.collect()
    assert ref() is None
    assert all(t.is_meta for t in fused._skeleton.state_dict().values())
    assert fused.executor.spec.device.type == "cpu"  # the kept spec is a host copy; on a GPU only packed weights


@pytest.mark.slow
def test_keep_host_copy_false_keeps_only_the_packed_weights():
    """keep_host_copy=False: the spec keeps shapes only (meta), the outputs are those of the default, rebuilds and
    state_dict() are refused with the reason, and a complete state dict still loads."""
    model = presets.load("clip-tiny", seed=3, device=DEV)
    full = dualfuse.fuse(model, dtype=torch.float32)
    lean = dualfuse.fuse(model, dtype=torch.float32, keep_host_copy=False)
    assert all(t.is_meta for _, t in dualfuse.spec.named_tensors(lean.executor.spec))
    px, ids = _inputs(lean, 2, 3)
    want = full(input_ids=ids, pixel_values=px)
    got = lean(input_ids=ids, pixel_values=px)
    assert torch.equal(got.logits_per_image, want.logits_per_image)
    assert torch.equal(lean.get_text_features(ids[:1]).pooler_output, full.get_text_features(ids[:1]).pooler_output)
    for call in (lambda: lean.half(), lambda: lean.to(torch.float16), lambda: lean.state_dict()):
        with pytest.raises(ValueError, match="keep_host_copy=False"):
            call()
    sd = full.state_dict()
    with pytest.raises(ValueError, match="keeps no weights to fill in"):
        lean.load_state_dict({k: v for k, v in sd.items() if k != "text.projection.weight"}, strict=False)
    sd = {k: v.clone() for k, v in sd.items()}
    sd["logit_scale"] += 0.25
    lean.load_state_dict(sd)  # every weight given: rebuilt, and again without a host copy
    assert all(t.is_meta for _, t in dualfuse.spec.named_tensors(lean.executor.spec))
    _close(lean(input_ids=ids, pixel_values=px).logits_per_image,
           want.logits_per_image * torch.exp(torch.tensor(0.25)))
    with pytest.raises(ValueError, match="keep_host_copy must be True or False"):
        dualfuse.fuse(model, dtype=torch.float32, keep_host_copy="no")
    pytest.importorskip("transformers.models.siglip2")
    with pytest.raises(ValueError, match="not available for SigLIP2 NaFlex"):
        dualfuse.fuse(presets.load("siglip2-tiny", seed=3, device=DEV), dtype=torch.float32, keep_host_copy=False)


def test_fallback_model_state_dict_is_the_source_models():
    from transformers import CLIPConfig, CLIPModel

    p = presets.PRESETS["clip-tiny"]
    torch.manual_seed(6)
    model = CLIPModel(CLIPConfig(text_config=p.text, vision_config=dict(p.vision, hidden_size=136,
                      num_attention_heads=1, intermediate_size=96), **p.top)).eval().to(DEV)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = dualfuse.fuse(model, dtype=torch.float32)
    assert fused.executor.fallback is not None
    px, ids = _inputs(fused, 2, 2)
    with torch.no_grad():
        want = model(input_ids=ids, pixel_values=px, return_loss=True)
    got = fused(input_ids=ids, pixel_values=px, return_loss=True)
    _close(got.logits_per_image, want.logits_per_image, 1e-5)
    assert set(fused.state_dict()) == set(model.state_dict())
    sd = model.state_dict()
    sd["logit_scale"] = sd["logit_scale"] + 1.0
    fused.load_state_dict(sd)
    assert fused.executor.fallback.model.logit_scale.item() == pytest.approx(model.logit_scale.item() + 1.0)


@pytest.mark.slow
def test_open_clip_style_calls_and_state_dict():
    pytest.importorskip("open_clip")
    pytest.importorskip("timm")
    for name in ("open_clip-tiny", "open_clip-siglip-tiny"):
        model = presets.load(name, seed=3, device=DEV)
        fused = dualfuse.fuse(model, dtype=torch.float32)
        px, ids = _inputs(fused, 2, 2)
        with torch.no_grad():
            want = model(px, ids)
            want_txt = model.encode_text(ids)
        got = fused(px, ids)
        assert len(got) == len(want) == (4 if name == "open_clip-siglip-tiny" else 3)
        _close(got[0], want[0])
        _close(got[1], want[1])
        for g, w in zip(got[2:], want[2:]):
            assert g.shape == w.shape and abs(g.item() - w.item()) < 1e-5 * abs(w.item()) + 1e-6
        _close(fused(text=ids)[1], want[1])
        assert fused(image=px, text=None)[1] is None
        _close(fused.encode_text(ids), want_txt)
        _close(fused.encode_image(px, normalize=True), want[0])
        with pytest.raises(ValueError, match=r"open_clip-style call: expected fused\(image, text\)"):
            fused(px, ids, attention_mask=None)
        with pytest.raises(AttributeError, match="has no config"):
            fused.config
        with torch.no_grad():
            model.logit_scale.add_(0.25)
        fused.load_state_dict(model.state_dict())  # open_clip's own state dict
        assert abs(fused(px, ids)[2].item() - model.logit_scale.exp().item()) < 1e-4

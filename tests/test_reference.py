"""Adapters + reference forward vs the source models' own outputs (fp32, tiny random configs)."""
import copy

import pytest
import torch

import dualfuse
from dualfuse import reference
from dualfuse.adapters import to_spec

FAMILIES = ["clip-tiny", "siglip-tiny", "open_clip-tiny"]


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make_inputs(spec, bi=3, bt=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    v, t = spec.vision, spec.text
    px = torch.randn(bi, v.embed.channels, v.embed.image_size, v.embed.image_size, generator=g)
    ids = torch.randint(2, t.embed.vocab_size - 1, (bt, t.context_length), generator=g)
    # EOS (the largest id, as CLIP's tokenizer gives) at different positions, padding after it.
    eos = spec.text.eos_token_id if spec.text.eos_token_id is not None else t.embed.vocab_size - 1
    for i in range(bt):
        pos = (3 + 2 * i) % t.context_length
        ids[i, pos] = eos
        ids[i, pos + 1:] = 0
    return px, ids


def source_outputs(model, family, px, ids):
    with torch.no_grad():
        if family == "open_clip":
            img, txt = model.encode_image(px), model.encode_text(ids)
            out = model(px, ids)
            scale = out[2] if isinstance(out, tuple) else out["logit_scale"]
            per_image = scale * torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).T
            if getattr(model, "logit_bias", None) is not None:
                per_image = per_image + model.logit_bias
            return img, txt, per_image
        img = model.get_image_features(pixel_values=px)
        txt = model.get_text_features(input_ids=ids)
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        return img, txt, model(pixel_values=px, input_ids=ids).logits_per_image


@pytest.mark.parametrize("name", FAMILIES)
def test_reference_matches_source_model(name):
    if name.startswith("open_clip"):
        pytest.importorskip("open_clip", reason="open_clip is not installed here (pip install 'dualfuse[openclip]')")
    model = dualfuse.load(name)
    before = copy.deepcopy(model.state_dict())
    spec = to_spec(model)
    px, ids = make_inputs(spec)
    img_ref, txt_ref, logits_ref = source_outputs(model, spec.family, px, ids)
    with torch.no_grad():
        img, txt = reference.encode(spec, px, ids)
        per_image, per_text = reference.logits(spec, img, txt)
    assert img.shape == img_ref.shape and txt.shape == txt_ref.shape
    assert rel_err(img, img_ref) <= 1e-5
    assert rel_err(txt, txt_ref) <= 1e-5
    assert rel_err(per_image, logits_ref) <= 1e-5
    assert torch.equal(per_text, per_image.T)
    # the user's model is untouched, and the spec shares no storage with it
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    spec.vision.blocks[0].qkv.weight.add_(1.0)
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in before)


def test_clip_first_eos_pooling_differs_from_argmax():
    """Modern CLIP configs pool at the first eos_token_id, legacy ones (eos id 2) at argmax."""
    model = dualfuse.load("clip-tiny")
    spec = to_spec(model)
    assert spec.text.pooling == "first_eos" and spec.text.eos_token_id == 99
    ids = torch.tensor([[5, 99, 7, 99, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3]])
    with torch.no_grad():
        ref = model.get_text_features(input_ids=ids).pooler_output
        ours = reference.encode_text(spec, ids)
    assert rel_err(ours, ref) <= 1e-5


def test_real_presets_have_real_shapes():
    from dualfuse.presets import PRESETS, build_hf
    assert {"clip-vit-b-32", "clip-vit-b-16", "clip-vit-l-14", "siglip-base-patch16-224"} <= set(PRESETS)
    spec = to_spec(build_hf("clip-vit-b-32", meta=True))
    assert (spec.vision.seq_len, spec.text.seq_len, spec.vision.num_layers, spec.embed_dim) == (50, 77, 12, 512)
    assert spec.text.pooling == "argmax"  # the published config carries the legacy eos id 2


def test_presets_are_seeded():
    a, b = to_spec(dualfuse.load("clip-tiny")), to_spec(dualfuse.load("clip-tiny"))
    assert torch.equal(a.vision.blocks[1].fc1.weight, b.vision.blocks[1].fc1.weight)
    c = to_spec(dualfuse.load("clip-tiny", seed=1))
    assert not torch.equal(a.vision.blocks[1].fc1.weight, c.vision.blocks[1].fc1.weight)


def test_unsupported_model_is_rejected_with_a_list():
    with pytest.raises(ValueError, match="supported: .*CLIPModel"):
        to_spec(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="unknown model 'nope'.*clip-vit-b-32"):
        dualfuse.load("nope")


def test_local_hf_directory_loads_real_weights(tmp_path):
    model = dualfuse.load("siglip-tiny", seed=3)
    model.save_pretrained(tmp_path)
    loaded = dualfuse.load(str(tmp_path))
    a, b = to_spec(model), to_spec(loaded)
    assert torch.equal(a.text.blocks[0].qkv.weight, b.text.blocks[0].qkv.weight)
    assert a.logit_bias == b.logit_bias


def test_local_path_errors(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        dualfuse.load(str(tmp_path))
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"x")
    with pytest.raises(ValueError, match="architecture"):
        dualfuse.load(str(ckpt))


def test_spec_to_casts_floats_only():
    spec = to_spec(dualfuse.load("clip-tiny"))
    half = spec.to(dtype=torch.float16)
    assert half.vision.blocks[0].qkv.weight.dtype == torch.float16
    assert spec.vision.blocks[0].qkv.weight.dtype == torch.float32
    assert half.summary()["vision"]["seq_len"] == 17

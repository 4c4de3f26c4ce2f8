"""Single towers and VLM vision towers: dualfuse.fuse(tower) against the source model (CPU, Triton interpreter, tiny
configs): pooled outputs, last_hidden_state, every hidden state, selected hidden states, return_dict=False,
fuse(hidden_states=..., pooled=...), refusals and fallbacks; LLaVA and PaliGemma with a fused vision tower give the
same logits and greedy tokens."""
import warnings

import pytest
import torch

import dualfuse

transformers = pytest.importorskip("transformers")

ATOL = 2e-4


def _vision_kw(image_size=30, patch=8, layers=2):
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
                image_size=image_size, patch_size=patch)


def _text_kw(layers=2):
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2, vocab_size=99,
                max_position_embeddings=16)


def make_tower(name: str):
    T = transformers
    if name.startswith("CLIPVision"):
        return getattr(T, name)(T.CLIPVisionConfig(**_vision_kw(), projection_dim=16))
    if name.startswith("CLIPText"):
        return getattr(T, name)(T.CLIPTextConfig(**_text_kw(), projection_dim=16, eos_token_id=98))
    if name.startswith("MetaClip2Vision"):
        return getattr(T, name)(T.MetaClip2VisionConfig(**_vision_kw(), projection_dim=16))
    if name.startswith("MetaClip2Text"):
        return getattr(T, name)(T.MetaClip2TextConfig(**_text_kw(), projection_dim=16, eos_token_id=98))
    if name == "SiglipVisionModel":
        return T.SiglipVisionModel(T.SiglipVisionConfig(**_vision_kw(image_size=32)))
    if name == "SiglipVisionModel-nohead":
        return T.SiglipVisionModel(T.SiglipVisionConfig(**_vision_kw(image_size=32), vision_use_head=False))
    if name == "SiglipTextModel":
        return T.SiglipTextModel(T.SiglipTextConfig(**_text_kw(), projection_size=16))
    raise KeyError(name)


def inputs_for(name: str, batch=2):
    if "Text" in name:
        ids = torch.randint(1, 97, (batch, 16))
        ids[:, -3] = 98  # CLIP / MetaCLIP 2 pool at the first EOS
        return {"input_ids": ids}
    size = 32 if name.startswith("Siglip") else 30  # 30: not a multiple of the patch (8)
    return {"pixel_values": torch.randn(batch, 3, size, size)}


CLASSES = ["CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPTextModel", "CLIPTextModelWithProjection",
           "MetaClip2VisionModel", "MetaClip2VisionModelWithProjection", "MetaClip2TextModel",
           "MetaClip2TextModelWithProjection", "SiglipVisionModel", "SiglipVisionModel-nohead", "SiglipTextModel"]


def assert_same_output(got, want):
    assert type(got) is type(want)
    for key in want.keys():
        w = getattr(want, key)
        g = getattr(got, key)
        if key == "hidden_states":
            assert g is not None and len(g) == len(w), key
            for i, (a, b) in enumerate(zip(g, w)):
                assert (a is None) == (b is None), (key, i)
                if b is not None:
                    torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-3, msg=f"hidden_states[{i}]")
        elif w is not None:
            torch.testing.assert_close(g, w, atol=ATOL, rtol=1e-3, msg=key)


@pytest.mark.parametrize("name", CLASSES)
def test_tower_matches_source(name):
    """Every output (pooled / embeds, last_hidden_state, every hidden state) of each class equals the source's."""
    src = make_tower(name).eval()
    x = inputs_for(name)
    fused = dualfuse.fuse(src)
    assert type(fused).__name__ == "FusedTower" and fused.executor.fallback is None
    with torch.no_grad():
        want = src(**x, output_hidden_states=True)
    assert_same_output(fused(**x, output_hidden_states=True), want)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["CLIPVisionModel", "SiglipTextModel"])
def test_tower_tuple_and_selection(name):
    """return_dict=False gives the source's tuple; output_hidden_states=<index> fills only that entry."""
    src = make_tower(name).eval()
    x = inputs_for(name, batch=1)
    fused = dualfuse.fuse(src)
    with torch.no_grad():
        want = src(**x, return_dict=False)
        sel = src(**x, output_hidden_states=-2)
    got = fused(**x, return_dict=False)
    assert isinstance(got, tuple) and len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-3)
    assert_same_output(fused(**x, output_hidden_states=-2), sel)


def test_fuse_for_selected_hidden_states():
    """fuse(tower, hidden_states=(-2,)): the last block and the head never run; other layers are refused."""
    src = make_tower("CLIPVisionModel").eval()
    px = torch.randn(1, 3, 30, 30)
    fused = dualfuse.fuse(src, hidden_states=(-2,))
    with torch.no_grad():
        want = src(px, output_hidden_states=True)
    out = fused(px, output_hidden_states=-2)
    torch.testing.assert_close(out.hidden_states[-2], want.hidden_states[-2], atol=ATOL, rtol=1e-3)
    assert out.pooler_output is None and out.last_hidden_state is None
    (key,) = list(fused.executor.runners)
    runner = fused.executor.runners[key]
    assert [s.layer for s in runner.plan.steps("vision") if s.op == "fc2"] == [0]  # layer 1 skipped
    assert not any(s.op in ("pool_ln", "proj") for s in runner.plan.steps("vision"))
    with pytest.raises(ValueError, match=r"built for hidden states \(1,\)"):
        fused(px, output_hidden_states=0)
    # output_hidden_states=True (transformers before index selection): the computed one reads, others raise
    every = fused(px, output_hidden_states=True).hidden_states
    torch.testing.assert_close(every[-2], want.hidden_states[-2], atol=ATOL, rtol=1e-3)
    with pytest.raises(ValueError, match=r"hidden_states\[-1\] was not computed"):
        every[-1]


def test_tower_refusals():
    src = make_tower("SiglipVisionModel-nohead").eval()
    with pytest.raises(ValueError, match="no pooling head"):
        dualfuse.fuse(src, pooled=True)
    fused = dualfuse.fuse(src)
    px = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="output_attentions"):
        fused(px, output_attentions=True)
    fused.config._attn_implementation = "eager"  # transformers allows output_attentions with eager attention only
    fused.config.output_attentions = True  # transformers' default for a call that leaves it out: the config's
    with pytest.raises(ValueError, match="output_attentions is not supported .asked for by the call or by the model"):
        fused(px)
    fused.config.output_attentions = False
    with pytest.raises(ValueError, match="out of range"):
        fused(px, output_hidden_states=5)
    with pytest.raises(ValueError, match="no text tower"):
        fused.executor.encode_text(torch.randint(0, 9, (1, 4)))
    pair = transformers.CLIPModel(transformers.CLIPConfig(
        vision_config=_vision_kw(layers=1), text_config=_text_kw(layers=1), projection_dim=16))
    with pytest.raises(ValueError, match="apply to a single tower"):
        dualfuse.fuse(pair, hidden_states=(-2,))


def test_tower_fallback_with_reason():
    """A tower the kernels refuse (head dim 160 > 128) falls back at fuse(), saying why; outputs still match."""
    cfg = transformers.CLIPVisionConfig(hidden_size=160, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=1, image_size=16, patch_size=8)
    src = transformers.CLIPVisionModel(cfg).eval()
    with pytest.warns(UserWarning, match="head dim 160 > 128"):
        fused = dualfuse.fuse(src)
    assert "FALLBACK" in fused.executor.notes
    px = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        want = src(px, output_hidden_states=True)
    assert_same_output(fused(px, output_hidden_states=True), want)


def test_tower_state_dict_and_to():
    src = make_tower("CLIPVisionModelWithProjection").eval()
    fused = dualfuse.fuse(src)
    sd = fused.state_dict()
    assert "logit_scale" not in sd and any(k.startswith("vision.blocks.0") for k in sd)
    assert not any(k.startswith("text.") for k in sd)
    fused.to(torch.float32)  # a no-op conversion keeps it working
    px = torch.randn(1, 3, 30, 30)
    with torch.no_grad():
        want = src(px).image_embeds
    torch.testing.assert_close(fused(px).image_embeds, want, atol=ATOL, rtol=1e-3)


# ------------------------------------------------------------------------------------------------ VLMs

def _tiny_llava():
    T = transformers
    vision = T.CLIPVisionConfig(**_vision_kw(image_size=16, patch=8, layers=2))
    text = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    cfg = T.LlavaConfig(vision_config=vision, text_config=text, image_token_index=63, projector_hidden_act="gelu",
                        vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=4)
    return T.LlavaForConditionalGeneration(cfg).eval(), 63, 4


def _tiny_paligemma():
    T = transformers
    vision = T.SiglipVisionConfig(**_vision_kw(image_size=16, patch=8, layers=2), vision_use_head=False,
                                  projection_dim=32)
    text = T.GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, vocab_size=64, max_position_embeddings=64)
    cfg = T.PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=63, projection_dim=32)
    cfg.text_config.num_image_tokens = 4
    return T.PaliGemmaForConditionalGeneration(cfg).eval(), 63, 4


@pytest.mark.parametrize("make, fuse_kw", [
    (_tiny_llava, {}), (_tiny_paligemma, {}),
    # fused for the layer each reads: LLaVA hidden_states[-2], PaliGemma last_hidden_state (the last layer)
    pytest.param(_tiny_llava, {"hidden_states": (-2,)}, marks=pytest.mark.slow),
    pytest.param(_tiny_paligemma, {"hidden_states": (-1,)}, marks=pytest.mark.slow),
], ids=["llava", "paligemma", "llava-layer-2", "paligemma-last-layer"])
def test_vlm_with_fused_vision_tower(make, fuse_kw):
    """vlm.model.vision_tower = dualfuse.fuse(vlm.model.vision_tower): same logits, same greedy tokens."""
    vlm, image_token, n_image = make()
    ids = torch.cat([torch.full((1, n_image), image_token), torch.randint(1, 60, (1, 5))], dim=1)
    px = torch.randn(1, 3, 16, 16)
    kw = dict(input_ids=ids, pixel_values=px, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        want = vlm(**kw).logits
        want_tokens = vlm.generate(**kw, max_new_tokens=3, do_sample=False)
    vlm.model.vision_tower = dualfuse.fuse(vlm.model.vision_tower, **fuse_kw)
    with torch.no_grad():
        got = vlm(**kw).logits
        got_tokens = vlm.generate(**kw, max_new_tokens=3, do_sample=False)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)
    assert torch.equal(got_tokens, want_tokens)


def test_fusing_a_whole_vlm_points_at_its_tower():
    vlm, _, _ = _tiny_llava()
    with pytest.raises(ValueError, match=r"LlavaForConditionalGeneration \(a VLM with a CLIPVisionModel vision tower: "
                       r"fuse the tower in place, m\.model\.vision_tower = dualfuse\.fuse\(m\.model\.vision_tower\)"):
        dualfuse.fuse(vlm)


# ------------------------------------------------------------------------------------ what the pair has

@pytest.mark.slow
@pytest.mark.parametrize("name", ["open_clip-tiny", "open_clip-siglip-tiny"])
def test_open_clip_visual(name):
    """open_clip's model.visual (ViT, timm ViT) alone: fused(images) is model.visual(images)."""
    pytest.importorskip("open_clip")
    if "siglip" in name:
        pytest.importorskip("timm")
    visual = dualfuse.load(name).visual.eval()
    size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
    px = torch.randn(2, 3, size, size)
    fused = dualfuse.fuse(visual)
    assert fused.executor.fallback is None
    with torch.no_grad():
        want = visual(px)
    torch.testing.assert_close(fused(px), want, atol=ATOL, rtol=1e-3)


def test_open_clip_visual_refuses_hidden_states_and_unpooled():
    """open_clip's model.visual(images) returns pooled embeddings alone: the options that would make the fused
    tower return tokens (hidden_states=, pooled=False) are refused at fuse() rather than give tokens unlike
    open_clip's own (which come after ln_post, without the class token)."""
    pytest.importorskip("open_clip")
    visual = dualfuse.load("open_clip-tiny").visual.eval()
    for opts in (dict(hidden_states=(-2,)), dict(pooled=False)):
        with pytest.raises(ValueError, match="open_clip's model.visual.images. returns its pooled embeddings only"):
            dualfuse.fuse(visual, **opts)
    assert dualfuse.fuse(visual, hidden_states=(), pooled=True).executor.pooled


@pytest.mark.slow
def test_vision_tower_uint8_frames_and_int8_weights():
    """uint8 frames: the normalization folded into the patch embedding; int8 weights: cosine close to fp32."""
    from dualfuse.adapters import image_normalization

    src = make_tower("CLIPVisionModelWithProjection").eval()
    frames = torch.randint(0, 256, (2, 30, 30, 3), dtype=torch.uint8)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in image_normalization(src, "hf_clip"))
    px = (frames.permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.no_grad():
        want = src(px).image_embeds
    fused = dualfuse.fuse(src)
    torch.testing.assert_close(fused(frames).image_embeds, want, atol=1e-3, rtol=1e-3)
    q = dualfuse.fuse(src, weights="int8")
    cos = torch.nn.functional.cosine_similarity(q(px).image_embeds, want, dim=-1)
    assert cos.min() > 0.99


@pytest.mark.slow
def test_text_tower_bucketed_lengths():
    """A CLIP text tower pads a short text up to its bucket; the tokens it returns are the text's own."""
    src = make_tower("CLIPTextModel").eval()
    ids = torch.randint(1, 97, (1, 7))
    ids[0, -1] = 98
    fused = dualfuse.fuse(src, text_buckets=(12,))
    with torch.no_grad():
        want = src(ids, output_hidden_states=True)
    got = fused(ids, output_hidden_states=True)
    assert fused.executor.text_bucket(7) == 12
    assert_same_output(got, want)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["SiglipVisionModel", "CLIPTextModel"])
def test_tower_unfolded_layernorms(name):
    """fold_ln=False (the H100 path: separate LayerNorm launches, which may finish a GEMM's split-K sums): hidden
    states are copied only once complete."""
    src = make_tower(name).eval()
    x = inputs_for(name, batch=1)
    fused = dualfuse.fuse(src, fold_ln=False)
    with torch.no_grad():
        want = src(**x, output_hidden_states=True)
    assert_same_output(fused(**x, output_hidden_states=True), want)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["CLIPVisionModel", "SiglipVisionModel", "CLIPTextModelWithProjection"])
def test_gpu_tower_fp16_graph(name):
    """On CUDA (one graph per call shape, split-K deferred to LayerNorms at batch 1): fp16 outputs within cosine
    0.999 of the fp32 source, every hidden state, also fused for hidden_states=(-2,)."""
    src = make_tower(name).eval().cuda()
    x = {k: v.cuda() for k, v in inputs_for(name, batch=1).items()}
    with torch.no_grad():
        want = src(**x, output_hidden_states=True)
    fused = dualfuse.fuse(src, dtype=torch.float16)
    xh = {k: (v.half() if v.is_floating_point() else v) for k, v in x.items()}
    got = fused(**xh, output_hidden_states=True)

    def cos(a, b):
        return torch.nn.functional.cosine_similarity(a.float().flatten(0, -2), b.flatten(0, -2), dim=-1).min()

    for a, b in zip(got.hidden_states, want.hidden_states):
        assert cos(a, b) > 0.999
    assert cos(got.last_hidden_state, want.last_hidden_state) > 0.999
    sel = dualfuse.fuse(src, dtype=torch.float16, hidden_states=(-2,))(**xh, output_hidden_states=-2)
    assert cos(sel.hidden_states[-2], want.hidden_states[-2]) > 0.999


@pytest.mark.gpu
def test_gpu_llava_fused_tower():
    vlm, image_token, n_image = _tiny_llava()
    vlm = vlm.cuda()
    ids = torch.cat([torch.full((1, n_image), image_token), torch.randint(1, 60, (1, 5))], dim=1).cuda()
    kw = dict(input_ids=ids, pixel_values=torch.randn(1, 3, 16, 16, device="cuda"), attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        want = vlm.generate(**kw, max_new_tokens=3, do_sample=False)
        vlm.model.vision_tower = dualfuse.fuse(vlm.model.vision_tower, hidden_states=(-2,))
        got = vlm.generate(**kw, max_new_tokens=3, do_sample=False)
    assert torch.equal(got, want)

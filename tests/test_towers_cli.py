"""Single towers end to end: `dualfuse bench` / `eval` on tower checkpoint directories (every executor that runs on
this machine, onnxruntime included), the SigLIP2 NaFlex vision tower alone, state_dict round trips, and the
refusals of calls and options that would return nothing or drop outputs (CPU, Triton interpreter, tiny configs)."""
import json

import pytest
import torch

import dualfuse
from dualfuse import cli

transformers = pytest.importorskip("transformers")

ATOL = 2e-4
FAST = ["--iters", "1", "--warmup", "1", "--input-sets", "1", "--no-progress"]


def _vision_kw(**kw):
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                patch_size=8, **kw)


def _text_kw():
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=99,
                max_position_embeddings=16)


def _save(model, path):
    model.save_pretrained(str(path))
    return str(path)


def _bench_rows(tmp_path, model_dir, executors):
    out = tmp_path / "bench.json"
    rc = cli.main(["bench", "--model", model_dir, "--executors", executors, *FAST, "--json", str(out)])
    return rc, {r["executor"]: r for r in json.loads(out.read_text())["results"]}


def _siglip_tower(which: str):
    """A tiny SigLIP text tower, or vision tower without its pooling head (seeded)."""
    T = transformers
    torch.manual_seed(0)
    if which == "text":
        return T.SiglipTextModel(T.SiglipTextConfig(**_text_kw()))
    return T.SiglipVisionModel(T.SiglipVisionConfig(**_vision_kw(), vision_use_head=False))


@pytest.mark.parametrize("which", [pytest.param("text", marks=pytest.mark.slow), "siglip-vision-nohead"])
def test_bench_tower_checkpoint_onnxruntime(tmp_path, which):
    """`dualfuse bench --model <tower dir>`: ONNX Runtime runs a text tower alone and a SigLIP vision tower without
    its pooling head (whose embeddings are its tokens), at the fp32 reference's cosine."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model = _siglip_tower(which)
    rc, rows = _bench_rows(tmp_path, _save(model, tmp_path / "tower"), "eager,onnxruntime")
    assert rc == 0, rows
    for name in ("eager", "onnxruntime"):
        assert rows[name]["status"] == "ok" and rows[name]["cosine_ok"] is True, rows[name]


@pytest.mark.slow
def test_bench_and_eval_vision_tower_checkpoint(tmp_path, capsys):
    """A CLIPVisionModelWithProjection directory: bench (eager, fused; graph needs CUDA) and eval parity."""
    T = transformers
    torch.manual_seed(0)
    path = _save(T.CLIPVisionModelWithProjection(T.CLIPVisionConfig(**_vision_kw(), projection_dim=16)),
                 tmp_path / "tower")
    rc, rows = _bench_rows(tmp_path, path, "eager,graph,fused")
    assert rc == 0
    assert rows["fused"]["status"] == "ok" and rows["fused"]["cosine_ok"] is True
    assert rows["graph"]["status"] == ("ok" if torch.cuda.is_available() else "needs CUDA")
    capsys.readouterr()
    assert cli.main(["eval", "--model", path, "--device", "cpu", "--samples", "4"]) == 0
    out = capsys.readouterr().out
    assert "image cosine" in out and "PASS" in out


@pytest.mark.slow
def test_siglip2_vision_tower(tmp_path):
    """Siglip2VisionModel alone (NaFlex): pooler_output equals the source's for images of two patch grids in one
    batch; hidden states are refused; `dualfuse bench` on its checkpoint directory runs (ONNX: unavailable, says
    why)."""
    T = transformers
    torch.manual_seed(0)
    src = T.Siglip2VisionModel(T.Siglip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                     num_attention_heads=2, patch_size=4, num_patches=16)).eval()
    px = torch.randn(2, 16, 3 * 4 * 4)
    shapes = torch.tensor([[4, 4], [2, 3]])
    mask = torch.zeros(2, 16, dtype=torch.long)
    mask[0], mask[1, :6] = 1, 1
    with torch.no_grad():
        want = src(pixel_values=px, pixel_attention_mask=mask, spatial_shapes=shapes)
    fused = dualfuse.fuse(src)
    assert fused.executor.fallback is None
    got = fused(pixel_values=px, pixel_attention_mask=mask, spatial_shapes=shapes)
    assert type(got) is type(want) and got.last_hidden_state is None
    torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=ATOL, rtol=1e-3)
    torch.testing.assert_close(fused(px, mask, shapes).pooler_output, want.pooler_output, atol=ATOL, rtol=1e-3)
    with pytest.raises(ValueError, match="output_hidden_states is not supported for SigLIP2 NaFlex"):
        fused(pixel_values=px, pixel_attention_mask=mask, spatial_shapes=shapes, output_hidden_states=True)
    with pytest.raises(ValueError, match="spatial_shapes and pixel_attention_mask"):
        fused(pixel_values=px)
    rc, rows = _bench_rows(tmp_path, _save(src, tmp_path / "tower"), "eager,onnxruntime")
    assert rc == 0 and rows["eager"]["cosine_ok"] is True
    if "onnxruntime" in rows and rows["onnxruntime"]["status"] != "ok":
        assert "NaFlex" in rows["onnxruntime"]["message"]


@pytest.mark.parametrize("name", ["CLIPVisionModelWithProjection", "open_clip"])
def test_tower_state_dict_round_trip(name):
    """fused.load_state_dict(other_fused.state_dict()) gives the other tower's outputs (no logit_scale either way)."""
    T = transformers
    if name == "open_clip":
        pytest.importorskip("open_clip")
        a, b = (dualfuse.load("open_clip-tiny", seed=s).visual.eval() for s in (1, 2))
    else:
        torch.manual_seed(1)
        a, b = (T.CLIPVisionModelWithProjection(T.CLIPVisionConfig(**_vision_kw(), projection_dim=16)).eval()
                for _ in range(2))
    fa, fb = dualfuse.fuse(a), dualfuse.fuse(b)
    sd = fb.state_dict()
    assert "logit_scale" not in sd
    missing, unexpected = fa.load_state_dict(sd)
    assert missing == [] and unexpected == []
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = b(px)
    got = fa(px)
    if name == "open_clip":
        torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-3)
    else:
        torch.testing.assert_close(got.image_embeds, want.image_embeds, atol=ATOL, rtol=1e-3)


def test_tower_refuses_calls_and_options_that_return_nothing():
    T = transformers
    src = T.CLIPVisionModel(T.CLIPVisionConfig(**_vision_kw())).eval()
    with pytest.raises(ValueError, match=r"hidden_states=\(\) without the pooled output"):
        dualfuse.fuse(src, hidden_states=())
    fused = dualfuse.fuse(src, hidden_states=(-2,))
    px = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="this call would return nothing"):
        fused(px)  # e.g. PaliGemma, which reads last_hidden_state, given a tower fused for LLaVA
    with torch.no_grad():
        want = src(px, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(fused(px, output_hidden_states=-2).hidden_states[-2], want, atol=ATOL, rtol=1e-3)
    only_pooled = dualfuse.fuse(src, hidden_states=(), pooled=True)
    with torch.no_grad():
        torch.testing.assert_close(only_pooled(px).pooler_output, src(px).pooler_output, atol=ATOL, rtol=1e-3)


def test_open_clip_visual_output_tokens_refused():
    """open_clip's visual with output_tokens=True returns (pooled, tokens): refused at fuse(), not silently pooled."""
    pytest.importorskip("open_clip")
    visual = dualfuse.load("open_clip-tiny").visual.eval()
    visual.output_tokens = True
    with pytest.raises(ValueError, match="output_tokens=True"):
        dualfuse.fuse(visual)


@pytest.mark.slow
def test_tower_half_keeps_its_options():
    """.half() rebuilds a tower in fp16 with the same fuse() options: the layer it was fused for, within fp16
    error of the fp32 source; other layers still refused."""
    T = transformers
    torch.manual_seed(3)
    src = T.CLIPVisionModel(T.CLIPVisionConfig(**_vision_kw())).eval()
    fused = dualfuse.fuse(src, hidden_states=(-2,)).half()
    assert fused.dtype == torch.float16 and fused.executor.hidden_states == (1,)
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = src(px, output_hidden_states=True).hidden_states[-2]
    got = fused(px.half(), output_hidden_states=-2).hidden_states[-2]
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
    with pytest.raises(ValueError, match=r"built for hidden states \(1,\)"):
        fused(px.half(), output_hidden_states=-1)


@pytest.mark.slow
def test_profile_tower_checkpoint(tmp_path):
    """`dualfuse profile --model <tower dir>` profiles the tower alone."""
    T = transformers
    torch.manual_seed(0)
    path = _save(T.CLIPTextModel(T.CLIPTextConfig(**_text_kw(), eos_token_id=98)), tmp_path / "tower")
    out = tmp_path / "prof"
    assert cli.main(["profile", "--model", path, "--executor", "eager", "--iters", "1", "--warmup", "1",
                     "--latency-runs", "1", "--out", str(out)]) == 0
    data = json.loads((out / "profile.json").read_text())
    assert data["image_batch"] == 0 and data["text_batch"] == 1
    assert "| text |" in (out / "report.md").read_text()


def test_fallback_tower_takes_uint8_frames():
    """A tower the kernels do not cover (head dim 160) runs its source model; uint8 frames are normalized first, as
    the fused path does (the source alone would read raw 0..255 values, or misread channels-last frames)."""
    from dualfuse.adapters import image_normalization

    T = transformers
    torch.manual_seed(4)
    cfg = T.CLIPVisionConfig(hidden_size=160, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1,
                             image_size=16, patch_size=8, projection_dim=8)
    src = T.CLIPVisionModelWithProjection(cfg).eval()
    with pytest.warns(UserWarning, match="head dim 160 > 128"):
        fused = dualfuse.fuse(src)
    frames = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in image_normalization(src, "hf_clip"))
    with torch.no_grad():
        want = src((frames.permute(0, 3, 1, 2).float() / 255 - mean) / std).image_embeds
    torch.testing.assert_close(fused(frames).image_embeds, want, atol=ATOL, rtol=1e-3)
    torch.testing.assert_close(fused(frames.permute(0, 3, 1, 2)).image_embeds, want, atol=ATOL, rtol=1e-3)


def test_tower_follows_config_defaults():
    """As transformers does: a call without return_dict / output_hidden_states takes them from the model's config
    (fused.config, a copy of the source's)."""
    T = transformers
    torch.manual_seed(5)
    src = T.CLIPVisionModel(T.CLIPVisionConfig(**_vision_kw())).eval()
    fused = dualfuse.fuse(src)
    px = torch.randn(1, 3, 32, 32)
    for cfg in (src.config, fused.config):
        cfg.return_dict, cfg.output_hidden_states = False, True
    with torch.no_grad():
        want = src(px)
    got = fused(px)
    assert isinstance(want, tuple) and isinstance(got, tuple) and len(got) == len(want) == 3
    torch.testing.assert_close(got[0], want[0], atol=ATOL, rtol=1e-3)
    torch.testing.assert_close(got[1], want[1], atol=ATOL, rtol=1e-3)
    assert len(got[2]) == len(want[2])
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-3)


@pytest.mark.slow
def test_tower_shared_by_threads():
    """One fused tower called from several threads at once: each gets its own input's outputs."""
    import threading

    T = transformers
    torch.manual_seed(6)
    src = T.CLIPVisionModelWithProjection(T.CLIPVisionConfig(**_vision_kw(), projection_dim=16)).eval()
    fused = dualfuse.fuse(src)
    xs = [torch.randn(1, 3, 32, 32) for _ in range(3)]
    outs = [None] * len(xs)

    def call(i):
        outs[i] = fused(xs[i], output_hidden_states=-2)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(xs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for x, got in zip(xs, outs):
        with torch.no_grad():
            want = src(x, output_hidden_states=True)
        torch.testing.assert_close(got.image_embeds, want.image_embeds, atol=ATOL, rtol=1e-3)
        torch.testing.assert_close(got.hidden_states[-2], want.hidden_states[-2], atol=ATOL, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("which", ["text", "siglip-vision-nohead"])
def test_gpu_bench_tower_checkpoint_onnxruntime(tmp_path, which):
    """On CUDA in fp16: ONNX Runtime (CUDA EP, its CUDA-graph session) on a text tower alone and on a SigLIP vision
    tower without its pooling head (tokens out), next to eager and fused."""
    pytest.importorskip("onnxruntime")
    model = _siglip_tower(which)
    out = tmp_path / "bench.json"
    rc = cli.main(["bench", "--model", _save(model, tmp_path / "tower"), "--executors", "eager,onnxruntime,fused",
                   "--device", "cuda", "--dtype", "fp16", "--iters", "3", "--warmup", "1", "--no-progress",
                   "--json", str(out)])
    rows = {r["executor"]: r for r in json.loads(out.read_text())["results"]}
    assert rc == 0, rows
    for name in ("eager", "onnxruntime", "fused"):
        assert rows[name]["status"] == "ok" and rows[name]["cosine_ok"] is True, rows[name]


def test_text_tower_fused_for_pooled_output_takes_padded_masks():
    """tokenizer(texts, padding=True) -> tower(**inputs).text_embeds: refused by a tower that returns token outputs
    (they differ at padded positions), taken by one fused for its pooled output alone; masks that would change the
    pooled output (left padding, the EOS masked) are still refused."""
    T = transformers
    torch.manual_seed(7)
    src = T.CLIPTextModelWithProjection(T.CLIPTextConfig(**_text_kw(), eos_token_id=98, projection_dim=16)).eval()
    ids = torch.randint(1, 97, (3, 10))
    mask = torch.ones_like(ids)
    for i, n in enumerate((10, 6, 4)):
        ids[i, n - 1], ids[i, n:], mask[i, n:] = 98, 0, 0
    with torch.no_grad():
        want = src(input_ids=ids, attention_mask=mask).text_embeds
    with pytest.raises(ValueError, match=r"hidden_states=\(\), pooled=True"):
        dualfuse.fuse(src)(input_ids=ids, attention_mask=mask)
    fused = dualfuse.fuse(src, hidden_states=(), pooled=True)
    got = fused(input_ids=ids, attention_mask=mask)
    assert got.last_hidden_state is None
    torch.testing.assert_close(got.text_embeds, want, atol=ATOL, rtol=1e-3)
    with pytest.raises(ValueError, match="right-padded"):
        fused(input_ids=ids, attention_mask=mask.flip(1))
    eos_masked = mask.clone()
    eos_masked[1, 5] = 0
    with pytest.raises(ValueError, match="masks the pooled token"):
        fused(input_ids=ids, attention_mask=eos_masked)

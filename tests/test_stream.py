"""`dualfuse stream` on CPU: the fused executor (Triton interpreter) labels synthetic uint8 frames end to end; the
summary, PNG and JSON; clear errors for a missing video, no video decoder, no prompts."""
import json

import pytest
import torch

from dualfuse import FusedConfig, cli, stream


@pytest.mark.slow
def test_stream_synthetic_end_to_end(tmp_path, capsys):
    out, js = tmp_path / "out", tmp_path / "run" / "stream.json"
    rc = cli.main(["stream", "--synthetic", "3", "--prompts", "a dog, a cat,a car", "--model", "clip-tiny",
                   "--warmup", "1", "--top-k", "2", "--out", str(out), "--json", str(js)])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "FPS" in printed.out and "p99" in printed.out
    png = out / "stream-latency.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads(js.read_text())
    assert doc["schema"] == "dualfuse.stream/1"
    assert doc["model"] == "clip-tiny" and doc["executor"] == "fused" and doc["source"] == "synthetic:3"
    assert doc["prompts"] == ["a dog", "a cat", "a car"] and doc["plot"] == str(png)
    assert doc["parts"] == ["decode", "h2d", "model", "post"]
    s = doc["summary"]
    assert s["frames"] == 3 and s["fps"] > 0 and s["text_ms"] > 0
    for part in ("decode", "h2d", "model", "post", "total"):
        assert set(s[part]) == {"p50_ms", "p99_ms", "mean_ms"}
        assert 0 <= s[part]["p50_ms"] <= s[part]["p99_ms"]
    assert sum(s["top1_counts"].values()) == 3
    assert [f["index"] for f in doc["frames"]] == [0, 1, 2]
    for f in doc["frames"]:
        assert f["label"] in doc["prompts"] and f["label"] == f["top_k"][0][0]
        assert len(f["top_k"]) == 2 and f["top_k"][0][1] >= f["top_k"][1][1]
        assert 0 < f["score"] <= 1
        assert f["total_ms"] == pytest.approx(f["decode_ms"] + f["h2d_ms"] + f["model_ms"] + f["post_ms"])


@pytest.mark.slow
def test_stream_labels_match_the_reference_model():
    """The loop's top-1 is the reference forward's zero-shot argmax on the same resized frame."""
    from dualfuse import executors, load
    from dualfuse.data import make_tokenizer

    prompts = ["a dog", "a cat", "a red car", "a tree"]
    res = stream.run_stream("clip-tiny", prompts, synthetic=2, warmup=0, frame_size=(40, 48))
    ex = executors.get("eager", load("clip-tiny", seed=0), dtype=torch.float32, device="cpu")
    ids = make_tokenizer(ex.spec)(prompts)
    txt = ex.encode_text(ids)
    for rec, frame in zip(res.frames, stream.synthetic_frames(2, 40, 48)):
        px = stream.resize_center_crop(frame, ex.io.image_size)
        from dualfuse.executors.base import normalize_frames
        from dualfuse.adapters import image_normalization

        mean, std = image_normalization(ex.spec, ex.family, channels=3)
        img = ex.encode_image(normalize_frames(px.permute(0, 3, 1, 2), mean, std))
        p = torch.softmax(ex.logits(img, txt)[0].float(), -1)[0]
        top2 = p.topk(2)
        if top2.values[0] - top2.values[1] > 1e-3:
            assert rec.label == prompts[int(top2.indices[0])]


def test_resize_center_crop():
    f = torch.randint(0, 256, (30, 50, 3), dtype=torch.uint8)
    out = stream.resize_center_crop(f, 16)
    assert out.shape == (1, 16, 16, 3) and out.dtype == torch.uint8
    same = torch.randint(0, 256, (16, 16, 3), dtype=torch.uint8)
    assert torch.equal(stream.resize_center_crop(same, 16)[0], same)
    with pytest.raises(ValueError, match="uint8"):
        stream.resize_center_crop(f.float(), 16)


@pytest.mark.slow
def test_stream_errors(tmp_path, capsys, monkeypatch):
    missing = str(tmp_path / "nope.mp4")
    rc = cli.main(["stream", "--video", missing, "--prompts", "a,b", "--model", "clip-tiny"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == f"dualfuse: error: --video {missing}: no such file"
    video = tmp_path / "v.mp4"
    video.write_bytes(b"\x00" * 64)
    monkeypatch.setattr(stream, "_video_backend", lambda: None)
    rc = cli.main(["stream", "--video", str(video), "--prompts", "a,b", "--model", "clip-tiny"])
    err = capsys.readouterr().err
    assert rc == 2 and "opencv-python" in err and "pip install" in err and "--synthetic" in err
    rc = cli.main(["stream", "--synthetic", "2", "--prompts", " , ", "--model", "clip-tiny"])
    assert rc == 2 and "--prompts: expected at least one prompt" in capsys.readouterr().err
    rc = cli.main(["stream", "--synthetic", "0", "--prompts", "a", "--model", "clip-tiny"])
    assert rc == 2 and "--synthetic: expected a positive number" in capsys.readouterr().err
    with pytest.raises(ValueError, match="exactly one of"):
        stream.run_stream("clip-tiny", "a", video=str(video), synthetic=2)


@pytest.mark.slow
def test_stream_int8_weights_reach_the_fused_executor():
    """--weights int8: the fused executor runs weight-only int8 (dualfuse.quantize) and the result says so; another
    executor refuses it."""
    res = stream.run_stream("clip-tiny", ["a dog", "a cat"], synthetic=1, warmup=0, frame_size=(24, 32),
                            weights="int8", config=FusedConfig(pdl=False))
    assert res.weights == "int8" and res.executor == "fused" and len(res.frames) == 1
    d = res.to_dict()
    assert d["weights"] == "int8" and d["stand_in"] is None
    assert d["fused_config"]["weights"] == "int8" and d["fused_config"]["pdl"] is False  # the config, int8 over it
    with pytest.raises(ValueError, match="only the fused executor"):
        stream.run_stream("clip-tiny", "a", synthetic=1, executor="eager", weights="int8")


def test_stream_config_is_the_fused_executors():
    with pytest.raises(ValueError, match="config: the fused executor's options"):
        stream.run_stream("clip-tiny", "a", synthetic=1, executor="eager", config=FusedConfig(pdl=False))

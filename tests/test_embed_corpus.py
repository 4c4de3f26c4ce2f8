"""dualfuse embed / search (dualfuse.embed): inputs, errors, resumption, engines, index, CLI. The pipeline tests
run the tiny CLIP through the eager executor (the fused kernels have tests of their own); one run goes through
the fused executor (interpreter on CPU) to check it takes the uint8 frames the same way."""
import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

from dualfuse.embed import EmbedConfig, run_embed  # noqa: E402
from dualfuse.embed.store import read_embeddings  # noqa: E402

MODEL = "clip-tiny"


def _image(rng, h, w, fmt):
    from PIL import Image

    im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def corpus(tmp_path, test_seed):
    """A nested folder: JPEGs, a PNG, a WebP, a duplicate, a corrupt JPEG, a text file."""
    rng = np.random.default_rng(test_seed)
    root = tmp_path / "imgs"
    (root / "a" / "b").mkdir(parents=True)
    files = {"x0.jpg": _image(rng, 40, 52, "JPEG"), "x1.jpg": _image(rng, 61, 33, "JPEG"),
             "a/p.png": _image(rng, 30, 45, "PNG"), "a/b/w.webp": _image(rng, 50, 50, "WEBP"),
             "a/b/x2.jpeg": _image(rng, 37, 70, "JPEG")}
    files["a/dup.jpg"] = files["x0.jpg"]
    for name, data in files.items():
        (root / name).write_bytes(data)
    (root / "a" / "broken.jpg").write_bytes(files["x1.jpg"][:40])  # a JPEG cut short
    (root / "readme.txt").write_text("not an image")
    return root, files


def _run(images, out, **kw):
    kw.setdefault("executor", "eager")
    kw.setdefault("batch", 4)
    return run_embed(EmbedConfig(model=MODEL, images=str(images), out=str(out), **kw))


def _by_key(out, column="image_embedding"):
    keys, vecs = read_embeddings(str(out), column)
    return dict(zip(keys, vecs))


def test_folder_run_skips_corrupt_and_writes_parquet(corpus, tmp_path):
    root, files = corpus
    out = tmp_path / "out"
    r = _run(root, out, shard_size=3)
    assert r.images == len(files) and r.failures == 1
    assert r.errors[0].key.endswith("broken.jpg") and "corrupt" in r.errors[0].reason
    assert set(r.stages) == {"read", "decode", "h2d", "model", "write"}
    emb = _by_key(out)
    assert len(emb) == len(files)
    v = np.stack(list(emb.values()))
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(emb[str(root / "x0.jpg")], emb[str(root / "a/dup.jpg")])  # same bytes
    assert not np.allclose(emb[str(root / "x0.jpg")], emb[str(root / "x1.jpg")])
    t = pq.read_table(out / "part-00000.parquet")
    meta = {k.decode(): v.decode() for k, v in t.schema.metadata.items()}
    assert meta["dualfuse.model"] == MODEL and meta["dualfuse.dtype"] == "fp32" and "dualfuse.dualfuse_version" in meta
    assert t.schema.field("image_embedding").type == pa.list_(pa.float32(), v.shape[1])
    errors = (out / "errors.tsv").read_text().splitlines()
    assert len(errors) == 2 and errors[1].split("\t")[0].endswith("broken.jpg")
    assert json.loads((out / "summary.json").read_text())["images"] == len(files)
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_embeddings_match_the_model_on_the_same_pixels(corpus, tmp_path):
    """A row is the model's own image embedding of the decoded, resized, normalized image."""
    from dualfuse import executors, load
    from dualfuse.embed.decode import decode_frame
    from dualfuse.executors.base import normalize_frames

    root, files = corpus
    out = tmp_path / "out"
    _run(root, out)
    emb = _by_key(out)
    ex = executors.get("eager", load(MODEL, seed=0), dtype="fp32", device="cpu")
    size = ex.io.image_size
    frame = torch.from_numpy(decode_frame(files["a/p.png"], size).copy())[None].permute(0, 3, 1, 2)
    from dualfuse.adapters import image_normalization

    mean, std = image_normalization(ex.spec, ex.family)
    want = torch.nn.functional.normalize(ex.encode_image(normalize_frames(frame, mean, std)).float(), dim=-1)[0]
    np.testing.assert_allclose(emb[str(root / "a/p.png")], want.numpy(), atol=1e-5)


@pytest.mark.slow
def test_fused_executor_takes_the_frames(corpus, tmp_path):
    root, _ = corpus
    a, b = tmp_path / "eager", tmp_path / "fused"
    _run(root, a, limit=3)
    _run(root, b, limit=3, executor="fused")
    ea, eb = _by_key(a), _by_key(b)
    assert ea.keys() == eb.keys()
    for k in ea:
        assert float(np.dot(ea[k], eb[k])) > 0.999


def test_parquet_and_tar_inputs_with_captions(corpus, tmp_path):
    root, files = corpus
    names = sorted(files)
    caps = [f"a photo number {i}" for i in range(len(names))]
    table = pa.table({"image": [files[n] for n in names], "caption": caps, "id": names})
    pq.write_table(table, tmp_path / "data.parquet", row_group_size=2)
    out_pq = tmp_path / "out_pq"
    r = _run(tmp_path / "data.parquet", out_pq, text_column="caption", key_column="id", shard_size=4)
    assert r.images == len(names) and r.failures == 0
    tar_path = tmp_path / "shard-000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i, n in enumerate(names):
            key = f"s{i:03d}"
            for ext, data in ((os.path.splitext(n)[1][1:], files[n]), ("txt", caps[i].encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("s999.json")  # a key without an image: reported
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    out_tar = tmp_path / "out_tar"
    r = _run(tmp_path / "shard-{000..000}.tar", out_tar, text_column="txt")
    assert r.images == len(names) and r.failures == 1 and r.errors[0].key == "s999"
    out_dir = tmp_path / "out_dir"
    _run(root, out_dir)
    folder = _by_key(out_dir)
    img_pq, txt_pq, img_tar, txt_tar = _by_key(out_pq), _by_key(out_pq, "text_embedding"), _by_key(out_tar), \
        _by_key(out_tar, "text_embedding")
    for i, n in enumerate(names):
        np.testing.assert_allclose(img_pq[n], folder[str(root / n)], atol=1e-5)
        np.testing.assert_allclose(img_tar[f"s{i:03d}"], folder[str(root / n)], atol=1e-5)
        np.testing.assert_allclose(txt_pq[n], txt_tar[f"s{i:03d}"], atol=1e-5)
    assert not np.allclose(txt_pq[names[0]], txt_pq[names[1]])


def test_resume_redoes_only_unfinished_shards(corpus, tmp_path, monkeypatch):
    from dualfuse.embed.store import Store

    root, files = corpus
    out = tmp_path / "out"
    real = Store.write_shard
    calls = []

    def interrupted(self, *a, **kw):  # Ctrl-C while the second shard is about to be written
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(Store, "write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(root, out, shard_size=2)
    monkeypatch.setattr(Store, "write_shard", real)
    man = json.loads((out / "manifest.json").read_text())
    assert list(man["shards"]) == ["0"]
    assert pq.read_table(out / "part-00000.parquet").num_rows == 2
    r = _run(root, out, shard_size=2)
    assert r.shards_skipped == 1 and r.shards_written == 3 and r.images == len(files) - 2
    full = tmp_path / "full"
    _run(root, full, shard_size=2)
    a, b = _by_key(out), _by_key(full)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6)


def test_refuses_folder_of_another_model_or_input(corpus, tmp_path):
    root, _ = corpus
    out = tmp_path / "out"
    _run(root, out, limit=2)
    with pytest.raises(ValueError, match="another model"):
        run_embed(EmbedConfig(model="siglip-tiny", images=str(root), out=str(out), executor="eager", limit=2))
    with pytest.raises(ValueError, match="another input"):
        _run(root, out, limit=2, shard_size=7)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.parquet").write_bytes(b"x")
    with pytest.raises(ValueError, match="not made by"):
        _run(root, tmp_path / "foreign")


def test_search_finds_an_image_by_itself(corpus, tmp_path):
    pytest.importorskip("faiss")
    from dualfuse.embed.search import search

    root, _ = corpus
    out = tmp_path / "out"
    r = _run(root, out, index="faiss")
    assert r.index and os.path.isfile(r.index)
    res = search(str(out), image=str(root / "a/b/w.webp"), k=3, device="cpu")
    assert res.hits[0].key == str(root / "a/b/w.webp") and res.hits[0].score == pytest.approx(1.0, abs=1e-4)
    res = search(str(out), text="a dog", k=2, device="cpu")
    assert len(res.hits) == 2 and any("tokenizer" in n for n in res.notes)


@pytest.mark.slow
def test_ray_engine_matches_local(corpus, tmp_path):
    ray = pytest.importorskip("ray")
    root, files = corpus
    local, remote = tmp_path / "local", tmp_path / "ray"
    _run(root, local, shard_size=3)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        r = _run(root, remote, shard_size=3, engine="ray")
    finally:
        ray.shutdown()
    assert r.images == len(files) and r.failures == 1 and r.errors[0].key.endswith("broken.jpg")
    a, b = _by_key(local), _by_key(remote)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5)
    ka, _ = read_embeddings(str(local))
    kb, _ = read_embeddings(str(remote))
    assert ka == kb  # the same rows in the same order


def test_config_and_cli_errors(corpus, tmp_path, capsys):
    from dualfuse.cli import main

    root, _ = corpus
    with pytest.raises(ValueError, match="--batch"):
        EmbedConfig(model=MODEL, images=str(root), out=str(tmp_path / "o"), batch=0)
    with pytest.raises(ValueError, match="--engine"):
        EmbedConfig(model=MODEL, images=str(root), out=str(tmp_path / "o"), engine="spark")
    assert main(["embed", "--model", MODEL, "--images", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    pq.write_table(pa.table({"image": [b"x"]}), tmp_path / "d.parquet")
    assert main(["embed", "--model", MODEL, "--images", str(tmp_path / "d.parquet"), "--out", str(tmp_path / "o"),
                 "--text-column", "caption"]) == 2
    assert "no such column" in capsys.readouterr().err
    assert main(["search", "--index", str(tmp_path), "--text", "a dog"]) == 2
    assert "not an output folder" in capsys.readouterr().err


def test_cli_embed_prints_summary(corpus, tmp_path, capsys):
    from dualfuse.cli import main

    root, files = corpus
    out = tmp_path / "out"
    rc = main(["embed", "--model", MODEL, "--images", str(root), "--out", str(out), "--executor", "eager",
               "--batch", "8", "--json", str(tmp_path / "s.json")])
    assert rc == 0
    text = capsys.readouterr().out.replace("\n", "")  # rich wraps at the terminal's width; a long path may fold
    assert f"{len(files)} images, 1 failures" in text and "broken.jpg" in text
    assert json.loads((tmp_path / "s.json").read_text())["failures"] == 1


@pytest.mark.gpu
def test_gpu_local_fused_and_nvjpeg_decode(corpus, tmp_path):
    """On a GPU: the fused model on pinned batches and a second stream gives the eager fp32 embeddings; nvJPEG
    decoding gives nearly the same (its resize is bilinear with antialiasing, PIL's bicubic)."""
    root, files = corpus
    ref, fused, nvjpeg = tmp_path / "ref", tmp_path / "fused", tmp_path / "nvjpeg"
    _run(root, ref, device="cpu")
    _run(root, fused, executor="fused", dtype="fp16", device="cuda")
    r = _run(root, nvjpeg, executor="fused", dtype="fp16", device="cuda", decode="gpu")
    assert r.images == len(files) and r.failures == 1
    a, b, c = _by_key(ref), _by_key(fused), _by_key(nvjpeg)
    for k in a:
        assert float(np.dot(a[k], b[k])) > 0.999
        assert float(np.dot(a[k], c[k])) > 0.95


@pytest.mark.gpu
def test_gpu_ray_one_gpu_matches_local(corpus, tmp_path):
    ray = pytest.importorskip("ray")
    root, _ = corpus
    local, remote = tmp_path / "local", tmp_path / "ray"
    _run(root, local, executor="fused", dtype="fp16", device="cuda")
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        r = _run(root, remote, executor="fused", dtype="fp16", engine="ray", ray_gpus=1)
    finally:
        ray.shutdown()
    assert "1 GPU each" in " ".join(r.notes)
    a, b = _by_key(local), _by_key(remote)
    assert a.keys() == b.keys()
    for k in a:
        assert float(np.dot(a[k], b[k])) > 0.9999

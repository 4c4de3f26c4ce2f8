"""dualfuse embed on awkward inputs: 16-bit and extreme-aspect images, a tar cut short between members, a Parquet
image column that holds no bytes, a captions file that names none of the images, shards without rows or captions
(reading them back and indexing them), options that do nothing with the engine chosen, a folder left by a run
stopped before its first shard. The pipeline runs the tiny CLIP through the eager executor."""
import io
import os
import tarfile

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

from dualfuse.embed import EmbedConfig, run_embed  # noqa: E402
from dualfuse.embed.decode import decode_frame  # noqa: E402
from dualfuse.embed.sources import open_source  # noqa: E402
from dualfuse.embed.store import read_embeddings  # noqa: E402

MODEL = "clip-tiny"


def _encode(im, fmt):
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _jpeg(rng, h=30, w=40):
    from PIL import Image

    return _encode(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), "JPEG")


def _jpeg_folder(root, rng, *names):
    """A folder of small random JPEGs with these names."""
    root.mkdir()
    for n in names:
        (root / n).write_bytes(_jpeg(rng))
    return root


def _run(images, out, **kw):
    kw.setdefault("executor", "eager")
    kw.setdefault("batch", 4)
    return run_embed(EmbedConfig(model=MODEL, images=str(images), out=str(out), **kw))


def test_sixteen_bit_png_keeps_its_levels(test_seed):
    from PIL import Image

    rng = np.random.default_rng(test_seed)
    a = rng.integers(0, 65536, (24, 24), dtype=np.uint16)
    frame = decode_frame(_encode(Image.fromarray(a), "PNG"), 24)  # same size: no resampling
    assert frame.shape == (24, 24, 3)
    np.testing.assert_allclose(frame[..., 0], a / 257.0, atol=0.51)  # PIL alone clips all above 255 to white
    assert (frame[..., 0] == frame[..., 2]).all()


def test_extreme_aspect_image_is_cut_before_resizing(test_seed):
    from PIL import Image

    rng = np.random.default_rng(test_seed)
    color = tuple(int(c) for c in rng.integers(0, 256, 3))
    data = _encode(Image.new("RGB", (60_000, 1), color), "PNG")  # a few hundred bytes; whole at 224 px: 9 GB
    frame = decode_frame(data, 224)
    assert frame.shape == (224, 224, 3) and (frame == np.array(color, np.uint8)).all()
    tall = rng.integers(0, 256, (400, 20, 3), dtype=np.uint8)
    frame = decode_frame(_encode(Image.fromarray(tall), "PNG"), 20)  # cut to its center 80 rows, then cropped
    np.testing.assert_array_equal(frame, tall[190:210])


def test_tar_cut_between_members_keeps_the_whole_ones(tmp_path, test_seed):
    rng = np.random.default_rng(test_seed)
    path = tmp_path / "shard-000.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(3):
            for ext, data in (("jpg", _jpeg(rng)), ("txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(f"k{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    whole = path.read_bytes()
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    path.write_bytes(whole[:members[2].offset + 100])  # cut inside the header of k1.jpg
    src = open_source(str(path), text_column="txt")
    items = list(src.items(src.shards(10)[0]))
    assert [it.key for it in items if it.error is None] == ["k0"] and items[0].caption == "caption 0"
    assert "cut short" in items[-1].error and "k0" in items[-1].key
    path.write_bytes(whole[:members[2].offset_data + 100])  # cut inside the data of k1.jpg: k1 is not whole
    items = list(src.items(src.shards(10)[0]))
    assert [it.key for it in items if it.error is None] == ["k0"] and "inside" in items[-1].error


def test_parquet_image_column_without_bytes_is_refused(tmp_path, test_seed):
    rng = np.random.default_rng(test_seed)
    pq.write_table(pa.table({"image": [_jpeg(rng)], "caption": ["a cat"]}), tmp_path / "d.parquet")
    with pytest.raises(ValueError, match="not encoded image bytes"):
        open_source(str(tmp_path / "d.parquet"), image_column="caption")
    struct = pa.array([{"bytes": _jpeg(rng), "path": "x.jpg"}])  # a Hugging Face datasets Image column
    pq.write_table(pa.table({"img": struct}), tmp_path / "hf.parquet")
    assert open_source(str(tmp_path / "hf.parquet"), image_column="img").shards(5)[0].count == 1


def test_captions_naming_no_image_are_refused(tmp_path, test_seed):
    rng = np.random.default_rng(test_seed)
    (tmp_path / "imgs").mkdir()
    for n in ("a.jpg", "b.jpg"):
        (tmp_path / "imgs" / n).write_bytes(_jpeg(rng))
    (tmp_path / "wrong.tsv").write_text("elsewhere/a.jpg\ta cat\n")
    with pytest.raises(ValueError, match="names none of the 2 images"):
        open_source(str(tmp_path / "imgs"), captions=str(tmp_path / "wrong.tsv"))
    (tmp_path / "some.tsv").write_text("a.jpg\ta cat\n")
    src = open_source(str(tmp_path / "imgs"), captions=str(tmp_path / "some.tsv"))
    assert any("1 of 2 images have no caption" in n for n in src.notes)


def test_rows_without_caption_and_empty_shards_read_back_and_index(tmp_path, test_seed):
    pytest.importorskip("faiss")
    rng = np.random.default_rng(test_seed)
    images = [_jpeg(rng), _jpeg(rng), None, b"not an image"]  # the second shard has no image to embed
    table = pa.table({"image": pa.array(images, pa.binary()), "caption": ["a cat", None, "a dog", "a bird"],
                      "id": ["r0", "r1", "r2", "r3"]})
    pq.write_table(table, tmp_path / "d.parquet")
    out = tmp_path / "out"
    r = _run(tmp_path / "d.parquet", out, text_column="caption", key_column="id", shard_size=2, index="faiss")
    assert r.images == 2 and r.failures == 2 and os.path.isfile(r.index)
    assert pq.read_table(out / "part-00001.parquet").num_rows == 0
    keys, vecs = read_embeddings(str(out))
    assert keys == ["r0", "r1"] and vecs.shape == (2, vecs.shape[1])
    keys, vecs = read_embeddings(str(out), "text_embedding")
    assert keys == ["r0"] and vecs.shape[0] == 1  # r1 has no caption
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


def test_options_the_engine_would_ignore_are_refused(tmp_path):
    base = dict(model=MODEL, images=str(tmp_path), out=str(tmp_path / "o"))
    with pytest.raises(ValueError, match="--ray-gpus needs --engine ray"):
        EmbedConfig(**base, ray_gpus=1)
    with pytest.raises(ValueError, match="--decode gpu is for the local engine"):
        EmbedConfig(**base, engine="ray", decode="gpu")
    with pytest.raises(ValueError, match="--device is for the local engine"):
        EmbedConfig(**base, engine="ray", device="cpu")
    with pytest.raises(ValueError, match="--ray-cpus"):
        EmbedConfig(**base, engine="ray", ray_cpus=2, ray_address="auto")


def test_folder_of_a_run_stopped_before_its_first_shard_is_reused(tmp_path, test_seed, monkeypatch):
    from dualfuse.embed.store import Store

    rng = np.random.default_rng(test_seed)
    (tmp_path / "imgs").mkdir()
    for n in ("a.jpg", "b.jpg"):
        (tmp_path / "imgs" / n).write_bytes(_jpeg(rng))
    (tmp_path / "imgs" / "0bad.jpg").write_bytes(b"\xff\xd8\xff broken")  # sorted first: in the first shard
    out = tmp_path / "out"
    real = Store.write_shard

    def stop_at_second(self, index, *a, **kw):
        if index == 1:
            raise KeyboardInterrupt
        return real(self, index, *a, **kw)

    monkeypatch.setattr(Store, "write_shard", stop_at_second)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "imgs", out, shard_size=2)
    assert "0bad.jpg" in (out / "errors.tsv").read_text()  # the finished shard's skipped item, listed at once
    monkeypatch.setattr(Store, "write_shard", real)
    with pytest.raises(ValueError, match="another input"):  # a shard is finished: the folder is the run's
        _run(tmp_path / "imgs", out, shard_size=1)
    empty = tmp_path / "empty"
    monkeypatch.setattr(Store, "write_shard", lambda *a, **kw: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "imgs", empty, shard_size=2)
    monkeypatch.setattr(Store, "write_shard", real)
    r = _run(tmp_path / "imgs", empty, shard_size=1)  # nothing finished there: other settings may take it
    assert r.images == 2 and r.shards_written == 3


def test_resume_redoes_finished_shards_whose_input_changed(tmp_path, test_seed):
    rng = np.random.default_rng(test_seed)
    root = _jpeg_folder(tmp_path / "imgs", rng, "b.jpg", "c.jpg", "d.jpg", "e.jpg", "f.jpg")
    out = tmp_path / "out"
    r = _run(root, out, shard_size=3, limit=4)  # 2 shards, the second cut to 1 image
    assert r.images == 4
    r = _run(root, out, shard_size=3)  # the cut shard is redone whole
    assert r.shards_skipped == 1 and r.images == 2 and any("input changed" in n for n in r.notes)
    (root / "a.jpg").write_bytes(_jpeg(rng))  # sorts first: every shard's files shift, still 2 shards of 3
    r = _run(root, out, shard_size=3)
    assert r.shards_skipped == 0 and r.images == 6
    keys, _ = read_embeddings(str(out))
    assert [os.path.basename(k) for k in keys] == ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "f.jpg"]
    r = _run(root, out, shard_size=3)
    assert r.shards_skipped == 2 and r.images == 0


def test_resume_keeps_shards_of_older_manifests_and_other_spellings_of_the_folder(tmp_path, test_seed, monkeypatch):
    """A shard recorded without a fingerprint (an older dualfuse) is kept, and "imgs" / "./imgs" are one input;
    a run whose shard count differs is refused, naming it."""
    import json

    rng = np.random.default_rng(test_seed)
    root = _jpeg_folder(tmp_path / "imgs", rng, "a.jpg", "b.jpg", "c.jpg")
    out = tmp_path / "out"
    assert _run(root, out, shard_size=2).images == 3
    monkeypatch.chdir(tmp_path)
    r = _run("./imgs", out, shard_size=2)
    assert r.shards_skipped == 2 and r.images == 0
    manifest = out / "manifest.json"
    doc = json.loads(manifest.read_text())
    for rec in doc["shards"].values():
        del rec["fingerprint"]
    manifest.write_text(json.dumps(doc))
    r = _run(root, out, shard_size=2)
    assert r.shards_skipped == 2 and r.images == 0 and not any("input changed" in n for n in r.notes)
    with pytest.raises(ValueError, match="num_shards"):
        _run(root, out, shard_size=2, limit=2)


def test_a_refused_folder_is_not_left_locked(tmp_path, test_seed):
    """The folder's lock goes with a refusal raised while opening it: the traceback kept alive (a notebook) does not
    keep the next run out."""
    rng = np.random.default_rng(test_seed)
    root = _jpeg_folder(tmp_path / "imgs", rng, "a.jpg", "b.jpg")
    out = tmp_path / "out"
    _run(root, out, shard_size=1)
    try:
        _run(root, out, shard_size=2)
    except ValueError as e:
        kept = e  # noqa: F841 - holds the traceback and its frames, as an interactive session does
        assert "shard_size" in str(e)
    else:
        raise AssertionError("a run with another shard size was not refused")
    assert _run(root, out, shard_size=1).shards_skipped == 2  # not refused as "another run is writing"


def test_folder_loop_through_a_link_is_read_once(tmp_path, test_seed):
    rng = np.random.default_rng(test_seed)
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    (tmp_path / "imgs" / "sub" / "a.jpg").write_bytes(_jpeg(rng))
    os.symlink("..", tmp_path / "imgs" / "sub" / "up")
    src = open_source(str(tmp_path / "imgs"))
    assert [os.path.basename(p) for p, _ in src.files] == ["a.jpg"]
    assert any("read once" in n for n in src.notes)


def test_index_of_an_earlier_run_is_removed_once_shards_change(tmp_path, test_seed):
    pytest.importorskip("faiss")
    rng = np.random.default_rng(test_seed)
    root = _jpeg_folder(tmp_path / "imgs", rng, "b.jpg", "c.jpg")
    out = tmp_path / "out"
    assert os.path.isfile(_run(root, out, shard_size=3, index="faiss").index)
    (root / "a.jpg").write_bytes(_jpeg(rng))
    r = _run(root, out, shard_size=3)
    assert not os.path.exists(out / "index.faiss") and any("FAISS index" in n for n in r.notes)


def test_cli_prints_a_bracketed_file_name_as_it_is(tmp_path, test_seed, capsys):
    from dualfuse.cli import main

    rng = np.random.default_rng(test_seed)
    (tmp_path / "imgs" / "odd[").mkdir(parents=True)
    (tmp_path / "imgs" / "a.jpg").write_bytes(_jpeg(rng))
    (tmp_path / "imgs" / "odd[" / "b].jpg").write_bytes(b"not an image")  # path .../odd[/b].jpg: rich markup
    rc = main(["embed", "--model", MODEL, "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "out"),
               "--executor", "eager", "--batch", "2"])
    assert rc == 0
    assert "odd[/b].jpg" in capsys.readouterr().out.replace("\n", "")


def test_exif_orientation_is_applied(test_seed):
    from PIL import Image

    from dualfuse.embed.decode import turned_jpeg

    rng = np.random.default_rng(test_seed)
    a = rng.integers(0, 256, (16, 32, 3), dtype=np.uint8)
    a[:, :16] = 0  # left half dark, right half bright: a quarter turn is plain to see
    a[:, 16:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: turn 90 degrees clockwise to view
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    data = buf.getvalue()
    assert turned_jpeg(data) and not turned_jpeg(_jpeg(rng))
    frame = decode_frame(data, 16)  # upright: 32 x 16, center crop 16 x 16 from the middle rows
    assert frame.shape == (16, 16, 3)
    assert frame[:6].mean() < 40 and frame[-6:].mean() > 215  # dark on top, bright below after the turn


def test_limit_cuts_parquet_rows_and_is_refused_for_tar(tmp_path, test_seed):
    rng = np.random.default_rng(test_seed)
    pq.write_table(pa.table({"image": [_jpeg(rng) for _ in range(5)]}), tmp_path / "d.parquet")
    r = _run(tmp_path / "d.parquet", tmp_path / "out", shard_size=4, limit=3)
    assert r.images == 3
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        data = _jpeg(rng)
        info = tarfile.TarInfo("k0.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match="--limit"):
        _run(tmp_path / "s.tar", tmp_path / "out_tar", limit=1)


def test_a_folder_being_written_is_refused_to_a_second_run(tmp_path):
    pytest.importorskip("fcntl")
    from dualfuse.embed.store import Store

    ident = dict(model=MODEL, dtype="fp32", embed_dim=4, key_name="path", source={}, shard_size=2, num_shards=1,
                 captions=False)
    first = Store(str(tmp_path / "out"), ident, dict(model=MODEL))
    with pytest.raises(ValueError, match="another dualfuse embed is writing"):
        Store(str(tmp_path / "out"), ident, dict(model=MODEL))
    first.close()  # the first run ends
    Store(str(tmp_path / "out"), ident, dict(model=MODEL))


def test_list_file_with_byte_order_mark_and_crlf(tmp_path, test_seed):
    rng = np.random.default_rng(test_seed)
    for n in ("a.jpg", "b.jpg"):
        (tmp_path / n).write_bytes(_jpeg(rng))
    (tmp_path / "list.txt").write_bytes("\ufeffa.jpg\r\nb.jpg\r\nmissing.jpg\r\n".encode("utf-8"))
    src = open_source(str(tmp_path / "list.txt"))
    assert [(os.path.basename(p), e) for p, e in src.files] == [("a.jpg", None), ("b.jpg", None),
                                                                 ("missing.jpg", "no such file")]


def test_tar_caption_extension_is_checked(tmp_path, test_seed):
    rng = np.random.default_rng(test_seed)
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for ext, data in (("jpg", _jpeg(rng)), ("txt", b"a cat")):
            info = tarfile.TarInfo(f"k0.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match="no .caption member"):
        open_source(str(tmp_path / "s.tar"), text_column="caption")
    src = open_source(str(tmp_path / "s.tar"), text_column=".txt")  # the dot is forgiven
    assert next(src.items(src.shards(1)[0])).caption == "a cat"


def test_gpu_decoder_cuts_elongated_frames_before_resizing(test_seed):
    """The nvJPEG path's resize, run on CPU tensors (decode_jpeg stood in for: it needs CUDA)."""
    import torch

    from dualfuse.embed.decode import GpuJpegDecoder

    rng = np.random.default_rng(test_seed)
    strip = torch.from_numpy(rng.integers(0, 256, (3, 2, 5000), dtype=np.uint8))  # [C, H, W], as nvJPEG gives

    class FakeIO:
        class ImageReadMode:
            RGB = "rgb"

        @staticmethod
        def decode_jpeg(tensors, device=None, mode=None):
            return [strip for _ in tensors]

    dec = object.__new__(GpuJpegDecoder)
    dec.tvio, dec.size, dec.device = FakeIO, 2, torch.device("cpu")
    (frame,) = dec([b"\xff\xd8\xff"])
    assert frame.shape == (2, 2, 3)
    np.testing.assert_array_equal(frame.numpy(), strip[:, :, 2499:2501].permute(1, 2, 0).numpy())


def test_missing_faiss_is_reported_before_the_run(tmp_path, test_seed, monkeypatch):
    import sys

    rng = np.random.default_rng(test_seed)
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(_jpeg(rng))
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss raises ImportError
    with pytest.raises(ValueError, match="needs FAISS"):
        _run(tmp_path / "imgs", tmp_path / "out", index="faiss")
    assert not (tmp_path / "out").exists()


@pytest.mark.gpu
def test_gpu_nvjpeg_path_turns_exif_and_cuts_elongated_jpegs(tmp_path, test_seed):
    """On a GPU with --decode gpu: a JPEG with an EXIF orientation goes to the CPU (nvJPEG ignores the tag) and an
    elongated JPEG is cut on the device; both embed nearly as the CPU decode does."""
    from PIL import Image

    rng = np.random.default_rng(test_seed)
    root = tmp_path / "imgs"
    root.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    a = rng.integers(0, 256, (48, 96, 3), dtype=np.uint8)
    Image.fromarray(a).save(root / "turned.jpg", quality=95, exif=exif.tobytes())
    Image.fromarray(rng.integers(0, 256, (40, 4000, 3), dtype=np.uint8)).save(root / "strip.jpg", quality=95)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "plain.jpg", quality=95)
    cpu = _run(root, tmp_path / "cpu", executor="fused", dtype="fp16", device="cuda")
    gpu = _run(root, tmp_path / "gpu", executor="fused", dtype="fp16", device="cuda", decode="gpu")
    assert cpu.images == gpu.images == 3
    ka, va = read_embeddings(str(tmp_path / "cpu"))
    kb, vb = read_embeddings(str(tmp_path / "gpu"))
    assert ka == kb
    assert (np.sum(va * vb, axis=1) > 0.95).all()

"""Evaluation data: preprocessing, tokenizers, folder / captions loading with bad files, demo, synthetic."""
import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dualfuse import data as D
from dualfuse import presets, to_spec

NO_OPEN_CLIP = "open_clip is not installed here (pip install 'dualfuse[openclip]')"
NO_SKIMAGE = "scikit-image is not installed here (pip install 'dualfuse[eval]')"


@pytest.fixture(scope="module")
def specs():
    out = {}
    for name in ("clip-tiny", "siglip-tiny", "open_clip-tiny"):
        if name.startswith("open_clip") and importlib.util.find_spec("open_clip") is None:
            continue  # the tests that use it skip
        m = presets.load(name)
        out[name] = (m, to_spec(m))
    return out


def _png(path, color=(120, 30, 200), size=(40, 30)):
    Image.new("RGB", size, color).save(path)


def test_preprocess_resize_crop_normalize():
    mean = tuple(int(round(m * 255)) for m in D.CLIP_MEAN)
    pre = D.Preprocess(32, D.CLIP_MEAN, D.CLIP_STD)
    x = pre(Image.new("RGB", (64, 48), mean))
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert x.abs().max() < 0.02  # the mean colour normalizes to ~0
    # grayscale / bool / float arrays are accepted
    assert pre(np.zeros((50, 70), dtype=np.uint8)).shape == (3, 32, 32)
    assert pre(np.ones((50, 70), dtype=bool)).shape == (3, 32, 32)
    assert pre(np.random.rand(40, 40, 3)).shape == (3, 32, 32)


def test_preprocess_family_defaults(specs):
    assert D.preprocess_for(specs["siglip-tiny"][1]).mean == D.SIGLIP_MEAN
    p = D.preprocess_for(specs["clip-tiny"][1])
    assert p.mean == D.CLIP_MEAN and p.std == D.CLIP_STD and p.image_size == 32


def test_preprocess_reads_checkpoint_config(tmp_path, specs):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1, 0.2, 0.3],
                                                                    "image_std": [1, 1, 1]}))
    p = D.preprocess_for(specs["clip-tiny"][1], path=str(tmp_path))
    assert p.mean == (0.1, 0.2, 0.3) and "preprocessor_config" in p.source


def test_synthetic_tokenizer_layouts(specs):
    m, s = specs["clip-tiny"]  # first-EOS pooling: BOS=0, EOS=99, pad=1
    tok = D.make_tokenizer(s, m)
    assert tok.kind == "synthetic" and "synthetic" in tok.describe()
    ids = tok(["a photo of a dog.", "a photo of a dog.", "cat"])
    assert ids.shape == (3, 16) and ids.dtype == torch.long
    assert torch.equal(ids[0], ids[1])  # deterministic
    assert ids[0, 0] == 0 and ids[0, 6] == 99 and (ids[0, 7:] == 1).all()
    assert not set(ids[0, 1:6].tolist()) & {0, 1, 99}
    assert (ids == 99).int().argmax(-1).tolist() == [6, 6, 2]

    m, s = specs["siglip-tiny"]  # no BOS, EOS then pad to the context length
    tok = D.make_tokenizer(s, m)
    ids = tok(["one two", "x " * 40])
    assert ids.shape == (2, 12)
    assert ids[0, 2] == tok.eos and (ids[0, 3:] == tok.pad).all()
    assert ids[1, -1] == tok.eos  # truncated, EOS kept


def test_synthetic_tokenizer_open_clip_layout(specs):
    pytest.importorskip("open_clip", reason=NO_OPEN_CLIP)
    m, s = specs["open_clip-tiny"]  # argmax pooling: BOS=98, EOS=99=max id, pad=0
    ids = D.make_tokenizer(s, m)(["a b c"])
    assert ids[0, 0] == 98 and ids[0].argmax() == 4 and ids[0, 4] == 99 and (ids[0, 5:] == 0).all()


def _make_folder(root):
    (root / "tabby_cat").mkdir()
    (root / "dog").mkdir()
    (root / "empty").mkdir()
    _png(root / "tabby_cat" / "a.png")
    _png(root / "tabby_cat" / "b.jpg", (10, 200, 10))
    (root / "tabby_cat" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "tabby_cat" / "notes.txt").write_text("hello")
    _png(root / "dog" / "c.png", (200, 10, 10))
    (root / "empty" / "broken.png").write_bytes(b"")


def test_folder_loading_skips_bad_files(tmp_path):
    _make_folder(tmp_path)
    pre = D.Preprocess(32, D.CLIP_MEAN, D.CLIP_STD)
    ds = D.load_dir(str(tmp_path), pre)
    assert ds.kind == "folder"
    assert ds.num_images == 3 and ds.pixel_values.shape == (3, 3, 32, 32)
    assert ds.class_names == ["dog", "tabby cat"]
    assert ds.labels.tolist() == [0, 1, 1]
    assert ds.prompts[1] == "a photo of a tabby cat."
    text = "\n".join(ds.problems)
    assert "corrupt.jpg" in text and "cannot read image" in text
    assert "not images" in text  # notes.txt
    assert "empty/: no readable images" in text


def test_folder_images_are_turned_by_their_exif_orientation(tmp_path):
    """A phone's portrait photo is stored sideways with an EXIF tag: eval reads it upright, as the processor's
    own loader does."""
    a = np.zeros((32, 64, 3), dtype=np.uint8)
    a[:, 32:] = 255  # left half dark, right half bright as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # view: turned 90 degrees clockwise, so dark on top, bright below
    (tmp_path / "cat").mkdir()
    Image.fromarray(a).save(tmp_path / "cat" / "turned.jpg", quality=95, exif=exif.tobytes())
    Image.fromarray(a).save(tmp_path / "cat" / "plain.jpg", quality=95)
    pre = D.Preprocess(32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    ds = D.load_dir(str(tmp_path), pre)
    turned, plain = (ds.pixel_values[i] for i in sorted(range(2), key=lambda i: "plain" in ds.image_names[i]))
    assert turned[:, :10].mean() < 0.15 and turned[:, -10:].mean() > 0.85  # rows: dark on top, bright below
    assert plain[:, :, :10].mean() < 0.15 and plain[:, :, -10:].mean() > 0.85  # columns, as stored


def test_folder_without_images_is_a_clear_error(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"garbage")
    with pytest.raises(D.DataError, match="no readable images"):
        D.load_folder(str(tmp_path), D.Preprocess(32, D.CLIP_MEAN, D.CLIP_STD))
    with pytest.raises(D.DataError, match="no class subfolders"):
        D.load_folder(str(tmp_path / "a"), D.Preprocess(32, D.CLIP_MEAN, D.CLIP_STD))


def test_captions_tsv_with_bad_entries(tmp_path):
    _png(tmp_path / "one.png")
    _png(tmp_path / "two.png", (0, 0, 255))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (tmp_path / "captions.tsv").write_text(
        "# image<TAB>caption\n"
        "one.png\ta red square\n"
        "one.png\tanother caption of one\n"
        "two.png\ta blue square\n"
        "missing.png\tthis file does not exist\n"
        "two.png\t   \n"
        "no tab on this line\n"
        "bad.png\ta corrupt image\n")
    ds = D.load_dir(str(tmp_path), D.Preprocess(32, D.CLIP_MEAN, D.CLIP_STD))
    assert ds.kind == "captions"
    assert ds.image_names == ["one.png", "two.png"]
    assert ds.captions == ["a red square", "another caption of one", "a blue square"]
    assert ds.caption_image == [0, 0, 1]
    text = "\n".join(ds.problems)
    assert "missing image file" in text and "missing.png" in text
    assert "empty caption" in text and "captions.tsv:6" in text
    assert "expected 'image<TAB>caption'" in text
    assert "bad.png" in text and "cannot read image" in text


def test_captions_json_forms(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    (tmp_path / "captions.json").write_text(json.dumps({"a.png": ["first", ""], "b.png": "second"}))
    ds = D.load_captions(str(tmp_path), D.Preprocess(32, D.CLIP_MEAN, D.CLIP_STD))
    assert ds.captions == ["first", "second"] and len(ds.problems) == 1
    lst = tmp_path / "list.json"
    lst.write_text(json.dumps([{"image": "a.png", "caption": "x"}, {"caption": "no image"}]))
    ds = D.load_captions(str(lst), D.Preprocess(32, D.CLIP_MEAN, D.CLIP_STD))
    assert ds.captions == ["x"] and "expected an object" in ds.problems[0]


def test_captions_nothing_usable(tmp_path):
    (tmp_path / "captions.txt").write_text("gone.png\tcaption\n")
    with pytest.raises(D.DataError, match="no usable"):
        D.load_dir(str(tmp_path), D.Preprocess(32, D.CLIP_MEAN, D.CLIP_STD))


def test_demo():
    pytest.importorskip("skimage", reason=NO_SKIMAGE)
    pre = D.Preprocess(32, D.SIGLIP_MEAN, D.SIGLIP_STD)
    ds = D.demo(pre)
    assert ds.num_images >= 10 and len(ds.captions) == ds.num_images == len(ds.class_names)
    assert ds.caption_image == list(range(ds.num_images))


def test_synthetic():
    pre = D.Preprocess(32, D.SIGLIP_MEAN, D.SIGLIP_STD)
    syn = D.synthetic(pre, num_images=5, num_classes=4, seed=3)
    assert syn.pixel_values.shape == (5, 3, 32, 32) and syn.labels is None and syn.caption_image is None
    assert len(syn.prompts) == 4 and len(syn.captions) == 5
    assert torch.equal(syn.pixel_values, D.synthetic(pre, num_images=5, num_classes=4, seed=3).pixel_values)


def test_synthetic_tokenizer_ignores_config_ids_outside_the_vocabulary():
    """HF SiglipTextConfig defaults to CLIP's BOS/EOS 49406/49407 even with a small vocabulary."""
    m = presets.load("siglip-tiny")
    m.config.text_config.eos_token_id = 49407
    m.config.text_config.pad_token_id = 49407
    tok = D.make_tokenizer(to_spec(m), m)
    ids = tok(["a b"])
    assert int(ids.max()) < 100 and tok.eos == 1 and tok.pad == 1

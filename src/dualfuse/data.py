"""Evaluation data: images and texts for `dualfuse eval`, preprocessed the way the model family expects.

Sources (all local; nothing is downloaded):

- ``synthetic(...)``: random normalized pixels, a fixed list of class prompts and random word captions. No ground
  truth: only agreement metrics (executor vs reference) make sense on it.
- ``load_folder(DIR)``: ``DIR/<class name>/<image>`` — zero-shot classification with labels from the folder names.
- ``load_captions(DIR or FILE)``: images plus a captions file (``captions.tsv``/``.txt``: ``image<TAB>caption`` per
  line, several lines per image allowed; ``captions.json``: ``{"img.jpg": ["a cap", ...]}`` or
  ``[{"image": ..., "caption": ...}, ...]``; ``captions.jsonl``: one such object per line) — retrieval with
  ground-truth pairs.
- ``demo()``: the photographs that scikit-image ships (astronaut, cat, coffee, rocket, ...), each with a class
  name and a caption — zero-shot and retrieval with ground truth, no files needed.

Bad entries (missing file, unreadable or corrupt image, empty caption, malformed line) never stop loading: each
becomes a line in ``Dataset.problems`` and is skipped; only when nothing usable is left is a ``DataError`` raised.

Preprocessing (:class:`Preprocess`): resize the shorter side to the model's image size (bicubic), center-crop,
scale to [0, 1], normalize with the family's mean/std (CLIP: OpenAI's; SigLIP: 0.5/0.5; an HF checkpoint
directory's ``preprocessor_config.json`` wins when present).

Tokenization (:func:`make_tokenizer`): a real checkpoint directory's tokenizer via ``transformers.AutoTokenizer``
(``local_files_only``) when its files are there; open_clip's bundled BPE tokenizer for open_clip models with the
CLIP vocabulary; otherwise a deterministic synthetic tokenizer that hashes words into the vocabulary and lays out
BOS/EOS/padding the way the family does (EOS = the family's eos id, or the largest id for argmax pooling).
``Tokenizer.kind``/``describe()`` say which one is in use.
"""
from __future__ import annotations

import json
import os
import re
import zlib
from dataclasses import dataclass, field

import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
CAPTION_FILES = ("captions.tsv", "captions.txt", "captions.json", "captions.jsonl")
DEFAULT_TEMPLATE = "a photo of a {}."


class DataError(ValueError):
    """Evaluation data could not be used at all (nothing left after skipping bad entries, unknown layout)."""


# --------------------------------------------------------------------------------------------- preprocessing

@dataclass
class Preprocess:
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str = "family default"

    def __call__(self, image) -> torch.Tensor:
        """A PIL image or HxW / HxWxC numpy array -> normalized [3, S, S] float32 tensor."""
        import numpy as np
        from PIL import Image

        if not isinstance(image, Image.Image):
            arr = np.asarray(image)
            if arr.dtype == bool:
                arr = arr.astype(np.uint8) * 255
            elif arr.dtype != np.uint8:
                a = arr.astype(np.float64)
                a = (a - a.min()) / max(a.max() - a.min(), 1e-12)
                arr = (a * 255).round().astype(np.uint8)
            image = Image.fromarray(arr)
        image = resize_center_crop_pil(image.convert("RGB"), self.image_size)
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std


def resize_center_crop_pil(image, size: int):
    """A PIL image with its shorter side resized to ``size`` (bicubic) and the longer one center-cropped."""
    from PIL import Image

    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return image.crop((left, top, left + size, top + size)) if (nw, nh) != (size, size) else image


def preprocess_for(spec, model=None, path: str | None = None) -> Preprocess:
    """The model's preprocessing: image size from the spec, mean/std from a checkpoint's preprocessor_config.json,
    an open_clip model's ``visual.image_mean/std``, or the family default."""
    size = spec.vision.embed.image_size if spec.vision is not None else 224  # a text tower alone: unused
    if path and os.path.isdir(path):
        cfg = os.path.join(path, "preprocessor_config.json")
        if os.path.isfile(cfg):
            try:
                with open(cfg) as f:
                    c = json.load(f)
                if "image_mean" in c and "image_std" in c:
                    return Preprocess(size, tuple(c["image_mean"]), tuple(c["image_std"]),
                                      f"{os.path.basename(cfg)} of {path}")
            except (OSError, ValueError):
                pass
    if spec.family == "open_clip" and model is not None:
        vis = getattr(model, "visual", None)
        mean, std = getattr(vis, "image_mean", None), getattr(vis, "image_std", None)
        if mean is not None and std is not None:
            return Preprocess(size, tuple(mean), tuple(std), "open_clip model's image_mean/std")
    if spec.family == "hf_siglip":
        return Preprocess(size, SIGLIP_MEAN, SIGLIP_STD, "SigLIP default (0.5/0.5)")
    return Preprocess(size, CLIP_MEAN, CLIP_STD, "CLIP default (OpenAI mean/std)")


# --------------------------------------------------------------------------------------------- tokenization

_WORD = re.compile(r"[a-z0-9]+")


class Tokenizer:
    """texts -> LongTensor [N, context_length]. ``kind``: 'synthetic' | 'transformers' | 'open_clip'."""

    kind = "?"
    name = ""
    context_length = 0

    def __call__(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.kind} tokenizer {self.name}".strip()


class SyntheticTokenizer(Tokenizer):
    """Deterministic stand-in for a real tokenizer: each lowercase word hashes (crc32) to one id in the ordinary
    part of the vocabulary; the special tokens follow the family's layout:

    - CLIP with first-EOS pooling: ``BOS w1 .. wn EOS`` then ``pad`` (ids from the HF config);
    - CLIP/open_clip with argmax pooling: ``BOS=vocab-2 w1 .. wn EOS=vocab-1`` then 0 (as OpenAI's BPE does);
    - SigLIP (last-token pooling): ``w1 .. wn EOS`` then ``pad`` up to the context length.

    Word ids never collide with a special id, so pooling finds the right token. Not a real vocabulary: embeddings
    of these ids mean nothing for real checkpoints (say so), but they exercise the towers exactly like real text.
    """

    kind = "synthetic"

    def __init__(self, spec, model=None):
        t = spec.text
        self.context_length = t.context_length
        self.vocab = t.embed.vocab_size
        self.pooling = t.pooling
        self.family = spec.family
        cfg = getattr(getattr(model, "config", None), "text_config", None)

        def cfg_id(name):  # a config id, if it is a real id of this vocabulary (HF SiglipTextConfig defaults to
            v = getattr(cfg, name, None)  # CLIP's 49406/49407 even with a 32000-token vocabulary)
            return int(v) if isinstance(v, int) and 0 <= v < self.vocab else None

        bos, pad = cfg_id("bos_token_id"), cfg_id("pad_token_id")
        if t.pooling == "argmax":
            self.bos, self.eos, self.pad = self.vocab - 2, self.vocab - 1, 0
        elif t.pooling == "first_eos":
            self.eos = int(t.eos_token_id)
            self.bos = bos if bos is not None and bos != self.eos else None
            self.pad = pad if pad is not None else self.eos
        else:  # SigLIP: no BOS, EOS then padding; last-token pooling (real SigLIP: </s> = 1 is both)
            eos = cfg_id("eos_token_id")
            self.bos = None
            self.eos = eos if eos is not None else min(1, self.vocab - 1)
            self.pad = pad if pad is not None else self.eos
        special = {x for x in (self.bos, self.eos, self.pad) if x is not None}
        self._ordinary = [i for i in range(self.vocab) if i not in special] if self.vocab < 4096 else None
        self._special = special
        self.name = (f"(hashing words into {self.vocab} ids; BOS={self.bos}, EOS={self.eos}, pad={self.pad}, "
                     f"{self.pooling} pooling)")

    def _word_id(self, word: str) -> int:
        h = zlib.crc32(word.encode("utf-8"))
        if self._ordinary is not None:
            return self._ordinary[h % len(self._ordinary)]
        i = h % self.vocab
        while i in self._special:
            i = (i + 1) % self.vocab
        return i

    def __call__(self, texts: list[str]) -> torch.Tensor:
        ctx = self.context_length
        rows = []
        for text in texts:
            words = [self._word_id(w) for w in _WORD.findall(str(text).lower())]
            head = [self.bos] if self.bos is not None else []
            room = ctx - len(head) - 1
            ids = head + words[:max(room, 0)] + [self.eos]
            ids = ids[:ctx]
            rows.append(ids + [self.pad] * (ctx - len(ids)))
        return torch.tensor(rows, dtype=torch.long).view(len(texts), ctx)


class HFTokenizer(Tokenizer):
    kind = "transformers"

    def __init__(self, tok, context_length: int, pad_max: bool, name: str):
        self.tok, self.context_length, self.pad_max, self.name = tok, context_length, pad_max, name

    def __call__(self, texts):
        enc = self.tok(list(texts), padding="max_length", max_length=self.context_length, truncation=True,
                       return_tensors="pt")
        return enc["input_ids"].long()


class OpenClipTokenizer(Tokenizer):
    kind = "open_clip"

    def __init__(self, tok, context_length: int, name: str):
        self.tok, self.context_length, self.name = tok, context_length, name

    def __call__(self, texts):
        return self.tok(list(texts), context_length=self.context_length).long()


def make_tokenizer(spec, model=None, path: str | None = None, arch: str | None = None,
                   prefer_synthetic: bool = False) -> Tokenizer:
    """The best tokenizer available locally (see the module docstring); never downloads."""
    if not prefer_synthetic and path and os.path.isdir(path):
        names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model", "tokenizer.model")
        if any(os.path.isfile(os.path.join(path, n)) for n in names):
            try:
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
                return HFTokenizer(tok, spec.text.context_length, True, f"{type(tok).__name__} from {path}")
            except Exception:  # noqa: BLE001 - fall through to the synthetic tokenizer
                pass
    if not prefer_synthetic and spec.family == "open_clip" and arch:
        try:
            import open_clip

            tok = open_clip.get_tokenizer(arch)
            vocab = getattr(tok, "vocab_size", None)
            if vocab is None or vocab == spec.text.embed.vocab_size:
                return OpenClipTokenizer(tok, spec.text.context_length, f"open_clip.get_tokenizer({arch!r})")
        except Exception:  # noqa: BLE001
            pass
    return SyntheticTokenizer(spec, model)


# --------------------------------------------------------------------------------------------- datasets

@dataclass
class Dataset:
    """Preprocessed evaluation data.

    ``pixel_values`` [N, 3, S, S]; zero-shot: ``class_names`` + ``labels`` [N] (None: no ground truth);
    retrieval: ``captions`` + ``caption_image`` (index of the image each caption describes; None: no ground truth).
    """

    kind: str
    pixel_values: torch.Tensor
    image_names: list[str]
    class_names: list[str]
    labels: torch.Tensor | None = None
    captions: list[str] | None = None
    caption_image: list[int] | None = None
    problems: list[str] = field(default_factory=list)
    description: str = ""
    template: str = DEFAULT_TEMPLATE

    @property
    def num_images(self) -> int:
        return self.pixel_values.shape[0]

    @property
    def prompts(self) -> list[str]:
        return [self.template.format(c) for c in self.class_names]

    def summary(self) -> dict:
        return dict(kind=self.kind, description=self.description, images=self.num_images,
                    classes=len(self.class_names), labels=self.labels is not None,
                    captions=len(self.captions) if self.captions else 0,
                    caption_pairs=self.caption_image is not None, problems=list(self.problems),
                    template=self.template)


SYNTHETIC_CLASSES = ["dog", "cat", "car", "airplane", "bird", "ship", "horse", "truck", "frog", "deer",
                     "apple", "chair", "guitar", "mountain", "bicycle", "clock"]
_SYNTH_WORDS = ["red", "small", "old", "bright", "wooden", "running", "sleeping", "near", "under", "beach",
                "city", "forest", "street", "table", "window", "snow", "river", "field", "sky", "night"]


def synthetic(preprocess: Preprocess, num_images: int = 32, num_classes: int = 10, *, seed: int = 0,
              template: str = DEFAULT_TEMPLATE) -> Dataset:
    """Random normalized pixels (standard normal, like ``dualfuse bench``), ``num_classes`` class prompts and one
    random caption per image. No ground truth: labels and caption pairs are None."""
    if num_images < 1:
        raise DataError(f"synthetic data needs at least 1 image, got {num_images}")
    num_classes = max(2, min(num_classes, len(SYNTHETIC_CLASSES)))
    g = torch.Generator().manual_seed(seed)
    s = preprocess.image_size
    px = torch.randn(num_images, 3, s, s, generator=g)
    words = SYNTHETIC_CLASSES + _SYNTH_WORDS
    caps = []
    for _ in range(num_images):
        idx = torch.randint(0, len(words), (5,), generator=g).tolist()
        caps.append("a " + " ".join(words[i] for i in idx))
    return Dataset("synthetic", px, [f"synthetic_{i}" for i in range(num_images)], SYNTHETIC_CLASSES[:num_classes],
                   None, caps, None, [], f"{num_images} random images (seed {seed}), {num_classes} class prompts, "
                   f"{num_images} random captions; no ground truth", template)


EXIF_ORIENTATION = 0x0112


def upright(im):
    """``im`` turned as its EXIF orientation says (a phone's portrait photo is stored sideways with a tag), as
    Hugging Face's ``load_image`` does before the processor."""
    from PIL import ImageOps

    try:
        turned = im.getexif().get(EXIF_ORIENTATION, 1) not in (1, None)
    except Exception:  # noqa: BLE001 - a broken EXIF block leaves the image as stored
        return im
    return ImageOps.exif_transpose(im) if turned else im


def _open_image(path: str):
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return upright(im).convert("RGB")


def _try_image(path: str, preprocess: Preprocess, problems: list[str], where: str):
    if not os.path.exists(path):
        problems.append(f"{where}: missing image file {path}")
        return None
    try:
        return preprocess(_open_image(path))
    except Exception as e:  # noqa: BLE001 - a bad image is skipped, the rest go on
        problems.append(f"{where}: cannot read image {path} ({type(e).__name__}: {str(e)[:120]}) — skipped")
        return None


def _class_name(folder: str) -> str:
    return re.sub(r"[_\-]+", " ", folder).strip()


def load_folder(root: str, preprocess: Preprocess, *, limit: int | None = None,
                template: str = DEFAULT_TEMPLATE) -> Dataset:
    """``root/<class>/<image>``: one class per subfolder (``golden_retriever`` -> 'golden retriever')."""
    if not os.path.isdir(root):
        raise DataError(f"{root} is not a directory")
    problems: list[str] = []
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class subfolders: expected {root}/<class name>/<image files> "
                        f"(or a captions file: {', '.join(CAPTION_FILES)})")
    tensors, names, labels, class_names = [], [], [], []
    for d in classes:
        folder = os.path.join(root, d)
        files = sorted(f for f in os.listdir(folder) if not f.startswith("."))
        images = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
        other = len(files) - len(images)
        if other:
            problems.append(f"{d}/: ignored {other} file(s) that are not images ({', '.join(IMAGE_EXTENSIONS)})")
        label = len(class_names)
        got = 0
        for f in images:
            if limit is not None and len(tensors) >= limit:
                break
            x = _try_image(os.path.join(folder, f), preprocess, problems, f"{d}/{f}")
            if x is not None:
                tensors.append(x)
                names.append(f"{d}/{f}")
                labels.append(label)
                got += 1
        if got == 0:
            if not (limit is not None and len(tensors) >= limit):
                problems.append(f"{d}/: no readable images — class left out")
            continue
        class_names.append(_class_name(d))
    if not tensors:
        raise DataError(f"{root}: no readable images in any class folder" +
                        (f"; problems: {'; '.join(problems[:5])}" if problems else ""))
    if len(class_names) < 2:
        problems.append(f"only {len(class_names)} class with images: zero-shot over one class is trivial")
    return Dataset("folder", torch.stack(tensors), names, class_names, torch.tensor(labels), None, None, problems,
                   f"{len(tensors)} images in {len(class_names)} class folders of {root}", template)


def read_caption_entries(path: str, problems: list[str]) -> list[tuple[str, str, str]]:
    """(image name, caption, where) from a captions file; malformed entries become problems."""
    name = os.path.basename(path)
    entries = []
    if path.endswith(".json"):
        try:
            with open(path) as f:
                obj = json.load(f)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: not valid JSON ({e})") from e
        if isinstance(obj, dict):
            for k, (img, caps) in enumerate(obj.items()):
                for c in ([caps] if isinstance(caps, str) else caps if isinstance(caps, list) else [None]):
                    entries.append((img, c, f"{name}[{img!r}]"))
        elif isinstance(obj, list):
            for k, item in enumerate(obj):
                if not isinstance(item, dict) or "image" not in item:
                    problems.append(f"{name}[{k}]: expected an object with 'image' and 'caption' — skipped")
                    continue
                entries.append((item["image"], item.get("caption"), f"{name}[{k}]"))
        else:
            raise DataError(f"{path}: expected a JSON object {{image: [captions]}} or a list of "
                            "{{image, caption}} objects")
        return entries
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n\r")
            where = f"{name}:{n}"
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if path.endswith(".jsonl"):
                try:
                    item = json.loads(line)
                    entries.append((item["image"], item.get("caption"), where))
                except (ValueError, KeyError, TypeError):
                    problems.append(f"{where}: expected a JSON object with 'image' and 'caption' — skipped")
                continue
            if "\t" not in line:
                problems.append(f"{where}: expected 'image<TAB>caption' — skipped")
                continue
            img, cap = line.split("\t", 1)
            entries.append((img.strip(), cap, where))
    return entries


def find_captions_file(root: str) -> str | None:
    for n in CAPTION_FILES:
        p = os.path.join(root, n)
        if os.path.isfile(p):
            return p
    return None


def load_captions(path: str, preprocess: Preprocess, *, images_dir: str | None = None, limit: int | None = None,
                  template: str = DEFAULT_TEMPLATE) -> Dataset:
    """Images + captions with ground-truth pairs. ``path`` is a captions file or a folder holding one; image
    names are relative to ``images_dir`` (default: the captions file's folder). Each image is its own class for
    zero-shot (class name = file stem), so zero-shot agreement is reported too."""
    if os.path.isdir(path):
        found = find_captions_file(path)
        if found is None:
            raise DataError(f"{path} has no captions file (looked for {', '.join(CAPTION_FILES)})")
        path = found
    if not os.path.isfile(path):
        raise DataError(f"captions file {path} does not exist")
    base = images_dir or os.path.dirname(os.path.abspath(path))
    problems: list[str] = []
    entries = read_caption_entries(path, problems)
    image_index: dict[str, int] = {}
    bad_images: set[str] = set()
    tensors, names, captions, cap_img = [], [], [], []
    for img, cap, where in entries:
        if not isinstance(cap, str) or not cap.strip():
            problems.append(f"{where}: empty caption for {img} — skipped")
            continue
        if img in bad_images:
            continue
        if img not in image_index:
            if limit is not None and len(tensors) >= limit:
                continue
            x = _try_image(os.path.join(base, img), preprocess, problems, where)
            if x is None:
                bad_images.add(img)
                continue
            image_index[img] = len(tensors)
            tensors.append(x)
            names.append(img)
        captions.append(cap.strip())
        cap_img.append(image_index[img])
    if not tensors or not captions:
        raise DataError(f"{path}: no usable (image, caption) pairs" +
                        (f"; problems: {'; '.join(problems[:5])}" if problems else ""))
    class_names = [_class_name(os.path.splitext(os.path.basename(n))[0]) for n in names]
    return Dataset("captions", torch.stack(tensors), names, class_names, torch.arange(len(names)), captions,
                   cap_img, problems, f"{len(names)} images with {len(captions)} captions from {path}", template)


def load_dir(root: str, preprocess: Preprocess, *, captions: str | None = None, limit: int | None = None,
             template: str = DEFAULT_TEMPLATE) -> Dataset:
    """``--data DIR``: a captions file (given, or found in DIR) means retrieval; else class subfolders."""
    if captions:
        return load_captions(captions, preprocess, images_dir=root, limit=limit, template=template)
    if not os.path.isdir(root):
        raise DataError(f"--data {root}: not a directory")
    if find_captions_file(root):
        return load_captions(root, preprocess, limit=limit, template=template)
    return load_folder(root, preprocess, limit=limit, template=template)


# (skimage.data function, class name, caption)
DEMO_IMAGES = [
    ("astronaut", "astronaut", "an astronaut in a white spacesuit smiling in front of a flag"),
    ("chelsea", "cat", "a tabby cat looking to the side"),
    ("coffee", "coffee", "a cup of coffee on a saucer with a spoon"),
    ("rocket", "rocket", "a rocket standing on a launch pad under a blue sky"),
    ("camera", "cameraman", "a black and white photo of a man with a camera on a tripod"),
    ("horse", "horse", "a black silhouette of a horse on a white background"),
    ("hubble_deep_field", "galaxies", "many distant galaxies in deep space seen by a telescope"),
    ("retina", "retina", "a fundus photograph of a human retina with blood vessels"),
    ("immunohistochemistry", "tissue", "a microscope image of stained tissue cells"),
    ("moon", "moon", "a grey close up of the cratered surface of the moon"),
    ("coins", "coins", "many old coins on a dark background"),
    ("page", "page", "a scanned page of printed text"),
    ("clock", "clock", "a wall clock photographed with motion blur"),
    ("brick", "brick wall", "a texture of a brick wall"),
    ("grass", "grass", "a texture of green grass"),
    ("gravel", "gravel", "a texture of small gravel stones"),
    ("colorwheel", "color wheel", "a colorful color wheel"),
    ("stereo_motorcycle", "motorcycle", "a red motorcycle parked in a garage"),
]


def demo(preprocess: Preprocess, template: str = DEFAULT_TEMPLATE) -> Dataset:
    """The photos scikit-image ships, with class names and one caption each (ground truth for both tasks)."""
    try:
        import skimage.data as skdata
    except ImportError as e:
        raise DataError("--demo needs scikit-image: pip install scikit-image (or 'dualfuse[eval]')") from e
    problems: list[str] = []
    tensors, names, classes, captions = [], [], [], []
    for fn, cls, cap in DEMO_IMAGES:
        try:
            img = getattr(skdata, fn)()
            if isinstance(img, tuple):  # stereo_motorcycle -> (left, right, disparity)
                img = img[0]
            tensors.append(preprocess(img))
        except Exception as e:  # noqa: BLE001 - an image this scikit-image lacks is skipped
            problems.append(f"skimage.data.{fn}: unavailable ({type(e).__name__}) — skipped")
            continue
        names.append(f"skimage.data.{fn}")
        classes.append(cls)
        captions.append(cap)
    if not tensors:
        raise DataError("no scikit-image demo photo could be loaded: " + "; ".join(problems[:3]))
    n = len(tensors)
    return Dataset("demo", torch.stack(tensors), names, classes, torch.arange(n), captions, list(range(n)), problems,
                   f"{n} photos shipped with scikit-image, one class and one caption each", template)

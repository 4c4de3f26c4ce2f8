"""Encoded images -> uint8 frames ``[S, S, 3]`` at the model's size: the shorter side resized to S (bicubic), the
longer one center-cropped -- what CLIP's and SigLIP's processors do before normalizing (the normalization itself
is folded into the fused model's patch embedding).

- :func:`decode_frame`: on a CPU thread with PIL. JPEGs are decoded at a reduced scale where that still leaves
  both sides >= S (libjpeg's DCT scaling, ``Image.draft``): a 1000-px photo for a 224-px model decodes at 1/2 or
  1/4 of the work. PIL releases the GIL while it decodes and resizes, so threads scale.
- :class:`GpuJpegDecoder`: batches of JPEGs decoded by nvJPEG (``torchvision.io.decode_jpeg(device="cuda")``),
  resized and cropped on the device. Anything it refuses (PNG, WebP, a CMYK or broken JPEG) is left to the CPU,
  and so are JPEGs with an EXIF orientation (nvJPEG does not turn them; :func:`upright` does on the CPU).
"""
from __future__ import annotations

import io

import numpy as np

JPEG_MAGIC = b"\xff\xd8\xff"


def decode_frame(data: bytes, size: int) -> np.ndarray:
    """Encoded image bytes -> uint8 ``[size, size, 3]`` RGB. Raises ValueError saying why for what is not a
    readable image."""
    from PIL import Image, UnidentifiedImageError

    from ..data import resize_center_crop_pil, upright

    if not data:
        raise ValueError("empty file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format == "JPEG":
                im.draft("RGB", (size, size))
            im = to_rgb(center_band(upright(im)))
            im = resize_center_crop_pil(im, size)
            return np.asarray(im, dtype=np.uint8)
    except UnidentifiedImageError:
        raise ValueError("not an image (PIL cannot identify it)") from None
    except Image.DecompressionBombError as e:
        raise ValueError(f"refused: {e}") from None
    except Exception as e:  # noqa: BLE001 - PIL's plugins raise many kinds on broken files; one never stops a run
        raise ValueError(f"corrupt image ({type(e).__name__}: {str(e)[:120]})") from None


def turned_jpeg(data: bytes) -> bool:
    """Whether JPEG bytes carry an EXIF orientation other than "as stored" (nvJPEG ignores it: the CPU decodes
    those). Reads the headers only."""
    from PIL import Image

    from ..data import EXIF_ORIENTATION

    if b"Exif" not in data[:65536]:
        return False
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.getexif().get(EXIF_ORIENTATION, 1) not in (1, None)
    except Exception:  # noqa: BLE001 - the CPU decoder reports what is wrong
        return True


MAX_ASPECT = 4  # a longer side beyond this many times the shorter one is cut to its center band first


def band_box(w: int, h: int) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) of the centered band ``MAX_ASPECT`` x the shorter side long, or None when the
    image is not that elongated. The center crop lies inside it: a 1 x 40,000-px image resized whole to a 224-px
    shorter side would take gigabytes."""
    short = min(w, h)
    band = MAX_ASPECT * short
    if max(w, h) <= band:
        return None
    if w > h:
        left = (w - band) // 2
        return left, 0, left + band, h
    top = (h - band) // 2
    return 0, top, w, top + band


def center_band(im):
    """A PIL image cut to its :func:`band_box` (unchanged when not elongated)."""
    box = band_box(*im.size)
    return im if box is None else im.crop(box)


def to_rgb(im):
    """8-bit RGB. 16-bit and 32-bit grayscale (``I;16``, ``I``: 16-bit PNGs) are scaled to 8 bits, where PIL's own
    conversion clips every value above 255 to white; float images (``F``) are clipped to 0..255."""
    from PIL import Image

    if im.mode == "RGB":
        return im
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im).astype(np.float32)
        if im.mode.startswith("I;16") or a.max(initial=0) > 255:
            a = a / 257.0
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        im = Image.fromarray(np.clip(np.rint(np.asarray(im)), 0, 255).astype(np.uint8), "L")
    return im.convert("RGB")


def check_gpu_decode(device) -> None:
    """Raises ValueError unless ``--decode gpu`` can run on ``device``."""
    if getattr(device, "type", str(device)) != "cuda":
        raise ValueError("--decode gpu needs a CUDA device; use --decode cpu")


def is_jpeg(data: bytes | None) -> bool:
    return data is not None and data[:3] == JPEG_MAGIC


class GpuJpegDecoder:
    """JPEG bytes -> uint8 ``[size, size, 3]`` frames on ``device``, nvJPEG batch decode. ``__call__`` returns one
    frame or ``None`` per input (None: the CPU must do it)."""

    def __init__(self, size: int, device):
        try:
            import torchvision.io as tvio
        except ImportError as e:
            raise ValueError("--decode gpu needs torchvision (torchvision.io.decode_jpeg on CUDA)") from e
        check_gpu_decode(device)
        self.tvio, self.size, self.device = tvio, size, device

    def __call__(self, datas: list[bytes]):
        import torch

        from ..stream import resize_center_crop

        tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
        mode = self.tvio.ImageReadMode.RGB
        try:
            decoded = self.tvio.decode_jpeg(tensors, device=self.device, mode=mode)
        except Exception:  # noqa: BLE001 - one bad image fails the batch: decode one by one
            decoded = []
            for t in tensors:
                try:
                    decoded.append(self.tvio.decode_jpeg(t, device=self.device, mode=mode))
                except Exception:  # noqa: BLE001 - left to the CPU, which reports why
                    decoded.append(None)
        out = []
        for d in decoded:
            if d is not None:
                box = band_box(d.shape[2], d.shape[1])
                if box is not None:
                    d = d[:, box[1]:box[3], box[0]:box[2]]
                d = resize_center_crop(d.permute(1, 2, 0), self.size)[0]
            out.append(d)
        return out

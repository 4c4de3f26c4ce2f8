"""The model of an embedding run: uint8 frames and captions -> L2-normalized float32 embeddings.

:func:`load_encoder` is the one place that builds it. Today it runs the image path of the pair model
(``executor.encode_image``); an image tower alone can take its place behind the same :class:`Encoder` interface.
The fused executor takes the uint8 frames as they are (mean/std folded into its patch embedding); any other
executor gets them normalized on the device first.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F


class Encoder:
    """``image_size``, ``embed_dim``, ``encode_frames(uint8 [B, S, S, 3] on device)``, ``encode_texts(list[str])``
    (both -> float32 [B, E], unit length), ``name``, ``executor``, ``dtype`` (name), ``device``."""

    def __init__(self, model: str, executor: str = "fused", dtype=None, device=None):
        from .. import executors, load
        from ..adapters import image_normalization
        from ..executors.base import dtype_name

        self.name = model
        source = load(model, seed=0)
        self.ex = executors.get(executor, source, dtype=dtype, device=device)
        io = self.ex.io
        if io.naflex:
            raise ValueError(f"embed: {io.name or model} is a SigLIP 2 NaFlex model (patch sequences at each image's "
                             "own resolution); it has no fixed frame size to decode to")
        self.executor = self.ex.name
        self.device = self.ex.device
        self.dtype = dtype_name(self.ex.dtype)
        self.image_size = io.image_size
        self.embed_dim = io.embed_dim
        self.takes_frames = self.ex.name == "fused" and getattr(self.ex, "fallback", None) is None
        self.mean_std = None if self.takes_frames else image_normalization(source, self.ex.family,
                                                                            channels=io.channels)
        self.tokenizer = self._tokenizer(source, model)
        del source

    def _tokenizer(self, source, model):
        from ..data import make_tokenizer

        spec = self.ex.spec
        if spec is None:
            return None
        return make_tokenizer(spec, source, path=model if os.path.isdir(model) else None)

    @torch.no_grad()
    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        from ..executors.base import normalize_frames

        x = frames
        if not self.takes_frames:
            x = normalize_frames(frames.permute(0, 3, 1, 2), *self.mean_std, dtype=self.ex.dtype)
        return F.normalize(self.ex.encode_image(x).float(), dim=-1)

    def text_unavailable(self) -> str | None:
        """Why captions / text queries cannot be embedded with this model, or None."""
        if self.tokenizer is None:
            return (f"{self.name}: no text tower dualfuse can run with a tokenizer (the model's towers are not "
                    "covered by dualfuse)")
        return None

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        why = self.text_unavailable()
        if why:
            raise ValueError(why)
        ids = self.tokenizer(list(texts)).to(self.device)
        return F.normalize(self.ex.encode_text(ids).float(), dim=-1)


def load_encoder(model: str, executor: str = "fused", dtype=None, device=None) -> Encoder:
    return Encoder(model, executor, dtype, device)

"""streams: the source model with each tower on its own CUDA stream, joined back to the caller's stream."""
from __future__ import annotations

import torch

from . import register
from .base import SourceExecutor


@register("streams")
class StreamsExecutor(SourceExecutor):
    """Image tower on one side stream, text tower on another, both waiting on the caller's stream first; the
    caller's stream waits for both before the embeddings are returned. One tower alone runs on the caller's
    stream (nothing to overlap)."""

    needs_cuda = True
    notes = "two CUDA streams"

    def __init__(self, model, dtype=None, device=None, **kwargs):
        super().__init__(model, dtype, device, **kwargs)
        self.image_stream = torch.cuda.Stream(self.device)
        self.text_stream = torch.cuda.Stream(self.device)

    def _encode(self, px, ids):
        cur = torch.cuda.current_stream(self.device)
        self.image_stream.wait_stream(cur)
        self.text_stream.wait_stream(cur)
        with torch.cuda.stream(self.image_stream):
            img = self.image_fn(px)
        with torch.cuda.stream(self.text_stream):
            txt = self.text_fn(ids)
        cur.wait_stream(self.image_stream)
        cur.wait_stream(self.text_stream)
        # Tell the allocator who uses what: inputs were read on the side streams, outputs are used on `cur`.
        px.record_stream(self.image_stream)
        ids.record_stream(self.text_stream)
        img.record_stream(cur)
        txt.record_stream(cur)
        return img, txt

    def _encode_image(self, px):
        return self.image_fn(px)

    def _encode_text(self, ids):
        return self.text_fn(ids)

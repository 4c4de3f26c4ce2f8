"""eager: the source model itself (a private copy, cast and moved), the towers one after the other."""
from __future__ import annotations

from . import register
from .base import SourceExecutor


@register("eager")
class EagerExecutor(SourceExecutor):
    """What users run today: ``get_image_features`` then ``get_text_features`` (or open_clip's encode_*)."""

    def _encode_image(self, px):
        return self.image_fn(px)

    def _encode_text(self, ids):
        return self.text_fn(ids)

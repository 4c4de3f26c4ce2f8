"""Queries against an embedded corpus: a text or an image, embedded with the model recorded in the folder's
manifest, then the FAISS index's nearest rows."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .index import Hit, search_index


@dataclass
class SearchResult:
    index: str
    model: str
    query: str
    hits: list[Hit]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(index=self.index, model=self.model, query=self.query, notes=list(self.notes),
                    hits=[asdict(h) for h in self.hits])


def search(index_dir: str, *, text: str | None = None, image: str | None = None, k: int = 10,
           device=None) -> SearchResult:
    from .decode import decode_frame
    from .encoder import load_encoder
    from .store import read_manifest

    if (text is None) == (image is None):
        raise ValueError("search: give one of --text or --image")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"--k: expected a positive integer, got {k!r}")
    man = read_manifest(index_dir)
    if man is None:
        raise ValueError(f"--index {index_dir}: no manifest.json; not an output folder of dualfuse embed")
    import torch

    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = man["dtype"] if dev.type == "cuda" or man["dtype"] == "fp32" else "fp32"
    executor = man.get("executor", "fused")
    enc = load_encoder(man["model"], executor, dtype, dev)
    notes = []
    if text is not None:
        why = enc.text_unavailable()
        if why:
            raise ValueError(f"a text query is impossible here: {why}; query with --image")
        if getattr(enc.tokenizer, "kind", "") == "synthetic":
            notes.append(f"{man['model']} has no real tokenizer here ({enc.tokenizer.describe()}): text scores "
                         "mean nothing for real checkpoints")
        q = enc.encode_texts([text])
        query = f"text: {text}"
    else:
        try:
            with open(image, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ValueError(f"--image {image}: {e.strerror or e}") from None
        try:
            pixels = decode_frame(data, enc.image_size)
        except ValueError as e:
            raise ValueError(f"--image {image}: {e}") from None
        frame = torch.from_numpy(pixels.copy()).unsqueeze(0).to(enc.device)
        q = enc.encode_frames(frame)
        query = f"image: {image}"
    hits = search_index(index_dir, q.cpu().numpy().astype(np.float32), k)[0]
    return SearchResult(index_dir, man["model"], query, hits, notes)

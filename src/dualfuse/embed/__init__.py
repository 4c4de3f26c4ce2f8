"""Embed an image corpus (and its captions) into Parquet shards, optionally with a FAISS index over them.

    from dualfuse.embed import EmbedConfig, run_embed
    result = run_embed(EmbedConfig(model="clip-vit-b-32", images="photos/", out="emb/"))
    print(result.images, result.images_per_s)

One job per module: ``config`` (EmbedConfig, EmbedResult), ``sources`` (folder, list file, Parquet, WebDataset tar
shards -> shards of items), ``decode`` (bytes -> uint8 frames at the model's size, on CPU threads or with nvJPEG on
the GPU), ``encoder`` (the model: uint8 frames and texts -> L2-normalized embeddings), ``store`` (the output
folder: manifest, Parquet shards, errors, resumption), ``local`` (the one-process pipeline), ``ray_engine`` (the
same on Ray Data), ``index`` (FAISS index and search), ``run`` (:func:`run_embed`). The guide is docs/embed.md.
"""
from __future__ import annotations

from .config import EmbedConfig, EmbedResult
from .run import run_embed

__all__ = ["EmbedConfig", "EmbedResult", "run_embed"]

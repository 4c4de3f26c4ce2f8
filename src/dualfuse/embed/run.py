""":func:`run_embed`: open the input, the model and the output folder, run the engine, write the summary (and
the index)."""
from __future__ import annotations

import os
import time
import warnings

from .config import EmbedConfig, EmbedResult


def run_embed(config: EmbedConfig | None = None, progress=None, encoder=None, **kwargs) -> EmbedResult:
    """Embed ``config.images`` into ``config.out`` (see :class:`EmbedConfig`; keyword arguments build one).

    ``progress``: a callable ``(images, failures)`` called as batches finish, or an object with ``start(total)``
    (the items to embed; None when unknown) and ``advance(images, failures)``. ``encoder``: an
    :class:`~dualfuse.embed.encoder.Encoder` built before (the local engine reuses it: several runs, or a warm-up
    first, without loading and capturing the model again). Returns an :class:`EmbedResult`; ``to_dict()`` is ``DIR/summary.json``."""
    if config is None:
        config = EmbedConfig(**kwargs)
    elif kwargs:
        raise ValueError("run_embed: pass an EmbedConfig or keyword arguments, not both")
    from ..version import __version__
    from .sources import open_source
    from .store import Store

    cfg = config
    if cfg.index == "faiss":
        from .index import require_faiss

        require_faiss()  # before the run, not after it
    source = open_source(cfg.images, captions=cfg.captions, text_column=cfg.text_column,
                         image_column=cfg.image_column, key_column=cfg.key_column)
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401 - imported here, not inside the first shard's write time
    except ImportError:
        raise ValueError("dualfuse embed writes Parquet: pip install 'dualfuse[embed]' (pyarrow)") from None
    import numpy as np

    from .store import make_table

    make_table("key", ["x"], np.zeros((1, 1), np.float32), None, None, {})  # pyarrow's first-use cost (about a
    # second: its lazy imports), paid here rather than inside the first shard's write time
    shards = source.shards(cfg.shard_size)
    if cfg.limit is not None:
        if source.kind == "webdataset":
            raise ValueError("--limit needs item counts known before reading: not for tar shards (pass fewer "
                             "shards, e.g. 'shards-{000..009}.tar')")
        shards = _limit(shards, cfg.limit)
    with_text = cfg.captions is not None or cfg.text_column is not None
    t_start = time.perf_counter()
    if cfg.engine == "ray":
        from .ray_engine import ray_model_info

        info = ray_model_info(cfg)
    else:
        from .encoder import load_encoder

        if encoder is None:
            encoder = load_encoder(cfg.model, cfg.executor, cfg.dtype, cfg.device)
        elif encoder.name != cfg.model:
            raise ValueError(f"run_embed: encoder= runs {encoder.name!r}, but the config names {cfg.model!r}")
        info = dict(executor=encoder.executor, dtype=encoder.dtype, embed_dim=encoder.embed_dim,
                    device=str(encoder.device), image_size=encoder.image_size)
        if with_text and encoder.text_unavailable():
            raise ValueError(f"captions given, but {encoder.text_unavailable()}")
        if cfg.decode == "gpu":
            from .decode import check_gpu_decode

            check_gpu_decode(encoder.device)  # before the output folder is made
    identity = dict(model=cfg.model, dtype=info["dtype"], embed_dim=info["embed_dim"], key_name=source.key_name,
                    source=source.describe(), shard_size=cfg.shard_size if source.kind != "webdataset" else None,
                    num_shards=len(shards), captions=with_text)
    meta = dict(model=cfg.model, executor=info["executor"], dtype=info["dtype"], embed_dim=info["embed_dim"],
                dualfuse_version=__version__)
    store = Store(cfg.out, identity, meta)
    try:
        return _embed(cfg, source, shards, store, encoder, info, with_text, progress, t_start)
    finally:
        store.close()  # the folder's lock: free for the next run even while a traceback keeps this frame alive


def _embed(cfg, source, shards, store, encoder, info, with_text, progress, t_start) -> EmbedResult:
    """The run itself, once the input, the model and the output folder are open."""
    setup = time.perf_counter() - t_start
    t_start = time.perf_counter()
    store.expect({s.index: source.fingerprint(s) for s in shards})
    todo = [s for s in shards if not store.done(s.index)]
    changed = sum(store.changed(s.index) for s in todo)
    if progress is not None and hasattr(progress, "start"):
        known = [s.count for s in todo]
        progress.start(None if any(c is None for c in known) else sum(known))
    notes = list(source.notes)
    if changed:
        notes.append(f"{changed} finished shard(s) are redone: their input changed since they were written")
    advance = progress.advance if hasattr(progress, "advance") else progress
    try:
        if cfg.engine == "ray":
            from .ray_engine import run_ray

            out = run_ray(cfg, source, todo, store, with_text=with_text, progress=advance)
            notes.extend(out.pop("notes", []))
        else:
            from .local import run_local

            out = run_local(source, todo, encoder, store, batch=cfg.batch, workers=cfg.num_workers,
                            prefetch=cfg.prefetch, decode=cfg.decode, with_text=with_text, progress=advance)
    except BaseException:  # stopped (Ctrl-C) or failed: errors.tsv still lists the finished shards' skipped items
        try:
            store.write_errors()
        except Exception as e:  # noqa: BLE001 - the run's own error (or Ctrl-C) is the one to raise
            warnings.warn(f"dualfuse embed: could not write errors.tsv ({type(e).__name__}: {e})", stacklevel=2)
        raise
    wall = time.perf_counter() - t_start
    card = info.get("card") or _card(info["device"])
    if len(todo) < len(shards):
        notes.append(f"resumed: {len(shards) - len(todo)} of {len(shards)} shards were finished before and kept")
    result = EmbedResult(out=cfg.out, model=cfg.model, executor=info["executor"], dtype=info["dtype"],
                         device=info["device"], card=card, engine=cfg.engine, decode=cfg.decode, batch=cfg.batch,
                         images=out["images"], failures=out["failures"], wall_s=wall, setup_s=setup, stages=out["stages"],
                         shards_written=len(todo), shards_skipped=len(shards) - len(todo),
                         first_batch_s=out.get("first_batch_s"), errors=list(store.errors), notes=notes,
                         details=out.get("details", {}))
    if cfg.index == "faiss":
        from .index import build_index

        result.index = build_index(cfg.out)
    elif todo:
        from .index import remove_index

        if remove_index(cfg.out):
            result.notes.append("removed the FAISS index of an earlier run (it no longer covers the shards); "
                                "rebuild it with --index faiss")
    store.finish(result.to_dict())
    return result


def _card(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def _limit(shards, limit: int):
    """The first ``limit`` items: whole shards, the last one cut (files, Parquet rows; counts known)."""
    from dataclasses import replace

    out, left = [], limit
    for s in shards:
        if left <= 0:
            break
        if s.count is not None and s.count > left:
            if isinstance(s.ref[0], tuple):  # files: the items themselves
                s = replace(s, ref=s.ref[:left], count=left)
            else:  # Parquet: (file, first row, end row)
                s = replace(s, ref=(s.ref[0], s.ref[1], s.ref[1] + left), count=left)
        out.append(s)
        left -= s.count if s.count is not None else 0
    return out


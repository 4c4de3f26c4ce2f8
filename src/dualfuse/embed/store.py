"""The output folder of an embedding run.

    DIR/manifest.json         model, executor, dtype, embedding size, dualfuse version, the input, shard size,
                              and each finished shard (rows, errors)
    DIR/part-00000.parquet    one per shard: ``path`` (files) or ``key`` (Parquet, tar), ``image_embedding``
                              (fixed-size list of float32, unit length), ``text_embedding`` (with captions; null
                              for an image without one) and ``caption``; model, dtype and dualfuse version in the
                              file's key-value metadata
    DIR/errors.tsv            every item that was skipped: key<TAB>reason
    DIR/summary.json          the last run's EmbedResult
    DIR/index.faiss, index-keys.parquet   with --index faiss

A shard is written to a temporary name and renamed, then recorded in the manifest (also written atomically): a
run stopped at any point (Ctrl-C) leaves only whole shards, and a re-run redoes just the unrecorded ones. A folder
made by another model, dtype or input is refused.
"""
from __future__ import annotations

import os

import numpy as np

from ..util import write_json
from .config import EmbedError

MANIFEST = "manifest.json"
ERRORS = "errors.tsv"
SUMMARY = "summary.json"
MANIFEST_SCHEMA = "dualfuse.embed.manifest/1"


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def read_manifest(out: str) -> dict | None:
    import json

    path = os.path.join(out, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"--out {out}: {MANIFEST} is unreadable ({e}); use another folder") from None
    if doc.get("schema") != MANIFEST_SCHEMA:
        raise ValueError(f"--out {out}: {MANIFEST} is not a dualfuse embed manifest")
    return doc


class Store:
    """Opens (or resumes) DIR for one run; ``done(index)``, ``write_shard(...)``, ``finish(errors)``."""

    IDENTITY = ("model", "dtype", "embed_dim", "key_name", "source", "shard_size", "num_shards", "captions")

    def __init__(self, out: str, identity: dict, meta: dict):
        self.out = out
        self.identity = identity
        self.meta = meta  # model, executor, dtype, dualfuse_version: into every file's metadata
        os.makedirs(out, exist_ok=True)
        self._lock = lock_folder(out)
        try:
            self._open(out, identity, meta)
        except BaseException:  # refused or unreadable: the lock goes with the error, not with the traceback's frame
            self.close()
            raise

    def _open(self, out: str, identity: dict, meta: dict) -> None:
        old = read_manifest(out)
        if old is None:
            stray = [n for n in os.listdir(out) if n.endswith(".parquet")]
            if stray:
                raise ValueError(f"--out {out}: holds Parquet files ({stray[0]}, ...) but no {MANIFEST}: not made by "
                                 "dualfuse embed; use an empty or new folder")
            self.manifest = {"schema": MANIFEST_SCHEMA, **identity, **meta, "shards": {}}
            self._save()
        elif not old.get("shards"):  # nothing finished there (a run stopped before its first shard): start anew
            self.manifest = {"schema": MANIFEST_SCHEMA, **identity, **meta, "shards": {}}
            self._save()
        else:
            for k in self.IDENTITY:
                if old.get(k) != identity.get(k):
                    what = "another model" if k in ("model", "dtype", "embed_dim") else "another input or settings"
                    raise ValueError(f"--out {out}: made by {what} ({k}: {old.get(k)!r} there, {identity.get(k)!r} "
                                     "now); use a new --out folder, or the same model and input to resume")
            self.manifest = old
        self.errors: list[EmbedError] = [EmbedError(*e) for s in self.manifest["shards"].values()
                                         for e in s.get("errors", [])]
        self.fingerprints: dict[int, str] = {}  # shard -> the input shard's fingerprint now (Source.fingerprint)

    def close(self) -> None:
        """Release the folder's lock (the end of the run)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def expect(self, fingerprints: dict[int, str]) -> None:
        """The fingerprint of each input shard now: a finished shard recorded with another one is not done."""
        self.fingerprints = dict(fingerprints)

    def _same_input(self, rec: dict, index: int) -> bool:
        # a shard recorded without a fingerprint (an older dualfuse) is trusted as before
        return rec.get("fingerprint", self.fingerprints.get(index)) == self.fingerprints.get(index)

    def done(self, index: int) -> bool:
        rec = self.manifest["shards"].get(str(index))
        return (rec is not None and os.path.isfile(os.path.join(self.out, rec["file"]))
                and self._same_input(rec, index))

    def changed(self, index: int) -> bool:
        """Finished before, but from an input shard that has changed since (redone by this run)."""
        rec = self.manifest["shards"].get(str(index))
        return rec is not None and not self._same_input(rec, index)

    def _save(self) -> None:
        write_json(os.path.join(self.out, MANIFEST), self.manifest)

    def write_shard(self, index: int, keys: list[str], image: np.ndarray, text: list | None,
                    captions: list | None, errors: list[EmbedError]) -> None:
        """Write one shard (temp name, then rename) and record it."""
        import pyarrow.parquet as pq

        table = make_table(self.identity["key_name"], keys, image, text, captions, self.meta)
        name = shard_name(index)
        path = os.path.join(self.out, name)
        tmp = f"{path}.{os.getpid()}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, path)
        old = self.manifest["shards"].get(str(index))
        if old is not None:  # redone (its input changed): its old skipped items go
            gone = {(k, r) for k, r in old.get("errors", [])}
            self.errors = [e for e in self.errors if (e.key, e.reason) not in gone]
        self.manifest["shards"][str(index)] = dict(file=name, rows=len(keys), fingerprint=self.fingerprints.get(index),
                                                   errors=[[e.key, e.reason] for e in errors])
        self.errors.extend(errors)
        self._save()

    def finish(self, summary: dict) -> None:
        self.write_errors()
        write_json(os.path.join(self.out, SUMMARY), summary)

    def write_errors(self) -> None:
        """DIR/errors.tsv: the skipped items of every finished shard (also after a run stopped early)."""
        path = os.path.join(self.out, ERRORS)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("key\treason\n")
            for e in self.errors:
                f.write(f"{_cell(e.key)}\t{_cell(e.reason)}\n")
        os.replace(tmp, path)


LOCK = ".dualfuse-embed.lock"


def lock_folder(out: str):
    """An exclusive lock on DIR for this process (released when it ends, however it ends): two runs writing the
    same folder would record each other's shards. Where ``fcntl`` is missing (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:
        return None
    f = open(os.path.join(out, LOCK), "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise ValueError(f"--out {out}: another dualfuse embed is writing to this folder; wait for it or use "
                         "another folder") from None
    return f


def _cell(text: str) -> str:
    return str(text).replace("\t", " ").replace("\n", " ")


def make_table(key_name: str, keys: list[str], image: np.ndarray, text: list | None, captions: list | None,
               meta: dict):
    """The Arrow table of one shard (the one schema every engine writes)."""
    import pyarrow as pa

    dim = int(image.shape[1]) if image.ndim == 2 else int(meta["embed_dim"])
    vec = pa.list_(pa.float32(), dim)
    flat = pa.array(np.ascontiguousarray(image, dtype=np.float32).reshape(-1), type=pa.float32())
    cols = {key_name: pa.array(keys, type=pa.string()),
            "image_embedding": pa.FixedSizeListArray.from_arrays(flat, dim)}
    fields = [pa.field(key_name, pa.string()), pa.field("image_embedding", vec)]
    if text is not None:
        cols["text_embedding"] = pa.array([None if t is None else np.asarray(t, np.float32) for t in text], type=vec)
        cols["caption"] = pa.array(captions, type=pa.string())
        fields += [pa.field("text_embedding", vec), pa.field("caption", pa.string())]
    metadata = {f"dualfuse.{k}": str(v) for k, v in meta.items()}
    return pa.Table.from_arrays(list(cols.values()), schema=pa.schema(fields, metadata=metadata))


def read_embeddings(out: str, column: str = "image_embedding"):
    """(keys, float32 [N, E]) of every finished shard in DIR, in shard order: the rows that hold ``column``
    (``text_embedding``: the rows with a caption)."""
    import pyarrow.parquet as pq

    man = read_manifest(out)
    if man is None:
        raise ValueError(f"{out}: no {MANIFEST}; not an output folder of dualfuse embed")
    keys, vecs = [], []
    dim = man["embed_dim"]
    for idx in sorted(man["shards"], key=int):
        t = pq.read_table(os.path.join(out, man["shards"][idx]["file"]))
        if column not in t.column_names:
            raise ValueError(f"{out}: no {column} column (columns: {', '.join(t.column_names)})")
        col = t.column(column).combine_chunks()
        names = t.column(man["key_name"]).to_pylist()
        if col.null_count:
            valid = col.is_valid()
            names = [k for k, ok in zip(names, valid.to_pylist()) if ok]
            col = col.filter(valid)
        keys.extend(names)
        vecs.append(col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), dim))
    return keys, (np.concatenate(vecs).astype(np.float32) if vecs else np.zeros((0, dim), np.float32))

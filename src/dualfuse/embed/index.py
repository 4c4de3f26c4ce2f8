"""A FAISS index over an output folder's image embeddings, and nearest-neighbour search in it.

Inner product on unit vectors (cosine similarity), exact (``IndexFlatIP``): ``DIR/index.faiss`` plus
``DIR/index-keys.parquet`` (the key of each row, in index order). faiss-gpu is used for the search where it is
installed with a GPU; faiss-cpu otherwise (``pip install 'dualfuse[faiss]'``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

INDEX_FILE = "index.faiss"
KEYS_FILE = "index-keys.parquet"


def require_faiss():
    """The faiss module, or a ValueError saying how to install it."""
    try:
        import faiss
    except ImportError:
        raise ValueError("--index faiss needs FAISS: pip install 'dualfuse[faiss]' (faiss-cpu), or faiss-gpu") from None
    return faiss


def build_index(out: str) -> str:
    """Index every finished shard of ``out``; returns the index path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .store import read_embeddings

    faiss = require_faiss()
    keys, vecs = read_embeddings(out)
    index = faiss.IndexFlatIP(vecs.shape[1])
    if len(vecs):
        index.add(np.ascontiguousarray(vecs, dtype=np.float32))
    path = os.path.join(out, INDEX_FILE)
    faiss.write_index(index, path + ".tmp")
    os.replace(path + ".tmp", path)
    pq.write_table(pa.table({"key": pa.array(keys, pa.string())}), os.path.join(out, KEYS_FILE))
    return path


def remove_index(out: str) -> bool:
    """Delete ``out``'s index files (stale once shards were written after them); whether there were any."""
    found = False
    for name in (INDEX_FILE, KEYS_FILE):
        path = os.path.join(out, name)
        if os.path.isfile(path):
            os.remove(path)
            found = True
    return found


@dataclass
class Hit:
    key: str
    score: float


def search_index(out: str, queries: np.ndarray, k: int = 10) -> list[list[Hit]]:
    """The ``k`` nearest rows of each query (float32 [Q, E], unit length) by inner product."""
    import pyarrow.parquet as pq

    faiss = require_faiss()
    path = os.path.join(out, INDEX_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"--index {out}: no {INDEX_FILE}; run dualfuse embed with --index faiss first")
    index = faiss.read_index(path)
    keys = pq.read_table(os.path.join(out, KEYS_FILE)).column("key").to_pylist()
    if queries.shape[1] != index.d:
        raise ValueError(f"query of {queries.shape[1]} dims, but the index holds {index.d}-dim embeddings")
    scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, max(index.ntotal, 1)))
    return [[Hit(keys[i], float(s)) for s, i in zip(srow, irow) if i >= 0] for srow, irow in zip(scores, ids)]

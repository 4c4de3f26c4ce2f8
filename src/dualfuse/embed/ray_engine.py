"""``--engine ray``: the same run on Ray Data, over all the GPUs (and CPUs) of a Ray cluster.

    shards (one row each) --flat_map--> items (read: files, Parquet row groups, tar members; on CPU tasks)
      --map_batches(decode_rows)--> uint8 frames at the model's size (CPU tasks, as many as the cluster's CPUs)
      --map_batches(EmbedActor, compute=ActorPoolStrategy(size=#GPUs), num_gpus=1)--> unit embeddings
         (one fused model per actor)
      --iter_batches--> the driver writes each shard once all its rows are back (the Store of the local engine:
         the same Parquet schema and metadata, manifest, errors, resumption)

The rows of a shard end with one marker row carrying the shard's item count, so the driver knows when a shard is
complete whatever order the rows come back in; rows are put back in the source's order before writing. Ray is
imported only here (``pip install 'dualfuse[ray]'``). The driver starts a local Ray for the run unless one is
already running in the process or ``--ray-address`` names a cluster. With no GPU in the cluster (or
``ray_gpus=0``) one actor runs the model on CPU.
"""
from __future__ import annotations

import time

import numpy as np

from .config import EmbedError
from .local import ShardRows, Stages

READ_PART = 64  # items per read-and-decode task (a tar file is one part: it is read in one pass)


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ValueError("--engine ray needs Ray Data: pip install 'dualfuse[ray]'") from None
    return ray


def ray_model_info(cfg) -> dict:
    """The model's dtype / embedding size / image size, read on the driver (the actors load the weights)."""
    from .. import load
    from ..adapters import model_io
    from ..executors.base import dtype_name, resolve_dtype

    io = model_io(load(cfg.model, seed=0))
    gpus = _gpus(cfg)
    device = "cuda" if gpus else "cpu"
    import torch

    dtype = resolve_dtype(cfg.dtype, torch.device(device)) if cfg.dtype else (torch.float16 if gpus else torch.float32)
    return dict(executor=cfg.executor, dtype=dtype_name(dtype), embed_dim=io.embed_dim, image_size=io.image_size,
                device=f"ray:{gpus}xcuda" if gpus else "ray:cpu", card=_card(gpus))


def _card(gpus: int) -> str:
    import torch

    if gpus and torch.cuda.is_available():
        return f"{gpus} x {torch.cuda.get_device_name(0)}"
    return "cpu"


def _gpus(cfg) -> int:
    if cfg.ray_gpus is not None:
        return cfg.ray_gpus
    ray = _ray()
    if ray.is_initialized():
        return int(ray.cluster_resources().get("GPU", 0))
    if cfg.ray_address:
        return 0  # known once connected: run_ray connects first
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


class ReadShard:
    """one part of a shard -> one row per item (``order``: its position in the shard), then the part's end
    marker (``end``: the part's item count)."""

    def __init__(self, source):
        self.source = source

    def __call__(self, row: dict) -> list[dict]:
        import pickle

        part, offset = pickle.loads(row["part"])
        out = []
        t0 = time.perf_counter()
        for n, item in enumerate(self.source.items(part)):
            out.append(dict(shard=part.index, order=offset + n, key=item.key, path=item.path or "",
                            data=item.data or b"", caption=item.caption or "", has_caption=item.caption is not None,
                            error=item.error or "", end=-1, t_read=0.0))
        if out:
            out[0]["t_read"] = time.perf_counter() - t0
        out.append(dict(shard=part.index, order=-1, key="", path="", data=b"", caption="", has_caption=False,
                        error="", end=len(out), t_read=0.0))
        return out


def decode_rows(batch: dict, size: int) -> dict:
    """Read (files) and decode each row's image: adds ``frame`` uint8 [n, S, S, 3], updates ``error``."""
    from .decode import decode_frame
    from .sources import Item

    n = len(batch["key"])
    frames = np.zeros((n, size, size, 3), np.uint8)
    errors = list(batch["error"])
    t_read, t_decode = np.asarray(batch["t_read"], np.float64).copy(), np.zeros(n)
    for i in range(n):
        if batch["end"][i] >= 0 or errors[i]:
            continue
        item = Item(str(batch["key"][i]), path=str(batch["path"][i]) or None, data=bytes(batch["data"][i]) or None)
        t0 = time.perf_counter()
        try:
            data = item.read()
        except OSError as e:
            errors[i] = f"unreadable ({e.strerror or type(e).__name__})"
            continue
        t1 = time.perf_counter()
        t_read[i] += t1 - t0
        try:
            frames[i] = decode_frame(data, size)
        except ValueError as e:
            errors[i] = str(e)
        t_decode[i] = time.perf_counter() - t1
    out = {k: v for k, v in batch.items() if k not in ("data", "path")}
    out.update(frame=frames, error=np.asarray(errors, dtype=object), t_read=t_read, t_decode=t_decode)
    return out


class EmbedActor:
    """One model per actor (one per GPU): frames -> unit embeddings, every call padded to ``batch`` rows."""

    def __init__(self, model: str, executor: str, dtype, device: str, batch: int, with_text: bool):
        from .encoder import load_encoder

        self.encoder = load_encoder(model, executor, dtype, device)
        self.batch, self.with_text = batch, with_text

    def __call__(self, rows: dict) -> dict:
        import torch

        t0 = time.perf_counter()
        n = len(rows["key"])
        dim = self.encoder.embed_dim
        ok = np.array([rows["end"][i] < 0 and not rows["error"][i] for i in range(n)], dtype=bool)
        image = np.zeros((n, dim), np.float32)
        text = np.zeros((n, dim), np.float32)
        idx = np.nonzero(ok)[0]
        for start in range(0, len(idx), self.batch):
            part = idx[start:start + self.batch]
            frames = np.zeros((self.batch,) + rows["frame"].shape[1:], np.uint8)
            frames[:len(part)] = rows["frame"][part]
            x = torch.from_numpy(frames).to(self.encoder.device)
            image[part] = self.encoder.encode_frames(x)[:len(part)].cpu().numpy()
            if self.with_text:
                caps = [str(rows["caption"][i]) for i in part] + [""] * (self.batch - len(part))
                text[part] = self.encoder.encode_texts(caps)[:len(part)].cpu().numpy()
        out = {k: v for k, v in rows.items() if k != "frame"}
        out.update(image_embedding=image, text_embedding=text,
                   t_model=np.full(n, (time.perf_counter() - t0) / max(n, 1)))
        return out


def run_ray(cfg, source, shards, store, *, with_text: bool, progress=None) -> dict:
    import pickle

    ray = _ray()
    started = False
    if not ray.is_initialized():
        kwargs = dict(address=cfg.ray_address) if cfg.ray_address else dict(num_cpus=cfg.ray_cpus)
        ray.init(**kwargs, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
        started = True
    notes = []
    try:
        info = ray_model_info(cfg)
        gpus = _gpus(cfg)
        dtype = cfg.dtype or ("fp16" if gpus else "fp32")
        stages = Stages()
        counts = dict(images=0, failures=0)
        if not shards:
            return dict(images=0, failures=0, stages=dict(stages.seconds), notes=notes)
        parts = [p for s in shards for p in source.split(s, READ_PART)]
        parts_left = {}
        for p, _ in parts:
            parts_left[p.index] = parts_left.get(p.index, 0) + 1
        ds = ray.data.from_items([{"part": pickle.dumps(p)} for p in parts], override_num_blocks=len(parts))
        ds = ds.flat_map(ReadShard(source))
        ds = ds.map_batches(decode_rows, fn_kwargs=dict(size=info["image_size"]), batch_size=64,
                            batch_format="numpy", num_cpus=1)
        actors = max(gpus, 1)
        ds = ds.map_batches(EmbedActor, fn_constructor_kwargs=dict(model=cfg.model, executor=cfg.executor,
                                                                   dtype=dtype, device="cuda" if gpus else "cpu",
                                                                   batch=cfg.batch, with_text=with_text),
                            batch_size=cfg.batch, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=actors),
                            num_gpus=1 if gpus else 0, num_cpus=1 if gpus else 0.5)
        # (on CPU the actor asks for another CPU share than the decode tasks, so that Ray does not fuse the decode
        # into the single model actor: decoding stays spread over the CPU tasks)
        notes.append(f"Ray Data: {actors} model actor(s) ({'1 GPU each' if gpus else 'CPU'}), "
                     f"{int(ray.cluster_resources().get('CPU', 0))} CPUs for reading and decoding; read, decode "
                     "and model times are summed over tasks and actors")
        pending: dict[int, list] = {}
        expected: dict[int, int] = {}  # shard -> items announced by its parts' end markers so far
        by_index = {s.index: s for s in shards}
        t_start, first = time.perf_counter(), None
        for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
            if first is None:
                first = time.perf_counter() - t_start
            n_ok = n_err = 0
            for i in range(len(b["key"])):
                sid = int(b["shard"][i])
                if b["end"][i] >= 0:
                    expected[sid] = expected.get(sid, 0) + int(b["end"][i])
                    parts_left[sid] -= 1
                else:
                    stages.add("read", float(b["t_read"][i]))
                    stages.add("decode", float(b["t_decode"][i]))
                    stages.add("model", float(b["t_model"][i]))
                    pending.setdefault(sid, []).append(dict(
                        order=int(b["order"][i]), key=str(b["key"][i]), error=str(b["error"][i]),
                        image=b["image_embedding"][i], text=b["text_embedding"][i] if b["has_caption"][i] else None,
                        caption=str(b["caption"][i]) if b["has_caption"][i] else None))
                    if b["error"][i]:
                        n_err += 1
                    else:
                        n_ok += 1
                if parts_left[sid] == 0 and len(pending.get(sid, [])) == expected[sid]:
                    acc = ShardRows(by_index[sid])
                    for r in sorted(pending.pop(sid, []), key=lambda r: r["order"]):
                        if r["error"]:
                            acc.errors.append(EmbedError(r["key"], r["error"]))
                        else:
                            acc.add(r["key"], r["image"], r["text"], r["caption"])
                    acc.write(store, with_text, info["embed_dim"], stages)
                    del expected[sid], parts_left[sid]
            counts["images"] += n_ok
            counts["failures"] += n_err
            if progress is not None:
                progress(n_ok, n_err)
        try:
            details = dict(ray_stats=ds.stats())
        except Exception as e:  # noqa: BLE001 - stats are a report, never a failure
            details = dict(ray_stats=f"unavailable: {e}")
        return dict(images=counts["images"], failures=counts["failures"], stages=dict(stages.seconds), notes=notes,
                    first_batch_s=first, details=details)
    finally:
        if started:
            ray.shutdown()

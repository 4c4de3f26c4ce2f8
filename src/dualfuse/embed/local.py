"""The one-process pipeline (``--engine local``): CPU threads read and decode while the GPU runs the model.

    producer thread: shard items -> batches of ``batch`` items; each item handed to the worker pool, which reads
        the file (``read``) and decodes it straight into a slot of a pinned uint8 buffer [B, S, S, 3]
        (``decode``); a bounded queue holds ``prefetch`` batches in flight, and only prefetch + 2 buffers exist
    main thread: waits for a batch's slots; copies the buffer to the device on a second stream (``h2d``); the
        model runs on the current stream once the copy is done (``model``: frames -> unit embeddings, and the
        captions' text embeddings), the embeddings come back into pinned memory without a host sync; the batch
        before is collected meanwhile (its buffer returns to the pool) and each finished shard is written
        (``write``).

Every batch runs at the full batch size (a short last batch and failed slots are padded), so the fused executor
builds one runner (one CUDA graph) for the whole run. With ``decode="gpu"`` the workers only read JPEGs, which
nvJPEG decodes in a batch on the device; other formats still decode on the CPU threads.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from .config import STAGES, EmbedError
from .decode import decode_frame, is_jpeg, turned_jpeg
from .sources import Item, Shard, Source


class Stages:
    """Seconds per stage, added from several threads."""

    def __init__(self):
        self.seconds = {s: 0.0 for s in STAGES}
        self._lock = threading.Lock()

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] += seconds


@dataclass
class ShardRows:
    """The rows of one shard as they come back, written when complete."""

    shard: Shard
    keys: list = field(default_factory=list)
    image: list = field(default_factory=list)
    text: list = field(default_factory=list)
    captions: list = field(default_factory=list)
    errors: list = field(default_factory=list)

    def add(self, key, image_vec, text_vec=None, caption=None):
        self.keys.append(key)
        self.image.append(image_vec)
        self.text.append(text_vec)
        self.captions.append(caption)

    def write(self, store, with_text: bool, dim: int, stages: Stages) -> None:
        t0 = time.perf_counter()
        image = np.stack(self.image).astype(np.float32) if self.image else np.zeros((0, dim), np.float32)
        store.write_shard(self.shard.index, self.keys, image, self.text if with_text else None,
                          self.captions if with_text else None, self.errors)
        stages.add("write", time.perf_counter() - t0)


def decode_item(item: Item, size: int, stages: Stages, gpu_jpeg: bool = False):
    """Read and decode one item: (frame uint8 [S, S, 3] | None, JPEG bytes left to the GPU | None, error | None)."""
    if item.error is not None:
        return None, None, item.error
    t0 = time.perf_counter()
    try:
        data = item.read()
    except OSError as e:
        return None, None, f"unreadable ({e.strerror or type(e).__name__})"
    t1 = time.perf_counter()
    stages.add("read", t1 - t0)
    if gpu_jpeg and is_jpeg(data) and not turned_jpeg(data):
        return None, data, None
    try:
        frame = decode_frame(data, size)
    except ValueError as e:
        return None, None, str(e)
    finally:
        stages.add("decode", time.perf_counter() - t1)
    return frame, None, None


@dataclass
class Batch:
    shard: Shard
    items: list
    futures: list
    buffer: torch.Tensor | None
    last: bool  # the shard's last batch


def run_local(source: Source, shards: list[Shard], encoder, store, *, batch: int, workers: int, prefetch: int,
              decode: str, with_text: bool, progress=None) -> dict:
    """Embed ``shards`` into ``store``; returns dict(images, failures, stages, first_batch_s, details):
    ``details["waited_for_decode_s"]``: how long the main thread waited for decoded batches (with the GPU
    possibly idle: near 0 means decoding kept up with the model)."""
    stages = Stages()
    dev = encoder.device
    cuda = dev.type == "cuda"
    size, dim = encoder.image_size, encoder.embed_dim
    gpu_dec = None
    if decode == "gpu":
        from .decode import GpuJpegDecoder

        gpu_dec = GpuJpegDecoder(size, dev)
    n_buffers = prefetch + 2
    free: queue.Queue = queue.Queue()
    for _ in range(n_buffers):
        free.put(torch.empty((batch, size, size, 3), dtype=torch.uint8, pin_memory=cuda))
    ready: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dualfuse-decode")

    def fill(item, buf, slot):
        frame, jpeg, err = decode_item(item, size, stages, gpu_dec is not None)
        if frame is not None:
            buf[slot].numpy()[...] = frame
        return jpeg, err

    def produce():
        try:
            for shard, items, last in _batches_ended(source, shards, batch, stages):
                buf = None
                while buf is None:
                    if stop.is_set():
                        return
                    try:
                        buf = free.get(timeout=0.1)
                    except queue.Empty:
                        continue
                futures = [pool.submit(fill, item, buf, i) for i, item in enumerate(items)]
                while not stop.is_set():
                    try:
                        ready.put(Batch(shard, items, futures, buf, last), timeout=0.1)
                        break
                    except queue.Full:
                        continue
            ready.put(None)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            ready.put(e)

    producer = threading.Thread(target=produce, name="dualfuse-embed-reader", daemon=True)
    copy_stream = torch.cuda.Stream(dev) if cuda else None
    inflight: list = []
    rows: dict[int, ShardRows] = {}
    counts = dict(images=0, failures=0)
    t_start = time.perf_counter()
    first = []
    waited = [0.0]  # the main thread waiting for decoded batches (the GPU may idle meanwhile)

    def collect(job):
        b, ok, errors, img_host, txt_host, ev = job
        if cuda:
            ev["done"].synchronize()
            stages.add("h2d", ev["h0"].elapsed_time(ev["h1"]) / 1e3)
            stages.add("model", ev["m0"].elapsed_time(ev["m1"]) / 1e3)
        if b.buffer is not None:
            free.put(b.buffer)
        acc = rows.setdefault(b.shard.index, ShardRows(b.shard))
        acc.errors.extend(errors)
        for slot in ok:
            it = b.items[slot]
            acc.add(it.key, img_host[slot].numpy().copy(),
                    None if txt_host is None or it.caption is None else txt_host[slot].numpy().copy(), it.caption)
        counts["images"] += len(ok)
        counts["failures"] += len(errors)
        if not first:
            first.append(time.perf_counter() - t_start)
        if progress is not None:
            progress(len(ok), len(errors))
        if b.last:
            rows.pop(b.shard.index).write(store, with_text, dim, stages)

    def submit(b: Batch):
        t_wait = time.perf_counter()
        results = [f.result() for f in b.futures]
        waited[0] += time.perf_counter() - t_wait
        errors = [EmbedError(b.items[i].key, err) for i, (_, err) in enumerate(results) if err is not None]
        ok = [i for i, (_, err) in enumerate(results) if err is None]
        jpeg_slots = [i for i, (jpeg, err) in enumerate(results) if jpeg is not None]
        if not ok:
            return (b, ok, errors, None, None, {}) if not cuda else _empty_job(b, errors)
        captions = None
        if with_text:
            captions = [b.items[i].caption or "" if i < len(b.items) else "" for i in range(batch)]
        ev = {}
        if cuda:
            ev = {k: torch.cuda.Event(enable_timing=True) for k in ("h0", "h1", "m0", "m1")}
            ev["done"] = torch.cuda.Event()
            with torch.cuda.stream(copy_stream):
                ev["h0"].record()
                x = b.buffer.to(dev, non_blocking=True)
                ev["h1"].record()
            torch.cuda.current_stream(dev).wait_stream(copy_stream)
            x.record_stream(torch.cuda.current_stream(dev))
        else:
            t0 = time.perf_counter()
            x = b.buffer
        if jpeg_slots:
            t1 = time.perf_counter()
            frames = gpu_dec([results[i][0] for i in jpeg_slots])
            stages.add("decode", time.perf_counter() - t1)
            for i, fr in zip(jpeg_slots, frames):
                if fr is None:  # nvJPEG refused it: the CPU decodes it
                    try:
                        fr = torch.from_numpy(decode_frame(results[i][0], size)).to(dev)
                    except ValueError as e:
                        errors.append(EmbedError(b.items[i].key, str(e)))
                        ok.remove(i)
                        continue
                x[i].copy_(fr)
        if cuda:
            ev["m0"].record()
        img = encoder.encode_frames(x)
        txt = encoder.encode_texts(captions) if with_text else None
        if cuda:
            ev["m1"].record()
            img_host = torch.empty(img.shape, dtype=torch.float32, pin_memory=True)
            img_host.copy_(img, non_blocking=True)
            txt_host = None
            if txt is not None:
                txt_host = torch.empty(txt.shape, dtype=torch.float32, pin_memory=True)
                txt_host.copy_(txt, non_blocking=True)
            ev["done"].record()
        else:
            img_host, txt_host = img, txt
            stages.add("model", time.perf_counter() - t0)
        return b, ok, errors, img_host, txt_host, ev

    def _empty_job(b, errors):
        ev = {k: torch.cuda.Event(enable_timing=True) for k in ("h0", "h1", "m0", "m1")}
        for k in ("h0", "h1", "m0", "m1"):
            ev[k].record()
        ev["done"] = torch.cuda.Event()
        ev["done"].record()
        return b, [], errors, None, None, ev

    producer.start()
    try:
        while True:
            t_wait = time.perf_counter()
            b = ready.get()
            waited[0] += time.perf_counter() - t_wait
            if isinstance(b, BaseException):
                raise b
            if b is None:
                break
            inflight.append(submit(b))
            if len(inflight) > 1:  # the batch before runs (or ran) on the device meanwhile
                collect(inflight.pop(0))
        while inflight:
            collect(inflight.pop(0))
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        producer.join(timeout=5)
    return dict(images=counts["images"], failures=counts["failures"], stages=dict(stages.seconds),
                first_batch_s=first[0] if first else None,
                details=dict(waited_for_decode_s=waited[0], decode_threads=workers, buffers=n_buffers))


def _batches_ended(source: Source, shards: list[Shard], size: int, stages: Stages):
    """(shard, items, last): batches of up to ``size`` items; each shard ends with last=True (an empty shard
    gives one empty batch, so that it is still written)."""
    for shard in shards:
        it = source.items(shard)
        items: list[Item] = []
        prev = None
        while True:
            t0 = time.perf_counter()
            item = next(it, None)
            stages.add("read", time.perf_counter() - t0)
            if item is None:
                break
            items.append(item)
            if len(items) == size:
                if prev is not None:
                    yield shard, prev, False
                prev, items = items, []
        if prev is not None:
            if items:
                yield shard, prev, False
            else:
                yield shard, prev, True
                continue
        yield shard, items, True

"""EmbedConfig (the options of one run, validated once) and EmbedResult (what the run did)."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

STAGES = ("read", "decode", "h2d", "model", "write")
ENGINES = ("local", "ray")
INDEXES = ("none", "faiss")
DECODERS = ("cpu", "gpu")
SCHEMA = "dualfuse.embed/1"


@dataclass
class EmbedConfig:
    """Options of :func:`dualfuse.embed.run_embed`.

    ``images``: a folder (recursive: jpg, jpeg, png, webp), a text file of image paths (one a line; relative paths
    are relative to the file's folder), a Parquet file or folder of Parquet files with an image-bytes column
    (``image_column``), or WebDataset tar shards (a ``.tar`` file, a folder of them, or a brace pattern
    ``shards-{000..009}.tar``). ``out``: the output folder. ``captions``: a file of ``path<TAB>caption`` lines
    (or captions.json / .jsonl, as ``dualfuse eval`` reads them) for folder and list inputs; ``text_column``: the
    caption column of a Parquet input, or the caption member's extension in tar shards (``txt``).
    ``executor``: ``fused`` (default; takes uint8 frames) or any other executor name (``eager`` for tests).
    ``decode``: ``cpu`` (PIL on ``workers`` threads) or ``gpu`` (nvJPEG through torchvision on batches; PNG / WebP
    and JPEGs nvJPEG refuses still go to the CPU threads). ``shard_size``: images per output shard (tar input:
    one output shard per tar file). ``prefetch``: decoded batches kept ready ahead of the model."""

    model: str
    images: str
    out: str
    captions: str | None = None
    text_column: str | None = None
    image_column: str = "image"
    key_column: str | None = None
    batch: int = 256
    engine: str = "local"
    index: str = "none"
    executor: str = "fused"
    dtype: str | None = None
    device: str | None = None
    decode: str = "cpu"
    workers: int | None = None
    prefetch: int = 3
    shard_size: int = 10_000
    ray_address: str | None = None
    ray_gpus: int | None = None
    ray_cpus: int | None = None
    limit: int | None = None

    def __post_init__(self):
        def positive(name, value, allow_none=False):
            if value is None and allow_none:
                return
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')}: expected a positive integer, got {value!r}")

        if not isinstance(self.model, str) or not self.model:
            raise ValueError("--model: expected a preset name or a model directory")
        if not isinstance(self.images, str) or not self.images:
            raise ValueError("--images: expected a folder, a list file, Parquet or tar shards")
        if not isinstance(self.out, str) or not self.out:
            raise ValueError("--out: expected an output folder")
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise ValueError(f"--out {self.out}: exists and is not a folder")
        if self.captions is not None and self.text_column is not None:
            raise ValueError("--captions and --text-column: give one (a captions file for folders and lists, a "
                             "column for Parquet, an extension for tar shards)")
        if self.captions is not None and not os.path.isfile(self.captions):
            raise ValueError(f"--captions {self.captions}: no such file")
        positive("batch", self.batch)
        positive("prefetch", self.prefetch)
        positive("shard_size", self.shard_size)
        positive("workers", self.workers, allow_none=True)
        if self.ray_gpus is not None and (not isinstance(self.ray_gpus, int) or self.ray_gpus < 0):
            raise ValueError(f"--ray-gpus: expected a count >= 0 (0: actors on CPU), got {self.ray_gpus!r}")
        positive("ray_cpus", self.ray_cpus, allow_none=True)
        positive("limit", self.limit, allow_none=True)
        if self.engine not in ENGINES:
            raise ValueError(f"--engine: expected one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.index not in INDEXES:
            raise ValueError(f"--index: expected one of {', '.join(INDEXES)}, got {self.index!r}")
        if self.decode not in DECODERS:
            raise ValueError(f"--decode: expected one of {', '.join(DECODERS)}, got {self.decode!r}")
        if self.ray_address is not None and self.engine != "ray":
            raise ValueError("--ray-address needs --engine ray")
        for name in ("ray_gpus", "ray_cpus"):
            if getattr(self, name) is not None and self.engine != "ray":
                raise ValueError(f"--{name.replace('_', '-')} needs --engine ray")
        if self.ray_cpus is not None and self.ray_address is not None:
            raise ValueError("--ray-cpus sizes the Ray started for the run; a cluster (--ray-address) has its own")
        if self.engine == "ray" and self.decode == "gpu":
            raise ValueError("--decode gpu is for the local engine; --engine ray decodes on the cluster's CPU tasks")
        if self.engine == "ray" and self.device is not None:
            raise ValueError("--device is for the local engine; --engine ray puts one model on each GPU "
                             "(--ray-gpus N, 0 for one CPU actor)")
        if self.dtype is not None:
            from ..executors.base import resolve_dtype

            resolve_dtype(self.dtype)  # raises the usual message

    @property
    def num_workers(self) -> int:
        return self.workers or max(1, min(16, (os.cpu_count() or 2)))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EmbedError:
    key: str
    reason: str


@dataclass
class EmbedResult:
    """What a run did. ``stages``: seconds spent per stage (read and decode: summed over the worker threads, so
    they can exceed the wall time; h2d and model: device time on CUDA (events), wall time on CPU; write: the
    writer). ``images``: embedded in this run (``skipped_shards`` were finished before and not redone)."""

    out: str
    model: str
    executor: str
    dtype: str
    device: str
    card: str
    engine: str
    decode: str
    batch: int
    images: int
    failures: int
    wall_s: float  # the engine's run: first read to last shard written (images_per_s divides by it)
    setup_s: float  # before it: opening the input, loading the model (Ray: starting it), the output folder
    stages: dict
    shards_written: int
    shards_skipped: int
    first_batch_s: float | None = None  # engine start to the first batch of embeddings back (start-up, warm-up)
    errors: list[EmbedError] = field(default_factory=list)
    index: str | None = None
    details: dict = field(default_factory=dict)  # engine-specific (Ray: its per-operator stats)
    notes: list[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s if self.wall_s > 0 else float("nan")

    @property
    def steady_images_per_s(self) -> float | None:
        """Images/s after the first batch came back (without start-up: Ray actors loading the model)."""
        if self.first_batch_s is None or self.wall_s <= self.first_batch_s or self.images <= self.batch:
            return None
        return (self.images - self.batch) / (self.wall_s - self.first_batch_s)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["schema"] = SCHEMA
        d["images_per_s"] = self.images_per_s
        d["steady_images_per_s"] = self.steady_images_per_s
        d["errors"] = [asdict(e) for e in self.errors]
        return d

"""`dualfuse stream`: zero-shot labels for a video, frame by frame, with the latency of each part of the loop.

    dualfuse stream --video clip.mp4 --prompts "a dog,a cat,a car" [--model M] [--executor fused]
                    [--weights fp16|int8] [--sms N] [--out DIR] [--json P]
    dualfuse stream --synthetic 200 --prompts "a dog,a cat"

The loop, per frame: **decode** (a video frame, or a deterministic synthetic one, as uint8 HWC on the host) ->
**h2d** (the uint8 frame copied to the device, resized on its shorter side to the model's image size and
center-cropped there, still uint8) -> **model** (the image tower: the fused executor takes uint8 frames and folds
the image mean/std into its patch embedding; other executors get the frame normalized on the device first) ->
**post** (logits against the prompts' embeddings, softmax for CLIP / sigmoid for SigLIP, top-k, labels back on
the host). The prompts' text embeddings are computed once, before the loop. Each part is timed with
perf_counter, with a device synchronize at its end on CUDA (so the parts add up to the frame's latency; the
synchronizes cost a few µs each, which an unsynchronized pipeline would not pay). FPS = frames / wall time of
the loop.

``--sms N`` runs the loop inside a CUDA green context of N SMs, in a process of its own (as ``dualfuse bench
--sms``; dualfuse.green): SMs only -- memory bandwidth, clocks and L2 stay the big card's.

Library: :func:`run_stream` returns a :class:`StreamResult` (per-frame records and a summary); the CLI prints.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import torch

from .config import FusedConfig, config_of
from .timing import percentile

PARTS = ("decode", "h2d", "model", "post")
VIDEO_PACKAGES = "opencv-python (cv2), av (PyAV) or torchcodec"
SCHEMA = "dualfuse.stream/1"


@dataclass
class FrameRecord:
    index: int
    label: str  # top-1 prompt
    score: float  # its probability (softmax over the prompts for CLIP, sigmoid for SigLIP)
    top_k: list[tuple[str, float]]
    decode_ms: float
    h2d_ms: float
    model_ms: float
    post_ms: float

    @property
    def total_ms(self) -> float:
        return self.decode_ms + self.h2d_ms + self.model_ms + self.post_ms


@dataclass
class StreamResult:
    model: str
    executor: str
    weights: str
    device: str
    card: str
    dtype: str
    source: str  # "video:PATH" or "synthetic:N"
    prompts: list[str]
    frames: list[FrameRecord]
    wall_s: float  # the loop, first decode to last label
    text_ms: float  # the prompts' embeddings, once
    warmup_frames: int
    sms: int | None = None
    green_context: dict | None = None
    plot: str | None = None
    notes: list[str] = field(default_factory=list)
    fused_config: FusedConfig | None = None  # the fused executor's options (None for the stock executors)
    stand_in: dict | None = None  # dualfuse.standin.StandInInfo.to_dict() of a stand-in run

    @property
    def fps(self) -> float:
        return len(self.frames) / self.wall_s if self.wall_s > 0 else float("nan")

    def summary(self) -> dict:
        out = dict(frames=len(self.frames), fps=self.fps, wall_s=self.wall_s, text_ms=self.text_ms)
        for part in PARTS + ("total",):
            vals = [getattr(f, f"{part}_ms") for f in self.frames]
            out[part] = dict(p50_ms=percentile(vals, 50), p99_ms=percentile(vals, 99),
                             mean_ms=sum(vals) / len(vals) if vals else float("nan"))
        counts: dict[str, int] = {}
        for f in self.frames:
            counts[f.label] = counts.get(f.label, 0) + 1
        out["top1_counts"] = counts
        return out

    def to_dict(self) -> dict:
        d = dict(schema=SCHEMA, model=self.model, executor=self.executor, weights=self.weights, device=self.device,
                 card=self.card, dtype=self.dtype, source=self.source, prompts=list(self.prompts), sms=self.sms,
                 green_context=self.green_context, stand_in=self.stand_in, warmup_frames=self.warmup_frames,
                 plot=self.plot, notes=list(self.notes), summary=self.summary(), parts=list(PARTS),
                 fused_config=self.fused_config.to_dict() if self.fused_config is not None else None)
        d["frames"] = [dict(asdict(f), total_ms=f.total_ms) for f in self.frames]
        return d


# ------------------------------------------------------------------------------------------------ sources


def synthetic_frames(n: int, height: int = 240, width: int = 320, seed: int = 0) -> Iterator[torch.Tensor]:
    """``n`` deterministic uint8 [H, W, 3] frames: a smooth gradient that drifts, plus seeded noise."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"--synthetic: expected a positive number of frames, got {n!r}")
    g = torch.Generator().manual_seed(seed)
    ys = torch.linspace(0, 1, height).view(height, 1, 1)
    xs = torch.linspace(0, 1, width).view(1, width, 1)
    phase = torch.tensor([0.0, 2.1, 4.2]).view(1, 1, 3)
    for i in range(n):
        base = 0.5 + 0.5 * torch.sin(6.0 * (xs + ys) + phase + 0.2 * i)
        noise = torch.randint(-20, 21, (height, width, 3), generator=g).float()
        yield (base * 235 + noise).clamp(0, 255).to(torch.uint8)


def _video_backend():
    for name in ("cv2", "av", "torchcodec"):
        try:
            __import__(name if name != "torchcodec" else "torchcodec.decoders")
            return name
        except Exception:  # noqa: BLE001 - not installed or broken: try the next
            continue
    return None


def video_frames(path: str, max_frames: int | None = None) -> Iterator[torch.Tensor]:
    """Frames of a video file as uint8 [H, W, 3] RGB tensors, decoded on the host (cv2, PyAV or torchcodec)."""
    if not os.path.isfile(path):
        raise ValueError(f"--video {path}: no such file")
    backend = _video_backend()
    if backend is None:
        raise ValueError(f"--video: decoding a video needs one of {VIDEO_PACKAGES}; none is installed here "
                         f"(pip install opencv-python, or pip install av), or use --synthetic N")
    count = 0
    if backend == "cv2":
        import cv2

        cap = cv2.VideoCapture(path)
        if not cap.isOpened():
            raise ValueError(f"--video {path}: OpenCV cannot open it (not a video, or an unsupported codec)")
        try:
            while max_frames is None or count < max_frames:
                ok, bgr = cap.read()
                if not ok:
                    break
                count += 1
                yield torch.from_numpy(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        finally:
            cap.release()
    elif backend == "av":
        import av

        try:
            container = av.open(path)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"--video {path}: PyAV cannot open it: {e}") from None
        with container:
            for frame in container.decode(video=0):
                if max_frames is not None and count >= max_frames:
                    break
                count += 1
                yield torch.from_numpy(frame.to_ndarray(format="rgb24"))
    else:
        from torchcodec.decoders import VideoDecoder

        dec = VideoDecoder(path, dimension_order="NHWC")
        for i in range(len(dec)):
            if max_frames is not None and i >= max_frames:
                break
            yield dec[i]
    if count == 0 and backend != "torchcodec":
        raise ValueError(f"--video {path}: no frames could be decoded")


# ------------------------------------------------------------------------------------------------ the loop


def resize_center_crop(frame: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [H, W, 3] -> uint8 [1, size, size, 3]: the shorter side resized to ``size`` (bilinear, antialiased),
    the longer one center-cropped -- on the frame's device."""
    import torch.nn.functional as F

    if frame.dim() != 3 or frame.shape[-1] != 3 or frame.dtype != torch.uint8:
        raise ValueError(f"frame: expected a uint8 [H, W, 3] tensor, got {tuple(frame.shape)} {frame.dtype}")
    h, w = frame.shape[:2]
    if (h, w) == (size, size):
        return frame.unsqueeze(0)
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = frame.permute(2, 0, 1).unsqueeze(0).float()
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[:, :, top:top + size, left:left + size]
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _parse_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        prompts = prompts.split(",")
    out = [p.strip() for p in (prompts or []) if p and p.strip()]
    if len(out) < 1:
        raise ValueError("--prompts: expected at least one prompt, comma-separated, e.g. \"a dog,a cat\"")
    return out


def _build_executor(model, executor: str, weights: str, dtype, device, config: FusedConfig | None = None,
                    stand=None):
    """(source model, executor). ``config``: the fused executor's options (``weights="int8"`` overrides its
    field); ``stand``: (StandInConfig, StandInInfo) of a stand-in run, whose GEMM overrides the fused executor
    gets."""
    from . import executors, load
    from . import standin as SI

    if weights not in ("fp16", "int8"):
        raise ValueError(f"--weights: expected fp16 or int8, got {weights!r}")
    if weights == "int8" and executor != "fused":
        raise ValueError(f"--weights int8: only the fused executor quantizes its weights (dualfuse.quantize), "
                         f"got --executor {executor}")
    if config is not None and executor != "fused":
        raise ValueError(f"config: the fused executor's options (dualfuse.FusedConfig), got --executor {executor}")
    source = load(model, seed=0) if isinstance(model, str) else model
    kwargs = {}
    if executor == "fused":  # FusedExecutor(config=...), weights="int8": weight-only int8
        cfg = (config or FusedConfig()).with_overrides(**({"weights": "int8"} if weights == "int8" else {}))
        kwargs = SI.executor_kwargs(executor, *stand, cfg) if stand is not None else {"config": cfg}
    return source, executors.get(executor, source, dtype=dtype, device=device, **kwargs)


def run_stream(model="clip-vit-b-32", prompts="a photo of a dog,a photo of a cat", *, video: str | None = None,
               synthetic: int | None = None, executor: str = "fused", weights: str = "fp16", dtype=None,
               device=None, top_k: int = 3, warmup: int = 3, max_frames: int | None = None,
               frame_size: tuple[int, int] = (240, 320), sms: int | None = None, out_dir: str | None = None,
               progress: Callable[[FrameRecord], None] | None = None, config: FusedConfig | None = None,
               stand_in=None) -> StreamResult:
    """Run the loop (see the module docstring) and return its per-frame records and summary.

    One of ``video`` (a file path) or ``synthetic`` (a frame count). ``sms``: enter a green context of that many
    SMs first (this process's CUDA must be untouched; the CLI runs it in a child process). ``out_dir``: write the
    latency-over-time PNG there. ``progress``: called with each frame's record. ``stand_in``: a Jetson target name or
    dualfuse.standin.StandInConfig: the edge-regime stand-in (its green context entered here instead of ``sms``,
    the executor's weights host-mapped, the fused executor's GEMM config with the stand-in's overrides, the
    bandwidth measured and reported). ``config``: the fused executor's options (dualfuse.FusedConfig; ``weights``
    "int8" overrides its field)."""
    prompts = _check_options(prompts, video, synthetic, top_k, max_frames)
    from . import standin as SI

    stand_cfg = SI.resolve(stand_in)
    green_info = _enter_green_context(stand_cfg, sms)
    frames = video_frames(video, max_frames) if video is not None else synthetic_frames(synthetic, *frame_size)
    source_name = f"video:{video}" if video is not None else f"synthetic:{synthetic}"
    stand_info = SI.measure(stand_cfg, green_info) if stand_cfg is not None else None
    src, ex = _build_executor(model, executor, weights, dtype, device, config,
                              (stand_cfg, stand_info) if stand_cfg is not None else None)
    if stand_cfg is not None:
        from .hostmem import place_executor

        place_executor(ex, "host")
    pipe = _Pipeline.open(src, ex, prompts, top_k)
    records, wall = _run_frames(pipe, frames, prompts, warmup, frame_size, progress)
    if not records:
        raise ValueError(f"stream: {source_name} gave no frames")
    result = _stream_result(model, ex, pipe, prompts, records, wall, source_name, warmup, sms, stand_cfg, green_info,
                            stand_info)
    if out_dir:
        result.plot = plot_latency(result, os.path.join(out_dir, "stream-latency.png"))
    return result


# ------------------------------------------------------------------------------------ run_stream's steps


def _check_options(prompts, video, synthetic, top_k, max_frames) -> list[str]:
    """The prompts parsed; ValueError for a bad source, top-k or frame limit."""
    if (video is None) == (synthetic is None):
        raise ValueError("stream: expected exactly one of --video PATH or --synthetic N")
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"--top-k: expected a positive int, got {top_k!r}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"--max-frames: expected a positive int, got {max_frames!r}")
    return _parse_prompts(prompts)


def _enter_green_context(stand_cfg, sms: int | None) -> dict | None:
    """Enter the stand-in's green context, or one of ``sms`` SMs; what was entered (None: neither asked for)."""
    from . import standin as SI

    if stand_cfg is not None:
        if sms is not None:
            raise SI.StandInError("--stand-in sets the SM count itself (the target's): drop --sms")
        return SI.enter(stand_cfg)
    if sms is not None:
        from . import green

        return green.enter(int(sms))
    return None


@dataclass
class _Pipeline:
    """The per-frame work of one executor: frame to device, image tower, scores against the prompts' embeddings."""

    ex: object
    device: torch.device
    cuda: bool
    size: int  # the model's image size
    normalize: Callable | None  # frames -> normalized pixels (None: the executor takes uint8 frames)
    mean: object
    std: object
    siglip: bool  # sigmoid scores (else softmax over the prompts)
    k: int  # top-k
    txt: torch.Tensor | None = None  # the prompts' text embeddings
    text_ms: float = float("nan")  # their time, once

    @classmethod
    def open(cls, src, ex, prompts: list[str], top_k: int) -> "_Pipeline":
        """Check the model takes frames, pick the frames' normalization and embed the prompts (timed)."""
        from .adapters import image_normalization
        from .data import make_tokenizer
        from .executors.base import normalize_frames

        dev, io = ex.device, ex.io
        if io.naflex:
            raise ValueError(f"stream: {io.name} is a SigLIP2 NaFlex model, which takes patch sequences, not frames")
        takes_frames = ex.name == "fused" and getattr(ex, "fallback", None) is None
        mean = std = None
        if not takes_frames:
            mean, std = image_normalization(src if not isinstance(src, str) else ex.spec, ex.family,
                                            channels=io.channels)
        pipe = cls(ex=ex, device=dev, cuda=dev.type == "cuda", size=io.image_size,
                   normalize=None if takes_frames else normalize_frames, mean=mean, std=std,
                   siglip=io.logit_bias is not None, k=min(top_k, len(prompts)))
        spec = ex.spec
        tok = make_tokenizer(spec) if spec is not None else None
        if tok is None:
            raise ValueError(f"stream: no tokenizer for {io.name} (the model's towers are not covered by dualfuse)")
        ids = tok(prompts).to(dev)
        t0 = time.perf_counter()
        pipe.txt = ex.encode_text(ids)
        pipe.sync()
        pipe.text_ms = (time.perf_counter() - t0) * 1e3
        return pipe

    def sync(self) -> None:
        """Wait for the device (CUDA only)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def step(self, frame_host):
        """One frame: (top-k scores, their prompt indices, h2d ms, model ms, post ms)."""
        ta = time.perf_counter()
        x = frame_host.to(self.device, non_blocking=False)
        x = resize_center_crop(x, self.size)
        if self.normalize is not None:
            x = self.normalize(x.permute(0, 3, 1, 2), self.mean, self.std, dtype=self.ex.dtype)
        self.sync()
        tb = time.perf_counter()
        img = self.ex.encode_image(x)
        self.sync()
        tc = time.perf_counter()
        per_image, _ = self.ex.logits(img, self.txt)
        p = per_image.float()
        p = torch.sigmoid(p) if self.siglip else torch.softmax(p, dim=-1)
        vals, idx = p[0].topk(self.k)
        vals, idx = vals.tolist(), idx.tolist()  # back on the host: waits for the device
        td = time.perf_counter()
        return vals, idx, (tb - ta) * 1e3, (tc - tb) * 1e3, (td - tc) * 1e3


def _run_frames(pipe: _Pipeline, frames, prompts: list[str], warmup: int, frame_size, progress):
    """(frame records, wall seconds of the loop): the warm-up frames, then every frame of ``frames``, timed."""
    # warm-up: the fused executor builds (and on CUDA captures) its uint8-frame runner at the first call
    for frame in synthetic_frames(max(1, warmup), *frame_size, seed=1) if warmup else ():
        pipe.step(frame)
    records: list[FrameRecord] = []
    start = time.perf_counter()
    it = iter(frames)
    i = 0
    while True:
        td0 = time.perf_counter()
        try:
            frame = next(it)
        except StopIteration:
            break
        decode_ms = (time.perf_counter() - td0) * 1e3
        vals, idx, h2d_ms, model_ms, post_ms = pipe.step(frame)
        rec = FrameRecord(i, prompts[idx[0]], vals[0], [(prompts[j], v) for j, v in zip(idx, vals)], decode_ms, h2d_ms,
                          model_ms, post_ms)
        records.append(rec)
        if progress is not None:
            progress(rec)
        i += 1
    return records, time.perf_counter() - start


def _run_notes(cuda: bool, green_info, stand_info) -> list[str]:
    """The result's notes: how the parts were timed, what the green context or stand-in leaves out, a CPU run."""
    notes = ["per-part times: perf_counter around each part" + (", device synchronized at each part's end"
                                                               if cuda else "")]
    if green_info and stand_info is None:
        notes.append(green_info["not_emulated"])
    if stand_info is not None:
        notes += stand_info.lines()
    if not cuda:
        notes.append("CPU run" + (" (Triton interpreter): latencies say nothing about a GPU"
                                  if os.environ.get("TRITON_INTERPRET") == "1" else ""))
    return notes


def _stream_result(model, ex, pipe: _Pipeline, prompts, records, wall, source_name, warmup, sms, stand_cfg,
                   green_info, stand_info) -> StreamResult:
    """The StreamResult of the loop, with what the executor ran (weights, dtype, card) and the notes."""
    from .executors.base import dtype_name

    dev, cuda = pipe.device, pipe.cuda
    card = torch.cuda.get_device_name(dev) if cuda else "cpu"
    notes = _run_notes(cuda, green_info, stand_info)
    # weights: what the executor runs: "int8" / "fp8" (the fused executor's quantized GEMM weights), or the
    # executor's dtype (what "fp16" weights are on a CPU run: fp32 by default; also what a fused executor that fell
    # back runs)
    fmt = getattr(ex, "weight_format", "fp16")
    quantized = fmt != "fp16" and getattr(ex, "fallback", None) is None
    if fmt != "fp16" and not quantized:
        notes.append(f"--weights {fmt} not applied: the fused executor fell back ({ex.fallback}); "
                     f"{dtype_name(ex.dtype)} weights")
    return StreamResult(model=ex.io.name or str(model), executor=ex.name,
                        weights=fmt if quantized else dtype_name(ex.dtype), device=str(dev), card=card,
                        dtype=dtype_name(ex.dtype), source=source_name, prompts=prompts, frames=records,
                        wall_s=wall, text_ms=pipe.text_ms, warmup_frames=warmup,
                        sms=stand_cfg.sms if stand_cfg is not None else sms, green_context=green_info, notes=notes,
                        fused_config=config_of(ex), stand_in=stand_info.to_dict() if stand_info is not None else None)


def plot_latency(result: StreamResult, path: str) -> str:
    """Per-frame latency over time, stacked by part, with the p50 / p99 of the total: a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    xs = [f.index for f in result.frames]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.stackplot(xs, *[[getattr(f, f"{p}_ms") for f in result.frames] for p in PARTS], labels=PARTS, alpha=0.8)
    s = result.summary()["total"]
    for q, style in (("p50_ms", "--"), ("p99_ms", ":")):
        ax.axhline(s[q], color="black", linestyle=style, linewidth=1, label=f"total {q[:3]} {s[q]:.2f} ms")
    ax.set_xlabel("frame")
    ax.set_ylabel("latency (ms)")
    where = result.card + (f", {result.sms} SMs (green context)" if result.sms else "")
    ax.set_title(f"dualfuse stream: {result.model} · {result.executor} · {result.weights} · {where} · "
                 f"{result.fps:.1f} FPS", fontsize=9)
    ax.legend(loc="upper right", fontsize=7, ncol=3)
    ax.set_xlim(min(xs), max(max(xs), min(xs) + 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

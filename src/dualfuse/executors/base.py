"""What every executor shares: the interface, device/dtype resolution, input validation, and the one
place that knows how to call a source model's towers.

Interface (every executor, stock or fused)::

    ex = dualfuse.executors.get("graph", model, dtype="fp16", device="cuda")
    image_embeds, text_embeds = ex.encode(pixel_values, input_ids)
    image_embeds = ex.encode_image(pixel_values)
    text_embeds = ex.encode_text(input_ids)
    logits_per_image, logits_per_text = ex.logits(image_embeds, text_embeds)

Embeddings are unnormalized, exactly what HF ``get_image_features``/``get_text_features`` and open_clip
``encode_image``/``encode_text`` return. Inputs go through :func:`validate_inputs` first.
"""
from __future__ import annotations

import copy
import threading
from typing import Callable

import torch

from ..spec import DualEncoderSpec, ModelIO, PatchSequence

DTYPES = {
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


class ExecutorUnavailable(RuntimeError):
    """The executor cannot run here (missing hardware or optional dependency); not a bug in the inputs."""


class NeedsCUDA(ExecutorUnavailable):
    """The executor needs a CUDA device."""


# --------------------------------------------------------------------------------------------- resolution

def resolve_device(device=None) -> torch.device:
    """``None`` -> the current CUDA device if there is one, else CPU. ``"cuda"`` gets an explicit index so that
    it compares equal to ``tensor.device``."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"invalid device {device!r}: expected e.g. 'cpu', 'cuda' or 'cuda:0'") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise NeedsCUDA(f"device {str(device)!r} was asked for, but CUDA is not available on this machine")
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"device cuda:{index} does not exist: this machine has {torch.cuda.device_count()} "
                             "CUDA device(s)")
        device = torch.device("cuda", index)
    return device


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA, fp32 on CPU (half precision on CPU is slow and not what anyone deploys)."""
    return torch.float16 if device.type == "cuda" else torch.float32


def resolve_dtype(dtype=None, device: torch.device | None = None) -> torch.dtype:
    if dtype is None:
        return default_dtype(device if device is not None else resolve_device(None))
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"unsupported dtype {dtype}: expected one of fp16, bf16, fp32")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}: expected one of fp16, bf16, fp32")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


# --------------------------------------------------------------------------------------------- validation

def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {list(x.shape)} on {x.device}"
    return f"a {type(x).__name__}"


def validate_inputs(io, pixel_values=None, input_ids=None, *, device, dtype, check_ids: bool = True,
                    frames=None):
    """Check inputs against the model and return them ready to run: ``(pixel_values, input_ids)``.

    ``io``: the model's :class:`~dualfuse.spec.ModelIO` (a DualEncoderSpec is accepted too).

    - ``pixel_values``: ``[B, C, H, W]`` floating tensor with the model's channels and image size, B >= 1, on the
      executor's device. Any floating dtype is accepted and cast to the executor's ``dtype``; integer pixels
      (e.g. uint8 images that were never normalized) are rejected. SigLIP2 NaFlex models take a
      :class:`~dualfuse.spec.PatchSequence` instead (its processor's ``pixel_values``, ``spatial_shapes`` and
      ``pixel_attention_mask``).
    - ``input_ids``: ``[B, L]`` integer tensor (any integer dtype; converted to int64), B >= 1,
      1 <= L <= the context length, every id in ``[0, vocab_size)``, on the executor's device.
      The range check reads one flag back from the device (a small synchronisation); ``check_ids=False`` skips it.

    - ``frames``: whether uint8 camera frames are accepted as ``pixel_values``: ``None`` (default) rejects them;
      ``"keep"`` returns them as a uint8 ``[B, C, H, W]`` view (no copy; a ``[B, H, W, C]`` frame is permuted),
      for the fused executor, which folds the normalization into its patch embedding; ``(mean, std)`` (one value
      per channel) normalizes them on the device to ``dtype``: ``(x / 255 - mean) / std``. Frames must be
      ``[B, H, W, C]`` (channels-last, what capture and ``torchvision.io.decode_jpeg`` give) or ``[B, C, H, W]``
      at exactly the model's image size.

    Either input may be ``None`` (that tower is not run). Anything else raises ``ValueError`` naming what was
    expected and what came.
    """
    if isinstance(io, DualEncoderSpec):
        io = io.io  # a new ModelIO per call: executors pass their cached one
    if type(device) is not torch.device:
        device = torch.device(device)
    for given, tower, what in ((pixel_values, "vision", "pixel_values"), (input_ids, "text", "input_ids")):
        if given is not None and tower not in io.towers:
            raise ValueError(f"{what}: this model is a single {io.towers[0]} tower and has no {tower} tower; "
                             f"pass {'input_ids' if tower == 'vision' else 'pixel_values'} only")
    if pixel_values is not None:
        if io.naflex:
            if isinstance(pixel_values, torch.Tensor) and pixel_values.dtype == torch.uint8:
                raise ValueError("pixel_values: uint8 frames are not supported for SigLIP2 NaFlex models (they take "
                                 "patch sequences at each image's own resolution): run the model's image "
                                 "processor and pass its pixel_values, spatial_shapes and pixel_attention_mask")
            pixel_values = _validate_patch_sequence(io, pixel_values, device, dtype)
        else:
            pixel_values = _validate_pixels(io, pixel_values, device, dtype, frames)
    if input_ids is not None:
        input_ids = _validate_ids(io, input_ids, device, check_ids)
    return pixel_values, input_ids


def same_device(a: torch.device, b: torch.device) -> bool:
    if a == b:  # the usual case, without asking CUDA for its current device
        return True
    if a.type != b.type:
        return False
    if a.type == "cuda":
        ia = a.index if a.index is not None else torch.cuda.current_device()
        ib = b.index if b.index is not None else torch.cuda.current_device()
        return ia == ib
    return True


def _validate_pixels(emb, px, device, dtype, frames=None):
    """emb: anything with ``channels`` and ``image_size`` (ModelIO). frames: see validate_inputs."""
    if isinstance(px, PatchSequence):
        raise ValueError("pixel_values: got a PatchSequence (SigLIP2 NaFlex patches), but this model takes images "
                         f"[batch, {emb.channels}, {emb.image_size}, {emb.image_size}]")
    b, c, h, w = px.shape if isinstance(px, torch.Tensor) and px.dim() == 4 else (None,) * 4
    if (c == emb.channels and h == emb.image_size and w == emb.image_size and b and px.is_floating_point()
            and same_device(px.device, device)):  # the usual case, without building any message (hot path)
        return px if px.dtype == dtype else px.to(dtype)
    want = f"[batch, {emb.channels}, {emb.image_size}, {emb.image_size}]"
    if not isinstance(px, torch.Tensor):
        raise ValueError(f"pixel_values: expected a torch.Tensor of shape {want}, got {_describe(px)}")
    if px.dtype == torch.uint8 and frames is not None:
        return _validate_frames(emb, px, device, dtype, frames)
    if px.dim() != 4:
        raise ValueError(f"pixel_values: expected a 4-D tensor {want}, got {px.dim()}-D shape {list(px.shape)}")
    if not px.is_floating_point():
        also = " or uint8 frames [batch, H, W, C] / [batch, C, H, W]" if frames is not None else ""
        raise ValueError(f"pixel_values: expected a floating-point tensor (normalized pixels){also}, got {px.dtype}; "
                         "convert and normalize images first (e.g. the model's image processor)"
                         + ("" if frames is not None else "; uint8 frames are taken by the fused executor "
                            "(dualfuse.fuse)"))
    b, c, h, w = px.shape
    if b == 0:
        raise ValueError(f"pixel_values: empty batch: expected {want} with batch >= 1, got {list(px.shape)}")
    if c != emb.channels:
        raise ValueError(f"pixel_values: expected {emb.channels} channels ({want}), got {c} channels in "
                         f"shape {list(px.shape)}")
    if h != emb.image_size or w != emb.image_size:
        raise ValueError(f"pixel_values: expected images of {emb.image_size}x{emb.image_size} ({want}), "
                         f"got {h}x{w} in shape {list(px.shape)}")
    if not same_device(px.device, device):
        raise ValueError(f"pixel_values: expected a tensor on {device} (the executor's device), got one on "
                         f"{px.device}; move it with .to('{device}')")
    return px if px.dtype == dtype else px.to(dtype)


def _validate_frames(emb, px, device, dtype, frames):
    """uint8 camera frames [B, H, W, C] or [B, C, H, W] at the model's size -> a uint8 [B, C, H, W] view (frames
    "keep") or the normalized float image in ``dtype`` (frames = (mean, std))."""
    c, s = emb.channels, emb.image_size
    want = f"[batch, {s}, {s}, {c}] (channels-last) or [batch, {c}, {s}, {s}]"
    if px.dim() != 4:
        raise ValueError(f"pixel_values: uint8 frames must be a 4-D tensor {want}, got {px.dim()}-D shape "
                         f"{list(px.shape)}")
    if px.shape[3] == c and px.shape[1] != c:
        layout, h, w = "nhwc", px.shape[1], px.shape[2]
    elif px.shape[1] == c:
        layout, h, w = "nchw", px.shape[2], px.shape[3]
    else:
        raise ValueError(f"pixel_values: uint8 frames: expected {want}, got shape {list(px.shape)} (no axis of "
                         f"{c} channels after the batch or at the end)")
    if (h, w) != (s, s):
        raise ValueError(f"pixel_values: uint8 frames of {h}x{w}, but the model takes {s}x{s} (expected {want}); "
                         f"resize (or crop) the frames to {s}x{s} first")
    if px.shape[0] == 0:
        raise ValueError(f"pixel_values: empty batch: expected {want} with batch >= 1, got {list(px.shape)}")
    if not same_device(px.device, device):
        raise ValueError(f"pixel_values: expected a tensor on {device} (the executor's device), got one on "
                         f"{px.device}; move it with .to('{device}')")
    nchw = px.permute(0, 3, 1, 2) if layout == "nhwc" else px
    if isinstance(frames, str):
        if frames != "keep":
            raise ValueError(f"frames: expected None, 'keep' or (mean, std), got {frames!r}")
        return nchw
    return normalize_frames(nchw, *frames, dtype=dtype)


def normalize_frames(frames: torch.Tensor, mean, std, dtype=torch.float32) -> torch.Tensor:
    """uint8 [B, C, H, W] -> ``((x / 255 - mean) / std)`` in ``dtype`` (computed in fp32, on the frames' device)."""
    shape = (1, -1, 1, 1)
    m = torch.tensor(mean, dtype=torch.float32, device=frames.device).view(shape)
    sd = torch.tensor(std, dtype=torch.float32, device=frames.device).view(shape)
    x = (frames.to(torch.float32) / 255 - m) / sd
    return x if x.dtype == dtype else x.to(dtype)


def _validate_patch_sequence(io, seq, device, dtype):
    """A SigLIP2 NaFlex call: PatchSequence(pixel_values [B, N, p*p*C], spatial_shapes [B, 2], mask [B, N])."""
    dim = io.channels * io.patch_size ** 2
    want = f"PatchSequence(pixel_values [batch, patches, {dim}], spatial_shapes [batch, 2], pixel_attention_mask [batch, patches])"
    if not isinstance(seq, PatchSequence):
        raise ValueError(f"pixel_values: this SigLIP2 NaFlex model takes {want} (its image processor's outputs), "
                         f"got {_describe(seq)}")
    px, shapes, mask = seq.pixel_values, seq.spatial_shapes, seq.pixel_attention_mask
    for name, x in (("pixel_values", px), ("spatial_shapes", shapes), ("pixel_attention_mask", mask)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name}: expected a tensor ({want}), got {_describe(x)}")
    if px.dim() != 3 or px.shape[0] < 1 or px.shape[1] < 1 or px.shape[2] != dim or not px.is_floating_point():
        raise ValueError(f"pixel_values: expected a float tensor [batch >= 1, patches >= 1, {dim}] of NaFlex patches, "
                         f"got {_describe(px)}")
    b, n = px.shape[:2]
    if tuple(shapes.shape) != (b, 2) or shapes.is_floating_point():
        raise ValueError(f"spatial_shapes: expected an integer tensor [{b}, 2] (patch rows, columns per image), "
                         f"got {_describe(shapes)}")
    if tuple(mask.shape) != (b, n):
        raise ValueError(f"pixel_attention_mask: expected [{b}, {n}] (1 for each image's patches, 0 for padding), "
                         f"got {_describe(mask)}")
    if not same_device(px.device, device):
        raise ValueError(f"pixel_values: expected a tensor on {device} (the executor's device), got one on "
                         f"{px.device}; move it with .to('{device}')")
    if px.dtype != dtype:
        seq = PatchSequence(px.to(dtype), shapes, mask)
    return seq


def _validate_ids(io, ids, device, check_ids):
    ctx, vocab = io.context_length, io.vocab_size
    if (isinstance(ids, torch.Tensor) and ids.dtype in _INT_DTYPES and ids.dim() == 2 and ids.shape[0]
            and 0 < ids.shape[1] <= ctx and same_device(ids.device, device)):  # the usual case (hot path)
        return _check_id_range(ids if ids.dtype == torch.long else ids.long(), vocab, check_ids)
    want = f"[batch, length] with 1 <= length <= {ctx}"
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"input_ids: expected a torch.Tensor of token ids {want}, got {_describe(ids)}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"input_ids: expected an integer tensor of token ids, got {ids.dtype}")
    if ids.dim() != 2:
        raise ValueError(f"input_ids: expected a 2-D tensor {want}, got {ids.dim()}-D shape {list(ids.shape)}")
    b, n = ids.shape
    if b == 0:
        raise ValueError(f"input_ids: empty batch: expected {want} and batch >= 1, got {list(ids.shape)}")
    if n == 0:
        raise ValueError(f"input_ids: empty sequences: expected {want}, got {list(ids.shape)}")
    if n > ctx:
        raise ValueError(f"input_ids: sequences of {n} tokens are longer than the model's context length {ctx} "
                         f"(expected {want}, got {list(ids.shape)})")
    if not same_device(ids.device, device):
        raise ValueError(f"input_ids: expected a tensor on {device} (the executor's device), got one on "
                         f"{ids.device}; move it with .to('{device}')")
    return _check_id_range(ids if ids.dtype == torch.long else ids.long(), vocab, check_ids)


_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _check_id_range(ids, vocab: int, check_ids: bool):
    if check_ids:
        lo, hi = torch.stack(torch.aminmax(ids)).tolist()  # one read-back
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise ValueError(f"input_ids: token id {bad} is out of the vocabulary: expected ids in [0, {vocab}), "
                             f"got min {lo}, max {hi}")
    return ids


# --------------------------------------------------------------------------------------------- source model

def _pooled(out) -> torch.Tensor:
    """HF get_*_features return a tensor (transformers 4) or an output object with pooler_output (5)."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None and isinstance(out, (tuple, list)):
        pooled = out[0]
    if pooled is None:
        raise TypeError(f"cannot read embeddings from {type(out).__name__}")
    return pooled


def source_forward(model, family: str) -> tuple[Callable, Callable]:
    """(image_fn, text_fn) calling the source model's own tower forwards; each returns unnormalized embeddings.

    The single place that knows how each family is called: eager, streams, graph and compile all use it.
    A single tower (CLIPVisionModel, SiglipTextModel, open_clip ``model.visual``, ...) gives one of the two; its
    embeddings are what its forward pools: ``image_embeds`` / ``text_embeds`` with a projection, else
    ``pooler_output`` (a tower without a pooling head, as VLMs build SigLIP: ``last_hidden_state``).
    """
    from ..adapters import tower_of

    tower = tower_of(model)
    if tower is not None:
        return _tower_forward(model, family, tower)
    if family == "hf_siglip2":
        def image_fn(pixel_values):  # a PatchSequence (NaFlex)
            return _pooled(model.get_image_features(pixel_values=pixel_values.pixel_values,
                                                    spatial_shapes=pixel_values.spatial_shapes,
                                                    pixel_attention_mask=pixel_values.pixel_attention_mask))

        def text_fn(input_ids):
            return _pooled(model.get_text_features(input_ids=input_ids))
    elif family in ("hf_clip", "hf_siglip", "hf_metaclip2"):
        def image_fn(pixel_values):
            return _pooled(model.get_image_features(pixel_values=pixel_values))

        def text_fn(input_ids):
            return _pooled(model.get_text_features(input_ids=input_ids))
    elif family == "open_clip":
        def image_fn(pixel_values):
            return model.encode_image(pixel_values)

        def text_fn(input_ids):
            return model.encode_text(input_ids)
    else:
        raise ValueError(f"unknown model family {family!r}: expected hf_clip, hf_siglip, hf_siglip2, hf_metaclip2 or open_clip")
    return image_fn, text_fn


def tower_embeddings(out) -> torch.Tensor:
    """A single tower's output -> its embeddings (see source_forward)."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("image_embeds", "text_embeds", "pooler_output", "last_hidden_state"):
        x = getattr(out, name, None)
        if x is not None:
            return x
    raise TypeError(f"cannot read embeddings from {type(out).__name__}")


def _tower_forward(model, family: str, tower: str) -> tuple[Callable | None, Callable | None]:
    def missing(what):
        def fn(_):
            raise ValueError(f"{what}: this model is a single {tower} tower")
        return fn

    if tower == "text":
        return missing("pixel_values"), lambda ids: tower_embeddings(model(input_ids=ids))
    if family == "open_clip":
        image_fn = model
    elif family == "hf_siglip2":
        def image_fn(seq):
            return tower_embeddings(model(pixel_values=seq.pixel_values, spatial_shapes=seq.spatial_shapes,
                                          pixel_attention_mask=seq.pixel_attention_mask))
    else:
        def image_fn(pixel_values):
            return tower_embeddings(model(pixel_values=pixel_values))
    return image_fn, missing("input_ids")


def copy_source_model(model, device: torch.device, dtype: torch.dtype):
    """A deep copy of the user's model on ``device`` in ``dtype``, eval mode, no grads. The original is untouched."""
    dup = copy.deepcopy(model)
    dup = dup.to(device=device, dtype=dtype).eval()
    dup.requires_grad_(False)
    return dup


# --------------------------------------------------------------------------------------------- base class

class Locked:
    """Mixin of an executor whose calls hold ``self._lock`` (a reentrant lock: runner cache and each call's copy /
    replay / clone); a copy or an unpickled executor gets a lock of its own."""

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_lock", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.RLock()


class Executor:
    """Base class. Subclasses set ``name`` / ``needs_cuda`` (the registry sets ``name``) and implement
    ``_encode``, ``_encode_image`` and ``_encode_text`` on validated inputs; the public methods validate first.

    ``model`` is the source model (HF CLIPModel / SiglipModel, open_clip CLIP), a preset name, or — for
    executors that only need the spec (``uses_source_model = False``) — a :class:`DualEncoderSpec`.
    ``spec`` may be passed in to avoid re-reading the weights when several executors are built from one model.
    """

    name: str = ""
    needs_cuda: bool = False
    stock: bool = True  # a stock PyTorch way to run the model (bench compares ours against the best of these)
    uses_source_model: bool = True
    # can run a model whose towers DualEncoderSpec does not describe (self.spec is then None): the executors
    # that run the source model itself, and the fused executor (which falls back)
    runs_uncovered: bool = True
    notes: str = ""  # shown by `dualfuse bench` next to the timings

    def __init__(self, model, dtype=None, device=None, *, spec: DualEncoderSpec | None = None,
                 check_ids: bool = True):
        from ..adapters import NotCovered, family_of, model_io, to_spec

        self.device = resolve_device(device) if not self.needs_cuda else self._cuda_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.check_ids = check_ids
        if isinstance(model, (str,)):
            from ..presets import load
            model = load(model)
        # why the spec cannot describe this model's towers (None: it can); executors that run the source model
        # don't need the spec, the fused executor falls back
        self.not_covered: str | None = None
        if isinstance(model, DualEncoderSpec):
            if self.uses_source_model:
                raise ValueError(f"executor {self.name!r} runs the source model: pass the HF/open_clip model "
                                 "object (or a preset name), not a DualEncoderSpec")
            self.spec = model
            self.family = model.family
        else:
            self.family = family_of(model)
            try:
                self.spec = spec if spec is not None else to_spec(model)
            except NotCovered as e:
                if not self.runs_uncovered:
                    raise
                self.spec, self.not_covered = None, str(e)
        self.io: ModelIO = self.spec.io if self.spec is not None else model_io(model)
        self._source = model  # for subclasses' __init__ only; dropped by them (never keep the user's model)

    def _cuda_device(self, device) -> torch.device:
        want = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        if torch.device(want).type != "cuda" or not torch.cuda.is_available():
            where = "this machine has no CUDA" if not torch.cuda.is_available() else f"device {want} was asked for"
            raise NeedsCUDA(f"executor {self.name!r} needs a CUDA device ({where}); executors that run on CPU: "
                            "eager, compile")
        return resolve_device(want)

    # -- public interface ----------------------------------------------------------------------------
    def validate(self, pixel_values=None, input_ids=None):
        return validate_inputs(self.io, pixel_values, input_ids, device=self.device, dtype=self.dtype,
                               check_ids=self.check_ids)

    @torch.no_grad()
    def encode(self, pixel_values, input_ids):
        """(image_embeds [Bi, E], text_embeds [Bt, E]), unnormalized, in the executor's dtype."""
        if pixel_values is None or input_ids is None:
            raise ValueError("encode needs both pixel_values and input_ids; use encode_image / encode_text "
                             "for one tower")
        px, ids = self.validate(pixel_values, input_ids)
        return self._encode(px, ids)

    @torch.no_grad()
    def encode_image(self, pixel_values):
        if pixel_values is None:
            raise ValueError("pixel_values: expected a tensor, got None")
        px, _ = self.validate(pixel_values, None)
        return self._encode_image(px)

    @torch.no_grad()
    def encode_text(self, input_ids):
        if input_ids is None:
            raise ValueError("input_ids: expected a tensor, got None")
        _, ids = self.validate(None, input_ids)
        return self._encode_text(ids)

    @torch.no_grad()
    def logits(self, image_embeds, text_embeds):
        """(logits_per_image [Bi, Bt], logits_per_text [Bt, Bi]) as CLIP/SigLIP compute them (normalize, scale by
        exp(logit_scale), add SigLIP's logit_bias); computed in fp32, returned in the embeddings' dtype."""
        from .. import reference

        for what, x in (("image_embeds", image_embeds), ("text_embeds", text_embeds)):
            if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[-1] != self.io.embed_dim:
                raise ValueError(f"{what}: expected a tensor [batch, {self.io.embed_dim}], got {_describe(x)}")
        per_image, per_text = reference.logits(self.io, image_embeds.float(), text_embeds.float())
        return per_image.to(image_embeds.dtype), per_text.to(text_embeds.dtype)

    def __call__(self, pixel_values, input_ids):
        return self.encode(pixel_values, input_ids)

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.name!r} {self.io.name or self.family} "
                f"{dtype_name(self.dtype)} on {self.device}>")

    # -- to implement ----------------------------------------------------------------------------------
    def _encode(self, px, ids):
        return self._encode_image(px), self._encode_text(ids)

    def _encode_image(self, px):
        raise NotImplementedError

    def _encode_text(self, ids):
        raise NotImplementedError


class SourceExecutor(Executor):
    """Runs a private deep copy of the source model (moved to ``device``, cast to ``dtype``)."""

    def __init__(self, model, dtype=None, device=None, **kwargs):
        super().__init__(model, dtype, device, **kwargs)
        self.model = copy_source_model(self._source, self.device, self.dtype)
        del self._source
        self.image_fn, self.text_fn = source_forward(self.model, self.family)

"""DualEncoderSpec: one family-independent description of both towers of a CLIP/SigLIP-style model.

Every executor reads this, never the source model's modules. Weights are laid out the way the kernels
want them: Linear weights in nn.Linear layout ``[out, in]`` (kernels compute ``x @ w.T``), the three
attention projections packed into one ``[3*width, width]`` matrix (q | k | v, each heads-major), the
patch convolution flattened to ``[width, channels*patch*patch]`` in (c, ph, pw) order.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch

Activation = Literal["quick_gelu", "gelu", "gelu_tanh"]
Pooling = Literal["cls", "first_eos", "argmax", "last", "map", "none"]
MaskKind = Literal["none", "causal"]

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_tanh")
POOLINGS = ("cls", "first_eos", "argmax", "last", "map", "none")  # "none": a tower with no pooled output
MASKS = ("none", "causal")


@dataclass
class Linear:
    weight: torch.Tensor  # [out, in]; int8 / fp8 e4m3 when quantized (scale set)
    bias: torch.Tensor | None = None  # [out]
    # [out] fp32 per-output-channel scale of a weight-only quantized weight (dualfuse.quantize): the layer computes
    # with weight * scale[:, None]; None: the weight is unquantized
    scale: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]


@dataclass
class LayerNorm:
    weight: torch.Tensor  # [D]
    bias: torch.Tensor  # [D]
    eps: float


@dataclass
class Block:
    """One pre-LN transformer block: x += out(attn(ln1(x))); x += fc2(act(fc1(ln2(x))))."""

    ln1: LayerNorm
    qkv: Linear  # packed [3*width, width]
    out: Linear  # [width, width]
    ln2: LayerNorm
    fc1: Linear  # [mlp, width]
    fc2: Linear  # [width, mlp]


@dataclass
class PatchEmbed:
    """The patch "convolution" (stride = kernel = patch). Like a Conv2d it drops the last H % p rows and
    W % p columns (SigLIP so400m: 384 px, patch 14 -> 27x27 patches)."""

    weight: torch.Tensor  # [width, channels*patch*patch], (c, ph, pw) order
    bias: torch.Tensor | None  # [width] or None
    patch_size: int
    image_size: int  # height (and width, unless image_width is set)
    channels: int
    image_width: int | None = None  # None: square images
    # NaFlex (SigLIP2): the tower's pos_embedding is a pos_grid x pos_grid grid, resized to each image's patch
    # grid; images come as patch sequences (PatchSequence). None: fixed resolution, pos_embedding per token.
    pos_grid: int | None = None

    @property
    def width(self) -> int:
        return self.image_size if self.image_width is None else self.image_width

    @property
    def grid_hw(self) -> tuple[int, int]:
        return self.image_size // self.patch_size, self.width // self.patch_size

    @property
    def grid(self) -> int:
        """Patches per side (square images)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid_hw
        return gh * gw

    @property
    def patch_dim(self) -> int:
        return self.channels * self.patch_size * self.patch_size


@dataclass
class PatchSequence:
    """SigLIP2 NaFlex images as its processor gives them: each image cut into a (h, w) grid of patches,
    flattened in (ph, pw, c) order and right-padded to a common length.

    pixel_values: [B, N, p*p*C] float. spatial_shapes: [B, 2] int (h, w) with h*w <= N.
    pixel_attention_mask: [B, N], 1 for the first h*w patches of each image, 0 for padding.
    """

    pixel_values: torch.Tensor
    spatial_shapes: torch.Tensor
    pixel_attention_mask: torch.Tensor

    @property
    def shape(self):  # batch first, like a tensor, for code that only needs the batch size
        return self.pixel_values.shape


@dataclass
class TokenEmbed:
    weight: torch.Tensor  # [vocab, width]

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]


@dataclass
class AttentionPoolHead:
    """SigLIP's multihead attention pooling: a learned probe attends over all tokens, then LN + MLP."""

    probe: torch.Tensor  # [width]
    qkv: Linear  # packed [3*width, width]; q applies to the probe, k and v to the tokens
    out: Linear  # [width, width]
    ln: LayerNorm
    fc1: Linear
    fc2: Linear
    heads: int


@dataclass
class TowerSpec:
    kind: Literal["vision", "text"]
    width: int
    heads: int
    mlp_dim: int
    activation: Activation
    mask: MaskKind
    embed: PatchEmbed | TokenEmbed
    pos_embedding: torch.Tensor  # [seq_len (vision) or context_length (text), width]
    blocks: list[Block]
    final_ln: LayerNorm  # applied to every token (per-row, so LN-then-pool == pool-then-LN)
    pooling: Pooling  # "none": no pooled output (a VLM's SigLIP tower without its head): tokens only
    class_embedding: torch.Tensor | None = None  # [width]; vision only, prepended as token 0
    pre_ln: LayerNorm | None = None  # CLIP's LN right after the embeddings
    eos_token_id: int | None = None  # for pooling == "first_eos"
    pool_head: AttentionPoolHead | None = None  # for pooling == "map"
    projection: Linear | None = None  # None: the pooled vector is the embedding

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.mask not in MASKS:
            raise ValueError(f"mask must be one of {MASKS}, got {self.mask!r}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.pooling == "first_eos" and self.eos_token_id is None:
            raise ValueError("pooling 'first_eos' needs eos_token_id")
        if self.pooling == "none" and self.projection is not None:
            raise ValueError("pooling 'none' (no pooled output) cannot have a projection")
        if self.pooling == "map" and self.pool_head is None:
            raise ValueError("pooling 'map' needs pool_head")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def seq_len(self) -> int:
        """Tokens per sample: patches (+ class token) for vision, the context length for text."""
        if isinstance(self.embed, PatchEmbed):
            return self.embed.num_patches + (1 if self.class_embedding is not None else 0)
        return self.pos_embedding.shape[0]

    @property
    def context_length(self) -> int:
        return self.pos_embedding.shape[0]

    @property
    def out_dim(self) -> int:
        return self.projection.out_features if self.projection is not None else self.width


@dataclass
class DualEncoderSpec:
    """Both towers of a dual encoder, or one of them: a single-tower model (an image encoder, a text encoder, a
    VLM's vision tower) has ``text=None`` or ``vision=None``; ``tower`` names the one it has."""

    vision: TowerSpec | None
    text: TowerSpec | None
    logit_scale: float  # log of the temperature, exp'd at use (as in CLIP/SigLIP)
    logit_bias: float | None = None  # SigLIP only
    family: str = ""  # "hf_clip" | "hf_siglip" | "open_clip"
    name: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.vision is None and self.text is None:
            raise ValueError("DualEncoderSpec needs a vision tower, a text tower, or both; got neither")
        if self.vision is not None and self.text is not None and self.vision.out_dim != self.text.out_dim:
            raise ValueError(
                f"towers must embed into the same space: vision gives {self.vision.out_dim}, "
                f"text gives {self.text.out_dim}"
            )

    @property
    def tower(self) -> str | None:
        """None for a dual encoder; "vision" or "text" for a single-tower model."""
        if self.vision is None:
            return "text"
        return "vision" if self.text is None else None

    @property
    def towers(self) -> tuple[str, ...]:
        """The towers the model has: ("vision", "text"), ("vision",) or ("text",)."""
        return tuple(n for n in ("vision", "text") if getattr(self, n) is not None)

    @property
    def embed_dim(self) -> int:
        return (self.vision or self.text).out_dim

    @property
    def io(self) -> "ModelIO":
        """The model's inputs and outputs (what validation, input making and logits need)."""
        return spec_io(self)

    @property
    def dtype(self) -> torch.dtype:
        return (self.vision or self.text).pos_embedding.dtype

    @property
    def device(self) -> torch.device:
        return (self.vision or self.text).pos_embedding.device

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "DualEncoderSpec":
        """A copy with ``fn`` applied to every tensor (map_named_tensors)."""
        return map_named_tensors(self, lambda name, t: fn(t))

    def to(self, device=None, dtype: torch.dtype | None = None) -> "DualEncoderSpec":
        """A copy with floating-point weights moved/cast (the source spec is left as is); quantized weights and
        their scales (``Linear.scale``) are moved, never cast."""

        def move(t: torch.Tensor, cast: bool = True) -> torch.Tensor:
            t = t.detach()
            if cast and dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            if device is not None:
                t = t.to(device)
            return t.contiguous()

        return map_named_tensors(self, lambda name, t: move(t), quantized=lambda name, t: move(t, cast=False))

    def summary(self) -> dict:
        def tower(t: TowerSpec | None) -> dict | None:
            if t is None:
                return None
            d = dict(
                width=t.width, heads=t.heads, head_dim=t.head_dim, mlp_dim=t.mlp_dim, layers=t.num_layers,
                seq_len=t.seq_len, activation=t.activation, mask=t.mask, pooling=t.pooling,
                pre_ln=t.pre_ln is not None, class_token=t.class_embedding is not None,
                out_dim=t.out_dim, eps=t.final_ln.eps,
            )
            if isinstance(t.embed, PatchEmbed):
                d.update(image_size=t.embed.image_size, patch_size=t.embed.patch_size, channels=t.embed.channels)
            else:
                d.update(vocab_size=t.embed.vocab_size, context_length=t.context_length)
            return d

        return dict(name=self.name, family=self.family, embed_dim=self.embed_dim,
                    vision=tower(self.vision), text=tower(self.text),
                    logit_bias=self.logit_bias is not None)


def gemm_linears(tower: "TowerSpec"):
    """(owner, attribute name) of every linear layer of a tower the fused GEMMs run: each block's QKV, out-proj,
    FC1, FC2, the projection and SigLIP's attention-pooling head (its value may be None in an executor's copy,
    where a folded copy replaced it)."""
    for blk in tower.blocks:
        for name in ("qkv", "out", "fc1", "fc2"):
            yield blk, name
    if tower.projection is not None:
        yield tower, "projection"
    if tower.pool_head is not None:
        for name in ("qkv", "out", "fc1", "fc2"):
            yield tower.pool_head, name


def rows_of(linear: Linear, start: int, stop: int | None = None) -> Linear:
    """Output rows ``start:stop`` of a linear layer (weight, bias and, when quantized, the per-channel scales)."""
    def rows(t):
        return None if t is None else t[start:stop].contiguous()

    return Linear(rows(linear.weight), rows(linear.bias), rows(linear.scale))


def map_named_tensors(obj, fn: Callable[[str, torch.Tensor], torch.Tensor], prefix: str = "", quantized=None):
    """The one walker over a spec's dataclass tree: a copy of ``obj`` with ``fn(name, tensor)`` applied to every
    tensor, named as in a state dict (``vision.blocks.0.qkv.weight``; ``extra`` is skipped). ``quantized``
    (default ``fn``): what the weight and scale of a quantized Linear get instead."""
    if isinstance(obj, torch.Tensor):
        return fn(prefix, obj)
    if isinstance(obj, list):
        return [map_named_tensors(o, fn, f"{prefix}{i}.", quantized) for i, o in enumerate(obj)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        q = quantized if isinstance(obj, Linear) and obj.scale is not None else None
        changes = {}
        for f in dataclasses.fields(obj):
            if f.name == "extra":
                continue
            v = getattr(obj, f.name)
            name = f"{prefix}{f.name}" + ("" if isinstance(v, torch.Tensor) else ".")
            changes[f.name] = map_named_tensors(v, q if q is not None and f.name in ("weight", "scale") else fn,
                                                name, quantized)
        return dataclasses.replace(obj, **changes)
    return obj


def named_tensors(obj) -> list[tuple[str, torch.Tensor]]:
    """``(state-dict name, tensor)`` of every tensor of a spec (or any part of one), in field order."""
    out = []
    map_named_tensors(obj, lambda name, t: out.append((name, t)) or t)
    return out


@dataclass(frozen=True)
class ModelIO:
    """What callers and the stock executors need to know of a model's inputs and outputs: enough to validate
    and make inputs and to compute logits, also for a model whose towers DualEncoderSpec cannot describe
    (a convolutional image tower, say), which the stock executors still run. ``DualEncoderSpec.io`` gives it
    for a covered model, ``adapters.model_io(model)`` for any runnable model."""

    name: str
    family: str
    image_size: int
    channels: int
    context_length: int
    vocab_size: int
    embed_dim: int
    logit_scale: float  # log of the temperature
    logit_bias: float | None = None
    text_pooling: str = "argmax"  # where the text tower pools: shapes realistic random token ids
    eos_token_id: int | None = None
    patch_size: int | None = None
    naflex: bool = False  # images come as PatchSequence (SigLIP2 NaFlex)
    towers: tuple[str, ...] = ("vision", "text")  # a single-tower model: ("vision",) or ("text",)


def spec_io(spec: "DualEncoderSpec") -> ModelIO:
    """The spec's ModelIO; a missing tower's sizes are 0 (``towers`` says which exist)."""
    v, t = spec.vision, spec.text
    image = dict(image_size=v.embed.image_size, channels=v.embed.channels, patch_size=v.embed.patch_size,
                 naflex=v.embed.pos_grid is not None) if v is not None else dict(image_size=0, channels=0)
    text = dict(context_length=t.context_length, vocab_size=t.embed.vocab_size, text_pooling=t.pooling,
                eos_token_id=t.eos_token_id) if t is not None else dict(context_length=0, vocab_size=0)
    return ModelIO(name=spec.name, family=spec.family, embed_dim=spec.embed_dim, logit_scale=spec.logit_scale,
                   logit_bias=spec.logit_bias, towers=spec.towers, **image, **text)


"""FusedExecutor: the ``fused`` executor — coverage (decided once, at construction), the LRU of runners per call
shape, text-length buckets, warmup, uint8 frames, and SigLIP2 NaFlex per-grid executors."""
from __future__ import annotations

import bisect
import threading
import time
import traceback
import warnings
from collections import OrderedDict

import torch
import torch.nn.functional as F

from ...adapters import image_normalization
from ...calibration import resolve as resolve_calibration
from ...config import FusedConfig
from ...kernels._utils import is_interpreter, pdl_supported
from ...kernels.embed import fold_normalization
from ...kernels.gemm import fold_layernorm
from ...plan import Plan, TowerOutputs, make_plan
from ...quantize import quantize_folded, quantize_spec, resolve_weights, to_device_but_gemm_weights
from ...reference import naflex_pos_embedding
from ...spec import DualEncoderSpec, Linear, PatchSequence, TowerSpec, rows_of
from .. import register
from .._naflex import as_image, grid_groups, grid_spec
from ..base import Executor, Locked, NeedsCUDA, validate_inputs
from .buffers import TowerBuffers
from .runner import Runner

MAX_HEAD_DIM = 128  # attention keeps a [BLOCK_M, head_dim] accumulator in registers


def unsupported_reason(spec: DualEncoderSpec, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why the fused kernels can't run this model here, or None if they can."""
    if device.type != "cuda" and not is_interpreter():
        return ("the fused Triton kernels need a CUDA device (or TRITON_INTERPRET=1 on CPU, for tests); on a CPU "
                "run another executor, e.g. eager")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype} is not supported (fp16, bf16, fp32)"
    if dtype == torch.bfloat16 and is_interpreter():
        return ("Triton's CPU interpreter (TRITON_INTERPRET=1) computes bf16 dot products wrongly: run fp16 or fp32 "
                "under it (bf16 runs on a GPU)")
    for t in (spec.vision, spec.text):
        if t is None:
            continue
        if t.head_dim > MAX_HEAD_DIM:
            return f"{t.kind} head dim {t.head_dim} > {MAX_HEAD_DIM}"
        if t.pool_head is not None and t.width // t.pool_head.heads > MAX_HEAD_DIM:
            return f"{t.kind} attention-pooling head dim > {MAX_HEAD_DIM}"
    return None


def key_parts(key: tuple) -> tuple[str, TowerOutputs | None]:
    """(pixels, outputs) of a runner key (FusedExecutor.runner_key)."""
    pixels, outputs = "float", None
    for part in key[3:]:
        if isinstance(part, TowerOutputs):
            outputs = part
        else:
            pixels = part
    return pixels, outputs


@register("fused")
class FusedExecutor(Locked, Executor):
    """Both towers as one stream of fused launches per call shape (package docstring). Safe to call from several
    threads and under any CUDA stream: see the package docstring for the contract."""

    stock = False
    uses_source_model = False
    notes = "horizontally fused Triton launches, one CUDA graph"

    def __init__(self, model, dtype=None, device=None, *, config: FusedConfig | None = None,
                 spec: DualEncoderSpec | None = None, check_ids: bool = True, **overrides):
        """``config``: the options (dualfuse.config.FusedConfig; default FusedConfig()); ``overrides``: any of its
        fields as keywords (``gemm_config=`` a dict: the older spelling of ``gemm=``), applied over ``config``."""
        if config is not None and not isinstance(config, FusedConfig):
            raise ValueError(f"config must be a dualfuse.FusedConfig, got {type(config).__name__}")
        self.config = cfg = (config or FusedConfig()).with_overrides(**overrides)
        super().__init__(model, dtype, device, spec=spec, check_ids=check_ids)
        # single-tower models: which hidden states callers read (FusedConfig.hidden_states, resolved to 0..layers;
        # None: any) and whether the pooled output is computed (FusedConfig.pooled; None: unless hidden_states)
        self.hidden_states, self.pooled = self._resolve_tower_outputs(cfg.hidden_states, cfg.pooled)
        # per stage and tower, Triton or a library kernel (FusedConfig.gemm_impl; executors/fused/library.py); with
        # "auto", the calibration given or this card's cache file (None there: all Triton), read (copied) once here:
        # the stage choices of every runner built later come from this, never from a measurement or a file read
        self.gemm_impl = cfg.gemm_impl
        self.calibration = resolve_calibration(cfg.calibration, self.device) if cfg.gemm_impl == "auto" else None
        # weights: "fp16" (the executor's dtype), "int8" or "fp8" (weight-only, one scale per output channel,
        # every linear layer of both towers: dualfuse.quantize); fp8 needs compute capability >= 8.9
        self.weight_format = resolve_weights(cfg.weights, self.device)
        # image mean/std of uint8 camera frames: folded into a second patch-embedding weight (frame_patch), or
        # applied on the device before a fallback executor (adapters/_norm.py has the family defaults)
        source = self.__dict__.get("_source")
        self.image_mean, self.image_std = image_normalization(
            source if source is not None else self.spec, self.family, image_mean=cfg.image_mean,
            image_std=cfg.image_std, channels=self.io.channels or None)
        # text lengths padded up to a few buckets where that provably keeps the output (_resolve_text_buckets)
        self.text_buckets, self.text_pad_id, self.text_buckets_off = self._resolve_text_buckets(cfg.text_buckets)
        # first-call time (building the runner, capturing its graph) per runner key, in seconds
        self.build_times: dict[tuple, float] = {}
        # one lock per executor (shared with its NaFlex grid executors): a call holds it from the runner lookup
        # (build, capture, LRU) through input copies, replay, output clone and the bad-id flag read, so calls from
        # several threads give what serial calls give. Reentrant: a NaFlex call runs its grid executors under it.
        self._lock = threading.RLock()
        self._grid: tuple[int, int] | None = None  # NaFlex: the patch grid of a per-grid child executor
        # defer_split_reduce: an out-proj / FC2 that splits K (batch 1) leaves its partial sums to the next LayerNorm
        # launch, which adds them, the bias and the residual (kernels.layernorm `add`): no split-K tail in the GEMM
        self.defer_split_reduce = cfg.defer_split_reduce
        # pdl: programmatic dependent launch between consecutive kernels where the card supports it (sm_90+).
        # fold_ln: LayerNorms folded into the GEMMs they feed (plan.py). Auto (None): folded where the launches
        # run without PDL (sm_80/87, e.g. Jetson Orin, or pdl=False) and the residual stream has the model
        # dtype: on the sm_80/87 path (no TMA, no PDL) it saved 5% at ViT-B/32 batch 1 on an H100; with PDL a
        # LayerNorm launch costs less than what folding adds to the GEMMs (BENCHMARKS.md).
        # residual stream dtype. Default: fp32 for bf16 models (8 mantissa bits: rounding the residual stream in
        # bf16 at every layer gave 1.07e-2 relative error on clip-vit-b-32, over the 1e-2 tolerance), the model
        # dtype otherwise (fp16: 1.3e-3; an fp32 stream cost 3% at ViT-B/32 and 8% at ViT-L/14 batch 1 on an
        # H100). Always the model dtype when LN is folded into the GEMMs (their x operand is the residual
        # stream and must have the weights' dtype).
        usual_residual = torch.float32 if self.dtype == torch.bfloat16 else self.dtype
        fold_ln, residual_dtype = cfg.fold_ln, cfg.residual_dtype
        if fold_ln is None:
            fold_ln = not (cfg.pdl and pdl_supported(self.device)) and (residual_dtype or usual_residual) == self.dtype
        if residual_dtype is None:
            residual_dtype = self.dtype if fold_ln else usual_residual
        self.max_graphs, self.use_graph, self.fold_ln, self.pdl = cfg.max_graphs, cfg.use_graph, fold_ln, cfg.pdl
        self.gemm_config = cfg.gemm.to_dict()  # overrides for every GEMM launch (benchmarks, experiments)
        if fold_ln and residual_dtype != self.dtype:
            raise ValueError(f"fold_ln=True needs residual_dtype == dtype ({self.dtype}): the folded GEMMs read the "
                             f"residual stream directly; got residual_dtype={residual_dtype}")
        self.residual_dtype = residual_dtype
        self.runners: OrderedDict[tuple, Runner] = OrderedDict()
        self._grids: OrderedDict[tuple, FusedExecutor] | None = OrderedDict()  # NaFlex: (h, w) -> executor
        self.fallback = None
        # Whether the kernels cover the model is decided here, once: what they don't cover runs on the fallback
        # executor from the first call on, with one warning that says why.
        reason = self.not_covered or unsupported_reason(self.spec, self.dtype, self.device)
        if reason is None:
            self._prepare_weights()
            reason = self._check_coverage()
        if reason is not None and self.weight_format != "fp16":
            reason += f" (weights={self.weight_format!r} not applied: the fallback runs {self.dtype} weights)"
        if reason is not None:
            self._fall_back(reason, cfg.fallback)
        elif self.weight_format != "fp16":
            self.notes = f"{FusedExecutor.notes}; {self.weight_format} weights (per-channel scales)"
        self.__dict__.pop("_source", None)
        if cfg.warmup is not None:
            self.warmup(cfg.warmup)

    # -- single towers ---------------------------------------------------------------------------------------
    def _resolve_tower_outputs(self, hidden_states, pooled):
        """(the hidden-state indices callers may read, 0..layers, or None for any; whether the pooled output is
        computed) from FusedConfig.hidden_states / pooled, checked against the model."""
        if hidden_states is None and pooled is None:
            tower = self.spec.tower if self.spec is not None else None
            has_pool = tower is None or getattr(self.spec, tower).pooling != "none"
            return None, has_pool
        if self.spec is None or self.spec.tower is None:
            what = "a model the fused kernels do not cover" if self.spec is None else "a dual encoder"
            raise ValueError(f"hidden_states= / pooled= apply to a single tower (e.g. CLIPVisionModel, a VLM's "
                             f"vision tower); this is {what}")
        t = getattr(self.spec, self.spec.tower)
        if self.spec.family == "open_clip" and (pooled is False or hidden_states):
            # model.visual(images) returns the pooled embeddings alone; its tokens (output_tokens) come after ln_post
            # without the class token, which is not what the hidden states of transformers' towers are
            raise ValueError("hidden_states= / pooled=False: open_clip's model.visual(images) returns its pooled "
                             "embeddings only, so a fused open_clip tower does too; these options apply to "
                             "transformers towers (CLIPVisionModel, SiglipVisionModel, a VLM's vision tower)")
        # types and the tuple form checked by FusedConfig; the range against this tower's layers here
        allowed = None
        if hidden_states is not None:
            allowed = tuple(sorted({self.hidden_index(i, t.num_layers) for i in hidden_states}))
        if pooled is None:
            pooled = hidden_states is None and t.pooling != "none"
        if pooled and t.pooling == "none":
            raise ValueError(f"pooled=True: this {t.kind} tower has no pooling head (its source model returns no "
                             "pooled output)")
        if allowed == () and not pooled:
            raise ValueError("hidden_states=() without the pooled output leaves this tower nothing to compute: name "
                             "the hidden states its callers read (e.g. hidden_states=(-2,)), or pass pooled=True for "
                             "the pooled output alone")
        return allowed, pooled

    @staticmethod
    def hidden_index(i, layers: int) -> int:
        """A hidden-state index as transformers counts them (0: the embeddings, i: block i-1's output; negative
        from the end) -> 0..layers; ValueError outside."""
        if not isinstance(i, int) or isinstance(i, bool):
            raise TypeError(i)
        if not -(layers + 1) <= i <= layers:
            raise ValueError(f"hidden state index {i} is out of range: this tower has {layers + 1} hidden states "
                             f"(the embeddings and {layers} layers), indices {-(layers + 1)}..{layers}")
        return i % (layers + 1)

    def last_is_normed(self) -> bool:
        """Whether the source's last_hidden_state is the final LN over every token (SigLIP, text towers) rather
        than the last block's output (CLIP's vision tower)."""
        return not (self.spec.tower == "vision" and self.family in ("hf_clip", "hf_metaclip2", "open_clip"))

    def tower_outputs(self, hidden, last: bool | None, pooled: bool) -> TowerOutputs:
        """What a single-tower call computes. ``hidden``: None (every hidden state) or the indices asked for
        (transformers' counting); ``last``: last_hidden_state too (None: when this executor may give it);
        ``pooled``: the pooled output too. ValueError for what fuse(hidden_states=, pooled=) ruled out."""
        t = getattr(self.spec, self.spec.tower)
        n = t.num_layers
        idx = set(range(n + 1)) if hidden is None else {self.hidden_index(i, n) for i in hidden}
        allowed = self.hidden_states
        normed = self.last_is_normed()
        if last is None:
            last = allowed is None or (n in allowed)
        if last and not normed:
            idx.add(n)
        if allowed is not None:
            extra = sorted(idx - set(allowed))
            if extra or (last and n not in allowed):
                raise ValueError(f"this fused tower was built for hidden states {self.hidden_states} (fuse(..., "
                                 f"hidden_states=...)); asked for {'last_hidden_state' if not extra else extra}: "
                                 "fuse the source model again with the hidden states its callers need")
        if pooled and not self.pooled:
            raise ValueError("the pooled output was not computed: this tower was fused with pooled=False (or "
                             "hidden_states=..., which implies it); fuse again with pooled=True")
        layers = n if (pooled or last) else max(idx, default=0)
        return TowerOutputs(layers=layers, hidden=tuple(sorted(idx)), tokens_ln=bool(last and normed), pooled=pooled)

    @torch.no_grad()
    def encode_tower(self, inputs, hidden=None, last: bool | None = None) -> dict:
        """One call of a single-tower model (pixel values or token ids), computing only what is asked:
        ``{"pooled": [B, E] or None, "hidden": {index: [B, S, D]}, "last": [B, S, D] or None}`` (hidden-state
        indices 0..layers; see tower_outputs)."""
        tower = self.spec.tower if self.spec is not None else None
        if tower is None:
            raise ValueError("encode_tower: this executor runs a dual encoder; use encode_image / encode_text")
        if self.fallback is not None:
            raise ValueError(f"encode_tower: the fused kernels do not run this tower ({self.notes}); the drop-in "
                             "(dualfuse.fuse) calls the source model instead")
        px, ids = self.validate(inputs, None) if tower == "vision" else self.validate(None, inputs)
        if isinstance(px, PatchSequence):
            raise ValueError("encode_tower: SigLIP2 NaFlex towers give pooled embeddings only (encode_image)")
        t = getattr(self.spec, tower)
        if last is None:
            last = self.hidden_states is None or t.num_layers in self.hidden_states
        outs = self.tower_outputs(hidden, last, self.pooled)
        n = ids.shape[1] if ids is not None else None
        with self._lock:
            if px is not None:
                pixels = "uint8" if px.dtype == torch.uint8 else "float"
                r = self.runner(px.shape[0], 0, self.context_length, pixels=pixels, outputs=outs)
            else:
                r = self.runner(0, ids.shape[0], n, outputs=outs)
            img, txt, pending = r.run(px, ids, self.check_ids)
            hid = {k: v[:, :n].clone() for k, v in r.hidden.items()}
            tokens = r.tokens[:, :n].clone() if r.tokens is not None else None
        if pending is not None:
            pending.check()
        last_out = tokens if outs.tokens_ln else (hid.get(t.num_layers) if last else None)
        return {"pooled": (img if img is not None else txt) if outs.pooled else None, "hidden": hid,
                "last": last_out}

    def _fall_back(self, reason: str, allowed: bool):
        """Run the source model with the CUDA graph executor (eager where there is no CUDA: the tests' case)."""
        source = self.__dict__.get("_source")
        if self.device.type != "cuda" and "CUDA" in reason:
            raise NeedsCUDA(f"executor 'fused': {reason}")
        if not allowed or isinstance(source, DualEncoderSpec):
            why = "" if allowed else " (fallback=False)"
            raise ValueError(f"executor 'fused' cannot run this model{why}: {reason}")
        if self.device.type == "cuda":
            from ..graph import GraphExecutor as Fallback
        else:
            from ..eager import EagerExecutor as Fallback
        warnings.warn(f"dualfuse fused: {reason}; falling back to the {Fallback.name!r} executor", stacklevel=4)
        self.fallback = Fallback(source, self.dtype, self.device, spec=self.spec)
        self.weights = self.frame_patch = None
        self.runners.clear()
        self.notes = f"FALLBACK to {Fallback.name}: {reason}"

    def _prepare_weights(self):
        if self.weight_format == "fp16":
            self.weights = self.spec.to(self.device, self.dtype)
        else:  # the GEMM weights go to the device quantized only (quantize_spec, below)
            self.weights = to_device_but_gemm_weights(self.spec, self.device, self.dtype)
        emb = self.spec.vision.embed if self.spec.vision is not None else None
        self.frame_patch = None  # (weight, bias) of the patch embedding for uint8 frames: mean/std folded in
        if emb is not None and emb.pos_grid is None:  # NaFlex takes patch sequences, never frames
            w, b = fold_normalization(emb.weight, emb.bias, self.image_mean, self.image_std, dtype=self.dtype)
            self.frame_patch = (w.to(self.device), b.to(self.device))
        head = self.weights.vision.pool_head if self.weights.vision is not None else None
        if head is not None:
            d = self.weights.vision.width
            # The probe's query projection does not depend on the input: compute it once here.
            wq, bq = head.qkv.weight[:d], head.qkv.bias[:d] if head.qkv.bias is not None else None
            self.map_query = F.linear(head.probe.float().view(1, d), wq.to(self.device).float(),
                                      bq.float() if bq is not None else None).to(self.dtype).contiguous()
        # (tower, layer, plan op) -> (folded Linear, FoldedLayerNorm): _fold_layernorms
        self.folded: dict[tuple, tuple[Linear, object]] = {}
        if self.fold_ln:
            self._fold_layernorms()
        if self.weight_format != "fp16":  # every GEMM weight -> int8 / fp8 + scales, from fp32 (after folding)
            self.weights = quantize_spec(self.weights, self.weight_format, self.device)
            self.folded = quantize_folded(self.folded, self.weight_format, self.device, self.dtype)
        # SigLIP's head: the probe's key/value projection, rows d: of the packed head QKV (their scales with them),
        # unless folded with the final LayerNorm
        self.map_kv = None
        if head is not None and not self.fold_ln:
            self.map_kv = rows_of(self.weights.vision.pool_head.qkv, self.weights.vision.width)

    def _fold_layernorms(self):
        """(tower, layer, plan op) -> (folded Linear, FoldedLayerNorm) for every LN -> GEMM pair
        of the plan (kernels.gemm.fold_layernorm), folded in fp32 from the source weights, stored in the
        executor's dtype. The unfolded GEMM weights they replace are dropped from self.weights (no second
        copy of QKV / FC1 on the device)."""
        def fold(linear, norm, weight=None, bias=None):
            w = (linear.weight if weight is None else weight).to(self.device)
            b = linear.bias if weight is None else bias
            w, b, folded_norm = fold_layernorm(w, None if b is None else b.to(self.device), norm.weight.to(self.device),
                                               norm.bias.to(self.device), norm.eps,
                                               dtype=self.dtype if self.weight_format == "fp16" else torch.float32)
            return Linear(w, b), folded_norm

        for name in self.spec.towers:
            src: TowerSpec = getattr(self.spec, name)
            dst: TowerSpec = getattr(self.weights, name)
            for i, (blk, own) in enumerate(zip(src.blocks, dst.blocks)):
                if i > 0:  # layer 0's LN reads the embeddings: not folded (plan.py)
                    self.folded[(name, i, "ln1_qkv")] = fold(blk.qkv, blk.ln1)
                    own.qkv = None  # replaced by the folded copy
                self.folded[(name, i, "ln2_fc1")] = fold(blk.fc1, blk.ln2)
                own.fc1 = None
            head = src.pool_head
            if head is not None:
                d = src.width
                kv_b = head.qkv.bias[d:] if head.qkv.bias is not None else None
                self.folded[(name, None, "final_ln_map_kv")] = fold(None, src.final_ln, head.qkv.weight[d:], kv_b)
                self.folded[(name, None, "map_ln_fc1")] = fold(head.fc1, head.ln)
                dst.pool_head.fc1 = None

    def validate(self, pixel_values=None, input_ids=None):
        if self.fallback is not None:  # uint8 frames: normalized on the device before the fallback runs
            return validate_inputs(self.io, pixel_values, input_ids, device=self.device, dtype=self.dtype,
                                   check_ids=self.check_ids, frames=(self.image_mean, self.image_std))
        # token ids are range-checked inside the fused graph (Embeddings.bad_ids), not by a read-back before it;
        # uint8 frames stay uint8 (a [B, C, H, W] view): the patch embedding reads them (frame_patch)
        return validate_inputs(self.io, pixel_values, input_ids, device=self.device, dtype=self.dtype,
                               check_ids=False, frames="keep")

    # -- text-length buckets -------------------------------------------------------------------------------
    DEFAULT_TEXT_BUCKETS = (16, 32, 48, 64, 77)

    def _resolve_text_buckets(self, buckets):
        """(buckets or None, pad id, why off or None). Texts are padded up to the next bucket only where that
        provably cannot change the embeddings: a causal text tower (appended positions are hidden from every
        earlier one) pooled at a position the padding cannot move — ``argmax`` (the first maximum id: pad id 0
        is never above the row's maximum, and a tie keeps the earlier position), ``first_eos`` (the first EOS:
        the pad id is not the EOS id) or ``cls`` (position 0). SigLIP-style towers (bidirectional attention,
        pooled at the last token) run at the exact length."""
        if buckets is None:  # FusedConfig: None, "auto" or a tuple of positive ints
            return None, 0, "off (text_buckets=None)"
        explicit = buckets != "auto"
        values = list(buckets) if explicit else list(self.DEFAULT_TEXT_BUCKETS)
        if self.spec is None:
            return None, 0, "off (the kernels do not cover this model)"
        t = self.spec.text
        if t is None:
            return None, 0, "off (no text tower)"
        why = None
        if t.mask != "causal":
            why = f"the text tower's attention is bidirectional (mask {t.mask!r}): padding would change the output"
        elif t.pooling not in ("argmax", "first_eos", "cls"):
            why = f"the text tower pools at the {t.pooling!r} position, which padding would move"
        if why is not None:
            if explicit:
                warnings.warn(f"dualfuse fused: text_buckets ignored: {why}; texts run at their exact length",
                              stacklevel=4)
            return None, 0, f"off ({why})"
        ctx = t.context_length
        pad = 0
        if t.pooling == "first_eos" and t.eos_token_id == 0:
            pad = 1
        return tuple(sorted({min(b, ctx) for b in values} | {ctx})), pad, None

    def text_bucket(self, text_len: int) -> int:
        """The text length a call of ``text_len`` tokens runs at: the smallest bucket >= text_len (the exact
        length when bucketing is off)."""
        b = self.text_buckets
        if b is None or text_len > b[-1]:
            return text_len
        return b[bisect.bisect_left(b, text_len)]

    @property
    def context_length(self) -> int:
        """The text tower's context length (0 for a model without one)."""
        return self.spec.text.context_length if self.spec.text is not None else 0

    def runner_key(self, image_batch: int, text_batch: int, text_len: int | None, pixels: str = "float",
                   outputs: TowerOutputs | None = None) -> tuple:
        """The key of the runner a call of this shape uses: ``(images, texts, bucketed text length)``, plus
        ``"uint8"`` for frame calls, plus the TowerOutputs of a single-tower call that reads hidden states. Image-only
        calls use the context length."""
        text_len = self.context_length if not text_batch or text_len is None else self.text_bucket(text_len)
        key = (image_batch, text_batch, text_len)
        key = key if pixels == "float" else key + (pixels,)
        return key if outputs is None else key + (outputs,)

    def runner(self, image_batch: int, text_batch: int, text_len: int, capture: bool = True,
               pixels: str = "float", outputs: TowerOutputs | None = None) -> Runner:
        """The cached runner of this call shape (built, and on CUDA captured, on first use). ``text_len`` is
        padded up to its bucket (text_bucket); ``pixels``: "float" or "uint8" (camera frames); ``outputs``: what a
        single-tower call reads (plan.TowerOutputs; None: the pooled embeddings)."""
        with self._lock:
            key = self.runner_key(image_batch, text_batch, text_len, pixels, outputs)
            r = self.runners.get(key)
            if r is not None:  # the usual call: no key the checks below refuse is ever cached
                self.runners.move_to_end(key)
                if capture and r.wants_graph and r.graph is None:  # built by the coverage check or capture=False
                    try:
                        r._capture()
                    except BaseException as e:
                        self._drop(key)
                        self._raise_oom(e, key)
                        raise
                return r
            if pixels not in ("float", "uint8"):
                raise ValueError(f"pixels must be 'float' or 'uint8', got {pixels!r}")
            if pixels == "uint8" and self.frame_patch is None:
                raise ValueError("pixel_values: uint8 frames are not supported for SigLIP2 NaFlex models; run the "
                                 "model's image processor and pass its patch sequences")
            return self._build_runner(key, capture)

    def _build_runner(self, key: tuple, capture: bool) -> Runner:
        """Build (and capture) the runner of ``key``; cached only once complete: an error or an interrupt (OOM,
        KeyboardInterrupt) while building or capturing leaves the cache as it was."""
        image_batch, text_batch, text_len = key[:3]
        pixels, outputs = key_parts(key)
        rkey = key if self._grid is None else key + ("grid %dx%d" % self._grid,)
        t0 = time.perf_counter()
        r = None
        try:
            try:
                r = Runner(self, image_batch, text_batch, text_len, pixels, outputs)
            except ValueError as e:  # coverage was settled at fuse(); only input sizes can get here
                raise ValueError(f"fused: a call of {image_batch} image(s) and {text_batch} text(s) of length "
                                 f"{text_len} is outside what the kernels cover: {e}") from None
            r.key = rkey
            self.build_times[rkey] = time.perf_counter() - t0
            self._note_library(r)
            if capture and r.wants_graph:
                r._capture()
        except BaseException as e:
            self.build_times.pop(rkey, None)
            del r  # its buffers (and any graph) go now, before the OOM message reads free memory
            self._raise_oom(e, key)
            raise
        self.runners[key] = r
        while len(self.runners) > self.max_graphs:
            self._drop(next(iter(self.runners)))
        return r

    def _note_library(self, r: Runner) -> None:
        """Notes name how many steps of the last runner built take a library kernel (gemm_impl != 'triton')."""
        n = sum(c == "library" for impls, _ in r.choices for c in impls)
        base = self.notes.split(" · library:")[0]
        total = sum(len(s.steps) for s in r.plan.stages if s.kind in ("linear", "attention"))
        self.notes = base + (f" · library: {n} of {total} steps on cuBLAS / SDPA"
                             f"{' (calibrated)' if self.gemm_impl == 'auto' else ''}" if n else "")

    def library_choices(self, image_batch: int, text_batch: int, text_len: int | None = None) -> list[dict]:
        """Per stage of this call shape's runner: the step labels, the implementation of each and why."""
        r = self.runner(image_batch, text_batch, text_len or self.context_length, capture=False)
        out = []
        for st, (impls, why) in zip(r.plan.stages, r.choices or [(("triton",) * len(s.steps), "gemm_impl='triton'")
                                                                  for s in r.plan.stages]):
            out.append(dict(kind=st.kind, steps=[x.label for x in st.steps], impls=list(impls), why=why))
        return out

    def _drop(self, key: tuple) -> None:
        """Take a runner out of the cache (its buffers and graph are freed once no call holds it)."""
        r = self.runners.pop(key, None)
        if r is not None:
            r.release()

    def _raise_oom(self, e: BaseException, key: tuple) -> None:
        """An out-of-memory error while building or capturing a runner -> the same error type, naming the call
        shape and the memory its buffers need (and what the device has free)."""
        if not isinstance(e, torch.OutOfMemoryError):
            return
        images, texts, n = key[:3]
        what = f"{images} image(s)" + (" (uint8 frames)" if key_parts(key)[0] == "uint8" else "")
        what += f" and {texts} text(s) of length {n}" if texts else ""
        if self._grid is not None:
            what += " at patch grid %dx%d" % self._grid
        need = self.runner_bytes(*key[:3], key_parts(key)[0])
        # the frames of the failed build hold the half-built buffers until this error is dropped: let them go now
        traceback.clear_frames(e.__traceback__)
        free = ""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the half-built runner's blocks: back to the device for the next try
            f, total = torch.cuda.mem_get_info(self.device)
            free = f"; {f / 2**20:.0f} MiB of {total / 2**20:.0f} MiB free on {self.device} now"
        raise torch.OutOfMemoryError(
            f"fused: out of memory building the runner (buffers and CUDA graph) of a call of {what}: its buffers "
            f"need about {need / 2**20:.1f} MiB{free}. Nothing was cached: free memory, call with a smaller batch, or "
            f"lower max_graphs (now {self.max_graphs}; each cached runner keeps its buffers). ({e})") from e

    def runner_bytes(self, image_batch: int, text_batch: int, text_len: int | None, pixels: str = "float") -> int:
        """Bytes of the static buffers a runner of this call shape holds (counted on the meta device; the kernels'
        small metadata tables and split-K workspaces not included)."""
        key = self.runner_key(image_batch, text_batch, text_len, pixels)
        spec, meta = self.spec, torch.device("meta")
        total = (image_batch + text_batch) * spec.embed_dim * torch.finfo(self.dtype).bits // 8  # the output
        out = torch.empty(image_batch + text_batch, spec.embed_dim, dtype=self.dtype, device=meta)
        towers = []
        if image_batch and spec.vision is not None:
            towers.append(TowerBuffers(spec.vision, image_batch, spec.vision.seq_len, self.dtype, meta,
                                       out[:image_batch], self.residual_dtype, self.fold_ln, pixels))
        if text_batch and spec.text is not None:
            towers.append(TowerBuffers(spec.text, text_batch, key[2], self.dtype, meta, out[image_batch:],
                                       self.residual_dtype, self.fold_ln))
        seen = {id(out)}
        for b in towers:
            for v in vars(b).values():
                if isinstance(v, torch.Tensor):
                    v = v if v._base is None else v._base  # views (uint8 frames, output rows): their storage once
                    if id(v) not in seen:
                        seen.add(id(v))
                        total += v.numel() * v.element_size()
        return total

    def warmup(self, shapes) -> dict:
        """Build (and on CUDA capture) the runners of these call shapes now, so that no user call pays for it:
        ``shapes`` is a list of ``(images, texts, text_len)`` (``text_len`` any length, padded to its bucket;
        ignored when ``texts`` is 0) or ``(images, texts, text_len, "uint8")`` for camera frames. Returns
        ``{runner key: seconds}`` for these shapes (also kept in ``build_times``). SigLIP2 NaFlex: runners of
        the native patch grid. No-op (returns {}) when the executor fell back to a stock one."""
        if self.fallback is not None:
            return {}
        if isinstance(shapes, tuple) and shapes and isinstance(shapes[0], int):
            shapes = [shapes]  # one shape
        try:
            shapes = [tuple(s) for s in shapes]
        except TypeError:
            raise ValueError(f"warmup: expected a list of (images, texts, text_len) shapes, got {shapes!r}") from None
        target = self
        if self.spec.vision is not None and self.spec.vision.embed.pos_grid is not None:
            g = self.spec.vision.embed.pos_grid
            target = self._grid_executor(g, g)
        ctx = self.context_length
        keys = []
        for s in shapes:
            want = "(images, texts, text_len) or (images, texts, text_len, 'uint8')"
            if len(s) not in (3, 4) or not all(isinstance(v, int) and not isinstance(v, bool) for v in s[:2]):
                raise ValueError(f"warmup: expected shapes {want}, got {s!r}")
            ni, nt, n = s[:3]
            pixels = s[3] if len(s) == 4 else "float"
            if ni < 0 or nt < 0 or ni + nt == 0:
                raise ValueError(f"warmup: expected images >= 0 and texts >= 0, not both 0, got {s!r}")
            for n_, name in ((ni, "vision"), (nt, "text")):
                if n_ and name not in self.spec.towers:
                    raise ValueError(f"warmup: this model has no {name} tower, got {s!r}")
            if nt and (not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= ctx):
                raise ValueError(f"warmup: text_len must be an int in [1, {ctx}] (the context length), got {s!r}")
            if pixels not in ("float", "uint8") or (pixels == "uint8" and not ni):
                raise ValueError(f"warmup: the 4th entry must be 'float' or 'uint8' (with images >= 1), got {s!r}")
            keys.append(target.runner_key(ni, nt, n, pixels))
        if len(set(keys)) > self.max_graphs:
            raise ValueError(f"warmup: {len(set(keys))} distinct runners (after text buckets) but max_graphs="
                             f"{self.max_graphs} keeps fewer; raise max_graphs or warm fewer shapes")
        out = {}
        with self._lock:
            out = self._warm(target, shapes, keys)
        return out

    def _warm(self, target, shapes, keys) -> dict:
        out = {}
        for s, key in zip(shapes, keys):
            r = target.runner(key[0], key[1], key[2], pixels=key_parts(key)[0])
            if not r.wants_graph and self.device.type == "cuda":  # no graph: compile the kernels now
                t0 = time.perf_counter()
                r.launch_all()
                torch.cuda.synchronize(self.device)
                self.build_times[r.key] = self.build_times.get(r.key, 0.0) + time.perf_counter() - t0
            out[r.key] = self.build_times[r.key]
        return out

    def _check_coverage(self) -> str | None:
        """Decided once, at fuse(): build (without launching) the runners of a one-image + one-text call and of
        each tower alone, so every kernel launcher validates its problems now rather than at a user's call.
        They are dropped again (their buffers would hold memory for shapes that may never come). Returns why
        the kernels refuse the model, or None."""
        if self.spec.vision is not None and self.spec.vision.embed.pos_grid is not None:  # NaFlex: native grid
            g = self.spec.vision.embed.pos_grid
            return self._grid_executor(g, g)._check_coverage()
        ctx = self.context_length
        shapes = {("vision", "text"): ((1, 1, ctx), (1, 0, ctx), (0, 1, ctx)), ("vision",): ((1, 0, ctx),),
                  ("text",): ((0, 1, ctx),)}[self.spec.towers]
        try:
            for shape in shapes:
                self.runner(*shape, capture=False)
            if self.spec.tower is not None:  # a single tower: also the runner of every hidden state
                n = 1 if self.spec.tower == "vision" else 0
                self.runner(n, 1 - n, ctx, capture=False, outputs=self.tower_outputs(self.hidden_states, None, self.pooled))
        except ValueError as e:
            return f"a kernel launcher refuses it ({e})"
        finally:
            for key in list(self.runners):
                self._drop(key)
            self.build_times.clear()
        return None

    def plan(self, image_batch: int, text_batch: int, text_len: int | None = None,
             outputs: TowerOutputs | None = None) -> Plan:
        """The plan a call of this shape runs (the executor's dtype and LayerNorm folding included; the text
        length padded to its bucket)."""
        if text_batch and text_len is not None:
            text_len = self.text_bucket(text_len)
        return make_plan(self.spec, image_batch, text_batch, text_len, elt=torch.finfo(self.dtype).bits // 8,
                         fold_ln=self.fold_ln, outputs=outputs)

    def _encode(self, px, ids):
        if self.fallback is not None:
            return self.fallback._encode(px, ids)
        if isinstance(px, PatchSequence):
            return self._encode_naflex(px, ids)
        pixels = "uint8" if px.dtype == torch.uint8 else "float"
        with self._lock:
            img, txt, pending = self.runner(px.shape[0], ids.shape[0], ids.shape[1], pixels=pixels).run(
                px, ids, self.check_ids)
        if pending is not None:  # waits for this call's work, outside the lock
            pending.check()
        return img, txt

    def _tower_embeddings(self, x):
        """encode_image / encode_text of a single tower fused without its pooled output: what its callers read
        (last_hidden_state, else the last hidden state it was fused for)."""
        t = getattr(self.spec, self.spec.tower)
        if self.hidden_states is None or t.num_layers in self.hidden_states:
            return self.encode_tower(x, hidden=(), last=True)["last"]
        k = self.hidden_states[-1]
        return self.encode_tower(x, hidden=(k,), last=False)["hidden"][k]

    def _encode_image(self, px):
        if self.fallback is not None:
            return self.fallback._encode_image(px)
        if not self.pooled:
            return self._tower_embeddings(px)
        if isinstance(px, PatchSequence):
            return self._encode_naflex(px, None)[0]
        pixels = "uint8" if px.dtype == torch.uint8 else "float"
        with self._lock:
            return self.runner(px.shape[0], 0, self.context_length, pixels=pixels).run(px, None)[0]

    # -- SigLIP2 NaFlex (executors/_naflex.py) ---------------------------------------------------------------
    def _grid_executor(self, h: int, w: int) -> "FusedExecutor":
        """This executor at one fixed (h, w) patch grid: the same weights and options, the positions resized to
        the grid (once), runners of its own. Kept in an LRU of max_graphs grids."""
        with self._lock:
            return self._grid_child(h, w)

    def _grid_child(self, h: int, w: int) -> "FusedExecutor":
        key = (h, w)
        child = self._grids.get(key)
        if child is None:
            pos = naflex_pos_embedding(self.spec.vision.embed, self.spec.vision.pos_embedding.float(), h, w)
            child = object.__new__(FusedExecutor)
            child.__dict__.update(self.__dict__)
            child.spec = grid_spec(self.spec, pos, h, w)
            child.weights = grid_spec(self.weights, pos.to(self.device, self.dtype), h, w)
            child.runners, child._grids, child._grid = OrderedDict(), None, (h, w)
            self._grids[key] = child
            while len(self._grids) > self.max_graphs:
                _, old = self._grids.popitem(last=False)
                for k in list(old.runners):
                    old._drop(k)
        else:
            self._grids.move_to_end(key)
        return child

    def _encode_naflex(self, seq: PatchSequence, ids):
        """Images grouped by patch grid, one fixed-resolution call per group (the text tower rides with the
        first); embeddings put back in the caller's order."""
        groups = grid_groups(seq)  # reads the grids back to the host: before taking the lock
        with self._lock:  # the grid executors share it (reentrant): one call's groups run together
            return self._encode_groups(seq, ids, groups)

    def _encode_groups(self, seq: PatchSequence, ids, groups):
        emb = self.spec.vision.embed
        if len(groups) == 1:
            (h, w), _ = groups[0]
            px = as_image(seq.pixel_values, h, w, emb.patch_size, emb.channels)
            return self._grid_executor(h, w)._encode(px, ids) if ids is not None else \
                (self._grid_executor(h, w)._encode_image(px), None)
        img = torch.empty(seq.shape[0], self.spec.embed_dim, dtype=self.dtype, device=self.device)
        txt = None
        for k, ((h, w), idx) in enumerate(groups):
            index = torch.tensor(idx, device=seq.pixel_values.device)
            px = as_image(seq.pixel_values.index_select(0, index), h, w, emb.patch_size, emb.channels)
            child = self._grid_executor(h, w)
            if k == 0 and ids is not None:
                part, txt = child._encode(px, ids)
            else:
                part = child._encode_image(px)
            img.index_copy_(0, index.to(self.device), part)
        return img, txt

    def _encode_text(self, ids):
        if self.fallback is not None:
            return self.fallback._encode_text(ids)
        if not self.pooled:
            return self._tower_embeddings(ids)
        with self._lock:
            _, txt, pending = self.runner(0, ids.shape[0], ids.shape[1]).run(None, ids, self.check_ids)
        if pending is not None:  # waits for this call's work, outside the lock
            pending.check()
        return txt

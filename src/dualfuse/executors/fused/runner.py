"""Runner: one call shape of the fused executor — static buffers, the co-scheduled plan, one prepared kernel op per
stage and (on CUDA) one captured graph.

Building is table-driven: ``_STAGE_BUILDERS`` maps a plan stage kind (embed, linear, layernorm, attention,
pool_index) to the function that makes its launch, and ``_PROBLEMS`` maps a plan step op (qkv, attn, fc2, ...) to
the function that makes the kernel problem of that step on the runner's buffers. A plan op without an entry is a
plan/executor mismatch and fails at build time.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch

from ...plan import Plan, Stage, Step, TowerOutputs
from ...spec import PatchEmbed, TowerSpec
from .buffers import TowerBuffers
from .library import build_chosen, choose


class Runner:
    """One call shape: buffers, plan, one prepared op per stage, and (on CUDA) one captured graph. ``ex``: the
    FusedExecutor that owns it (its spec, weights, folded layers, dtype, device and options)."""

    def __init__(self, ex, image_batch: int, text_batch: int, text_len: int,
                 pixels: str = "float", outputs: TowerOutputs | None = None):
        self.ex = ex
        spec = ex.spec
        # outputs: what a call of one tower reads (plan.TowerOutputs; None: the pooled embeddings)
        self.outputs = outputs
        # pixels: "float" (the executor's dtype) or "uint8" (camera frames; the patch embedding uses the weights
        # with the image mean/std folded in, FusedExecutor.frame_patch)
        self.pixels, self.text_batch, self.text_len = pixels, text_batch, text_len
        self.key = None  # set by FusedExecutor.runner
        self.plan: Plan = ex.plan(image_batch, text_batch, text_len, outputs=outputs)
        self._plan_steps = {(st.tower, st.layer, st.op) for st in self.plan.steps("vision") + self.plan.steps("text")}
        self.buf: dict[str, TowerBuffers] = {}
        # both towers' embeddings in one buffer: a call clones it once and returns the two row ranges
        self.output = torch.empty(image_batch + text_batch, spec.embed_dim, dtype=ex.dtype, device=ex.device)
        self.image_batch = image_batch
        if image_batch:
            self.buf["vision"] = TowerBuffers(spec.vision, image_batch, spec.vision.seq_len, ex.dtype, ex.device,
                                               self.output[:image_batch], ex.residual_dtype, ex.fold_ln, pixels)
        if text_batch:
            self.buf["text"] = TowerBuffers(spec.text, text_batch, text_len, ex.dtype, ex.device,
                                             self.output[image_batch:], ex.residual_dtype, ex.fold_ln)
        self._stats_width: dict[int, int] = {}  # row-statistics buffer address -> BLOCK_N of the launch writing it
        # the LayerNorm step (tower, layer, op) that finishes a GEMM's split-K sums -> (partial sums, GEMM bias)
        self._deferred: dict[tuple, tuple] = {}
        self._deferred_targets: dict[tuple, tuple] = {}  # GEMM step -> the LayerNorm step it may defer to
        if outputs is not None and outputs.tokens_ln:
            (b,) = self.buf.values()
            b.tokens = torch.empty(b.batch * b.seq, b.x.shape[1], dtype=ex.dtype, device=ex.device)
        self.stage_problems: list[list] = []  # per stage, its kernel problems (calibration times them)
        self.choices: list[tuple] = []  # gemm_impl != "triton": per stage, (implementation per step, why)
        self.ops = [self._build(stage) for stage in self.plan.stages]
        if self._deferred:  # partial sums nobody adds would leave the residual stream silently wrong
            raise AssertionError(f"fused runner: split-K partial sums of {sorted(self._deferred)} have no LayerNorm "
                                 f"launch to finish them (plan and executor out of sync)")
        self.embed_op = self.ops[[s.kind for s in self.plan.stages].index("embed")]
        # single-tower calls: the hidden states asked for, copied out of the residual stream once complete
        self.hidden: dict[int, torch.Tensor] = {}
        self.tokens: torch.Tensor | None = None  # the final LN over every token (TowerOutputs.tokens_ln)
        self._after: dict[int, list] = {}  # stage index -> the hidden-state copies launched right after it
        if outputs is not None:
            self._add_tower_outputs(outputs)
        self.graph = None  # captured at the first call (fuse() builds runners only to check coverage)
        self._last_stream = None  # CUDA: the stream of the last call (the next call on another stream waits on it)
        # CUDA: the stream the buffers were allocated on (the caching allocator reuses them there once freed)
        self._cuda = ex.device.type == "cuda"
        self._home = torch.cuda.current_stream(ex.device) if self._cuda else None
        self.wants_graph = self._cuda and ex.use_graph
        # what every call reads, looked up once (run() is on the host's critical path before the replay)
        self._device_index = ex.device.index  # resolve_device gives CUDA devices an index
        self._px_in = self.buf["vision"].input if image_batch else None
        self._ids_in = self.buf["text"].input if text_batch else None
        # CUDA: (pinned flag, event) pairs of finished id checks, reused by later calls (_PendingIdCheck)
        self._id_checks: list[_PendingIdCheck] = []

    # -- building ----------------------------------------------------------------------------------------
    def _build(self, stage: Stage):
        build = _STAGE_BUILDERS.get(stage.kind)
        if build is None:
            raise AssertionError(f"plan stage kind {stage.kind!r} has no kernel")
        problems = [self._problem(step) for step in stage.steps]
        self.stage_problems.append(problems)
        if self.ex.gemm_impl == "triton":
            return build(self, stage, problems)
        # per step: the Triton launch or a library kernel (cuBLAS / SDPA), from the calibrated cost model
        impls, why = choose(self, stage, problems, self.ex.calibration, self.ex.gemm_impl)
        self.choices.append((impls, why))
        return build_chosen(build, self, stage, problems, impls)

    def build_triton(self, stage: Stage, problems):
        """The Triton launch of ``stage`` over ``problems`` (a subset of a plan stage's steps: calibration)."""
        return _STAGE_BUILDERS[stage.kind](self, stage, problems)

    def _add_tower_outputs(self, outputs: TowerOutputs) -> None:
        """Buffers [B, S, D] for each hidden state asked for and one copy launch each, placed right after the stage
        that completes it: hidden state 0 after the embeddings (and CLIP's pre-LN), hidden state i after block
        i-1's FC2, or after the LayerNorm launch that finishes FC2's deferred split-K sums (Runner._deferred_to)."""
        (name, b), = self.buf.items()
        t: TowerSpec = getattr(self.ex.weights, name)
        shape = (b.batch, b.seq, t.width)
        if outputs.tokens_ln:
            self.tokens = b.tokens.view(shape)
        where = {}  # stage index -> hidden indices complete after it
        for k in outputs.hidden:
            if k == 0:
                target = (name, None, "pre_ln" if t.pre_ln is not None else
                          ("patch_embed" if name == "vision" else "token_embed"))
            else:
                fc2 = (name, k - 1, "fc2")
                target = self._deferred_targets.get(fc2, fc2)
            stage = next(i for i, s in enumerate(self.plan.stages)
                         if any((st.tower, st.layer, st.op) == target for st in s.steps))
            where.setdefault(stage, []).append(k)
            self.hidden[k] = torch.empty(shape, dtype=self.ex.dtype, device=self.ex.device)
        self._after = {i: [_copy_op(self.hidden[k], b.x.view(shape)) for k in ks] for i, ks in where.items()}

    def _deferred_to(self, step: Step):
        """The LayerNorm step (tower, layer, op) that reads this GEMM's output (the residual stream) next and
        can finish its split-K reduction: out-proj -> ln2, FC2 -> the next layer's ln1 or SigLIP's head LN.
        None: no such launch (LN folded into the GEMMs, the last FC2 before a pooled-row LN, other steps)."""
        if not self.ex.defer_split_reduce or self.ex.fold_ln:
            return None
        t: TowerSpec = getattr(self.ex.weights, step.tower)
        target = None
        if step.op == "out":
            target = (step.tower, step.layer, "ln2")
        elif step.op == "fc2" and step.layer + 1 < len(t.blocks):
            target = (step.tower, step.layer + 1, "ln1")
        elif step.op == "fc2" and t.pooling == "map":
            target = (step.tower, None, "final_ln")
        if target not in self._plan_steps:  # a single-tower call that stops early or skips the head
            return None
        self._deferred_targets[(step.tower, step.layer, step.op)] = target
        return target

    def _defer_split_reduction(self, op, problems, deferrable):
        """Where the launch splits the K of a GEMM on the residual stream (out-proj, FC2; batch 1), rebuild it
        (same tiles and splits) with those problems writing raw partial sums, and leave them to the LayerNorm
        launch that reads the residual stream next (kernels.layernorm `add`: it adds the slices, the bias and the
        residual): the GEMM loses its split-K tail (arrival counter, partial loads by the last program), which
        sits on the critical path at batch 1. Tiles and splits stay the cost model's (which charges the tail:
        letting it split more once the tail is gone was slower end to end, BENCHMARKS.md)."""
        from ...kernels.gemm import GroupedLinear, LinearProblem
        from ...kernels.layernorm import MAX_ADD_SLICES

        if not any(deferrable.get(id(p)) and s > 1 for p, s in zip(problems, op.splits)):
            return op
        # every deferrable problem of the launch, split or not (1 slice), so their outs share fp32
        chosen = [i for i, p in enumerate(problems) if deferrable.get(id(p))]
        if any(op.splits[i] > MAX_ADD_SLICES for i in chosen):  # more slices than a LayerNorm launch adds
            return op
        # one launch shares its out dtype: partial sums are fp32, so every other problem must write fp32 too
        if any(i not in chosen and p.out.dtype != torch.float32 for i, p in enumerate(problems)):
            return op
        new = list(problems)
        for i in chosen:
            p = problems[i]
            parts = torch.empty(op.splits[i], *p.out.shape, dtype=torch.float32, device=p.out.device)
            new[i] = LinearProblem(p.x, p.weight, parts, partial_sums=True, weight_scale=p.weight_scale)
            self._deferred[deferrable[id(p)]] = (parts, p.bias)
        return GroupedLinear(new, config=dict(op.config), split_k=list(op.splits))

    def _problem(self, step: Step):
        make = _PROBLEMS.get(step.op)
        if make is None:  # plan and executor out of sync
            raise AssertionError(f"plan step {step.op!r} has no kernel problem")
        return make(_StepContext(self, step))

    def release(self) -> None:
        """Leaving the cache: the buffers go back to PyTorch's caching allocator, which reuses them for work on the
        stream they were made on; if the last call ran on another stream, that stream waits for it first."""
        if self._last_stream is not None and self._last_stream != self._home:
            self._home.wait_stream(self._last_stream)
        self._last_stream = None

    # -- running -----------------------------------------------------------------------------------------
    def launch_all(self):
        if not self._after:
            for op in self.ops:
                op()
            return
        for i, op in enumerate(self.ops):
            op()
            for copy in self._after.get(i, ()):
                copy()

    def _capture(self):
        """Warm up (compiles every kernel outside the capture), then capture the launches into one graph. A failure
        or interrupt anywhere leaves no graph (``self.graph`` stays None, the next call captures again) and the
        caller's current stream restored (torch.cuda.graph leaves its capture stream current when ending a
        broken capture raises)."""
        dev = self.ex.device
        t0 = time.perf_counter()
        caller = torch.cuda.current_stream(dev)
        graph = torch.cuda.CUDAGraph()
        try:
            stream = torch.cuda.Stream(dev)
            stream.wait_stream(caller)
            with torch.cuda.stream(stream):
                self.launch_all()
            caller.wait_stream(stream)
            # thread_local: CUDA calls of the caller's other threads (preprocessing, other models) stay legal
            # during this capture; this executor's own calls wait on its lock
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.launch_all()
            torch.cuda.synchronize(dev)
        except BaseException:
            if torch.cuda.current_stream(dev) != caller:
                torch.cuda.set_stream(caller)
            del graph
            raise
        self.graph = graph
        self._last_stream = None
        if self.key is not None:  # first-call time: building the runner, then this capture
            times = self.ex.build_times
            times[self.key] = times.get(self.key, 0.0) + time.perf_counter() - t0

    def __call__(self, px, ids, check_ids: bool = True):
        """One call: :meth:`run`, then the token-id check (waits for this call's work)."""
        img, txt, pending = self.run(px, ids, check_ids)
        if pending is not None:
            pending.check()
        return img, txt

    def run(self, px, ids, check_ids: bool = True):
        """Copy the inputs in, run (replay the graph), clone the embeddings out: all on the caller's current
        stream, so inputs made on that stream are read after they are written and the outputs are ready on it.
        Returns ``(image embeds or None, text embeds or None, pending id check or None)``. The caller
        (FusedExecutor) holds the executor's lock and calls ``pending.check()`` after releasing it: on CUDA the
        embedding kernel's bad-id flag is copied to the host asynchronously and zeroed in stream order here, so
        the wait for it does not hold the lock (other threads enqueue their calls meanwhile). On CPU the flag is
        read here."""
        if self.graph is None and self.wants_graph:
            self._capture()
        if self._cuda:
            cur = torch.cuda.current_stream(self._device_index)
            if self._last_stream is not None and cur != self._last_stream:
                # the previous call ran on another stream and may still read these static buffers (or write the
                # output it clones): order this call after it, on the device (no host sync)
                cur.wait_stream(self._last_stream)
            self._last_stream = cur
        if px is not None:
            # [B, C, H, W] (uint8 frames: a view of the channels-last buffer, which copy_ fills from either
            # layout); a NaFlex call gives a [B, C, h, p, w, p] view
            dst = self._px_in
            (dst if px.dim() == 4 else dst.view(px.shape)).copy_(px)
        if ids is not None:
            dst, n = self._ids_in, ids.shape[1]
            if n == self.text_len:
                dst.copy_(ids)
            elif n < self.text_len and self.ex.text_buckets is not None:
                # a text-length bucket: the texts, then pad ids the pooling cannot pick (FusedExecutor.text_pad_id)
                # in positions the causal mask hides from every earlier one
                dst[:, :n].copy_(ids)
                dst[:, n:].fill_(self.ex.text_pad_id)
            else:
                raise ValueError(f"fused runner: texts of length {n} given to the runner of length {dst.shape[1]}")
        if self.graph is not None:
            self.graph.replay()
        else:
            self.launch_all()
        out = self.output.clone()
        pending = None
        if check_ids and ids is not None:
            # the embedding kernel flagged ids outside the vocabulary (on the device, no sync before the forward)
            if self._cuda:
                free = self._id_checks
                pending = (free.pop() if free else _PendingIdCheck(self.embed_op, free)).start(ids, cur)
            else:
                self.embed_op.raise_on_bad_ids()
        img = out[:self.image_batch] if self.image_batch else None
        txt = out[self.image_batch:] if self.text_batch else None
        return img, txt, pending


class _PendingIdCheck:
    """One call's bad-id flag on its way to the host: copied into pinned memory and zeroed on the device, both in
    stream order right after the call's launches (so the next call, whatever thread makes it, starts from a clean
    flag); :meth:`check` waits for the copy only and raises as Embeddings.raise_on_bad_ids does. Once checked, its
    pinned flag and event go back to the runner's free list for a later call (allocating pinned memory and an
    event per call costs host time before the next replay)."""

    __slots__ = ("flag", "done", "ids", "vocab", "bad_ids", "free")

    def __init__(self, embed_op, free: list):
        self.flag = torch.empty(1, dtype=torch.int32, pin_memory=True)
        self.done = torch.cuda.Event()
        self.ids = None
        self.vocab = int(embed_op.token_problems[0].token_weight.shape[0])
        self.bad_ids = embed_op.bad_ids
        self.free = free

    def start(self, ids: torch.Tensor, stream) -> "_PendingIdCheck":
        """Enqueue the copy and the zeroing after this call's launches (the caller holds the executor's lock)."""
        self.flag.copy_(self.bad_ids, non_blocking=True)
        self.bad_ids.zero_()
        self.done.record(stream)
        self.ids = ids  # the caller's ids (the runner's buffer may hold the next call's by the time of check())
        return self

    def check(self) -> None:
        self.done.synchronize()
        bad, ids = self.flag.item(), self.ids
        self.ids = None
        self.free.append(self)  # the copy has landed and was read: the flag and event may be reused
        if not bad:
            return
        lo, hi = torch.aminmax(ids)
        raise ValueError(f"input_ids: token ids out of the vocabulary (expected ids in [0, {self.vocab})); got ids "
                         f"in [{int(lo)}, {int(hi)}] for a table of {self.vocab}")


# ------------------------------------------------------------------------------------------- stage builders
# (runner, stage, the stage's kernel problems in step order) -> one callable launching the stage

def _build_embed(r: Runner, stage: Stage, problems):
    from ...kernels.embed import Embeddings, PatchEmbedProblem

    patch = [p for p in problems if isinstance(p, PatchEmbedProblem)]
    token = [p for p in problems if not isinstance(p, PatchEmbedProblem)]
    return Embeddings(patch, token)


def _build_linear(r: Runner, stage: Stage, problems):
    from ...kernels.gemm import GroupedLinear

    cfg = dict(r.ex.gemm_config)
    if not r.ex.pdl:
        cfg["pdl"] = False
    deferrable = {id(p): r._deferred_to(st) for p, st in zip(problems, stage.steps)}

    def linear(ps):
        op = GroupedLinear(ps, config=cfg or None)
        op = r._defer_split_reduction(op, ps, deferrable)
        for p in ps:  # a later folded LN merges these statistics: it needs their part width
            if p.row_stats_out is not None:
                r._stats_width[p.row_stats_out.data_ptr()] = op.block_n
        return op

    return in_dtype_groups(problems, linear)


def _build_layernorm(r: Runner, stage: Stage, problems):
    from ...kernels.layernorm import GroupedLayerNorm

    return in_dtype_groups(problems, lambda ps: GroupedLayerNorm(ps, pdl=r.ex.pdl))


def _build_attention(r: Runner, stage: Stage, problems):
    from ...kernels.attention import GroupedAttention

    return GroupedAttention(problems, pdl=r.ex.pdl)


def _build_pool_index(r: Runner, stage: Stage, problems):
    from ...kernels.heads import PoolIndices

    return PoolIndices(problems)


_STAGE_BUILDERS: dict[str, Callable] = {
    "embed": _build_embed,
    "linear": _build_linear,
    "layernorm": _build_layernorm,
    "attention": _build_attention,
    "pool_index": _build_pool_index,
}


# ------------------------------------------------------------------------------------------- step problems

class _StepContext:
    """What a step's problem builder reads: the runner, the step, its tower's weights and buffers."""

    __slots__ = ("r", "step", "t", "b", "B", "S", "D", "blk")

    def __init__(self, r: Runner, step: Step):
        self.r, self.step = r, step
        self.t: TowerSpec = getattr(r.ex.weights, step.tower)
        self.b: TowerBuffers = r.buf[step.tower]
        self.B, self.S, self.D = self.b.batch, self.b.seq, self.t.width
        self.blk = self.t.blocks[step.layer] if step.layer is not None else None

    def ln(self, x, norm, out, row_index=None):
        from ...kernels.layernorm import LayerNormProblem

        # the GEMM that wrote x may have left its split-K sums for this launch to finish (Runner._deferred_to)
        s = self.step
        add, add_bias = self.r._deferred.pop((s.tower, s.layer, s.op), (None, None))
        return LayerNormProblem(x, norm.weight, norm.bias, out, norm.eps, row_index, add=add, add_bias=add_bias)

    @staticmethod
    def lin(x, layer, out, activation=None, residual=None):
        from ...kernels.gemm import LinearProblem

        # a quantized layer (dualfuse.quantize) carries its per-channel scales
        return LinearProblem(x, layer.weight, out, layer.bias, activation, residual, weight_scale=layer.scale)

    def folded(self, x, out, stats, activation=None):
        from ...kernels.gemm import LinearProblem

        # LN -> linear as one GEMM over the raw rows (weights folded once in FusedExecutor._prepare_weights); x's
        # row statistics come from the GEMM that wrote x (an earlier stage of this runner)
        s = self.step
        lin, norm = self.r.ex.folded[(s.tower, s.layer, s.op)]
        norm = dataclasses.replace(norm, stats=stats, stats_part_width=self.r._stats_width[stats.data_ptr()])
        return LinearProblem(x, lin.weight, out, lin.bias, activation, norm=norm, weight_scale=lin.scale)

    @property
    def fold(self) -> bool:
        return self.r.ex.fold_ln


def _patch_embed(c: _StepContext):
    from ...kernels.embed import PatchEmbedProblem

    t, b = c.t, c.b
    emb: PatchEmbed = t.embed
    w, bias = c.r.ex.frame_patch if c.r.pixels == "uint8" else (emb.weight, emb.bias)
    return PatchEmbedProblem(b.input, w, bias, t.class_embedding, t.pos_embedding, b.embed_out.view(c.B, c.S, c.D),
                             emb.patch_size)


def _token_embed(c: _StepContext):
    from ...kernels.embed import TokenEmbedProblem

    return TokenEmbedProblem(c.b.input, c.t.embed.weight, c.t.pos_embedding, c.b.embed_out.view(c.B, c.S, c.D))


def _pool_index(c: _StepContext):
    from ...kernels.heads import PoolProblem

    return PoolProblem(c.t.pooling, c.b.pool_idx, c.b.input, c.t.eos_token_id, c.S)


def _attn(c: _StepContext):
    from ...kernels.attention import AttentionProblem, split_packed_qkv

    B, S, D = c.B, c.S, c.D
    q, k, v = split_packed_qkv(c.b.qkv.view(B, S, 3 * D), D)
    return AttentionProblem(q, k, v, c.b.a.view(B, S, D), c.t.heads, causal=c.t.mask == "causal")


def _out(c: _StepContext):  # the next LN (ln2) reads x
    b = c.b
    return with_stats(c.lin(b.a, c.blk.out, b.x, residual=b.x), b.x_stats if c.fold else None)


def _fc2(c: _StepContext):  # the next layer's ln1, or SigLIP's head LN, reads x
    b, t = c.b, c.t
    emit = c.fold and (c.step.layer + 1 < len(t.blocks) or t.pooling == "map")
    return with_stats(c.lin(b.m, c.blk.fc2, b.x, residual=b.x), b.x_stats if emit else None)


def _map_attn(c: _StepContext):  # SigLIP attention-pooling head
    from ...kernels.attention import AttentionProblem

    B, S, D = c.B, c.S, c.D
    kv = c.b.kv.view(B, S, 2 * D)
    q = c.r.ex.map_query.view(1, 1, D).expand(B, 1, D)  # batch stride 0: one probe for all images
    return AttentionProblem(q, kv[..., :D], kv[..., D:], c.b.ma, c.t.pool_head.heads)


def _map_out(c: _StepContext):  # the head's LN reads mh
    b = c.b
    return with_stats(c.lin(b.ma.view(c.B, c.D), c.t.pool_head.out, b.mh), b.mh_stats if c.fold else None)


# plan step op -> kernel problem on the runner's buffers
_PROBLEMS: dict[str, Callable[[_StepContext], object]] = {
    "patch_embed": _patch_embed,
    "token_embed": _token_embed,
    "pool_index": _pool_index,
    "pre_ln": lambda c: c.ln(c.b.embed_out, c.t.pre_ln, c.b.x),
    "ln1": lambda c: c.ln(c.b.x, c.blk.ln1, c.b.h),
    "qkv": lambda c: c.lin(c.b.h, c.blk.qkv, c.b.qkv),
    "ln1_qkv": lambda c: c.folded(c.b.x, c.b.qkv, c.b.x_stats),
    "attn": _attn,
    "out": _out,
    "ln2": lambda c: c.ln(c.b.x, c.blk.ln2, c.b.h),
    "fc1": lambda c: c.lin(c.b.h, c.blk.fc1, c.b.m, activation=c.t.activation),
    "ln2_fc1": lambda c: c.folded(c.b.x, c.b.m, c.b.x_stats, activation=c.t.activation),
    "fc2": _fc2,
    "tokens_ln": lambda c: c.ln(c.b.x, c.t.final_ln, c.b.tokens),
    "pool_ln": lambda c: c.ln(c.b.x, c.t.final_ln, c.b.pooled, row_index=c.b.pool_idx),
    "proj": lambda c: c.lin(c.b.pooled, c.t.projection, c.b.output),
    # SigLIP attention-pooling head
    "final_ln": lambda c: c.ln(c.b.x, c.t.final_ln, c.b.h),
    "map_kv": lambda c: c.lin(c.b.h, c.r.ex.map_kv, c.b.kv),
    "final_ln_map_kv": lambda c: c.folded(c.b.x, c.b.kv, c.b.x_stats),
    "map_attn": _map_attn,
    "map_out": _map_out,
    "map_ln": lambda c: c.ln(c.b.mh, c.t.pool_head.ln, c.b.mln),
    "map_fc1": lambda c: c.lin(c.b.mln, c.t.pool_head.fc1, c.b.mm, activation=c.t.activation),
    "map_ln_fc1": lambda c: c.folded(c.b.mh, c.b.mm, c.b.mh_stats, activation=c.t.activation),
    "map_fc2": lambda c: c.lin(c.b.mm, c.t.pool_head.fc2, c.b.mh, residual=c.b.mh),
}


def _copy_op(dst: torch.Tensor, src: torch.Tensor):
    """One launch copying a hidden state out of the residual stream (cast to the model dtype)."""
    return lambda: dst.copy_(src)


def with_stats(problem, stats):
    """The problem, also writing its out's row statistics to ``stats`` (None: as it is)."""
    return problem if stats is None else dataclasses.replace(problem, row_stats_out=stats)


def in_dtype_groups(problems, build):
    """One launch shares its input and output dtypes: a stage whose steps differ there (a residual-stream
    step, fp32, paired with a model-dtype one) runs as one launch per dtype pair, in order."""
    groups: dict[tuple, list] = {}
    for p in problems:
        groups.setdefault((p.x.dtype, p.out.dtype), []).append(p)
    if len(groups) == 1:
        return build(problems)
    ops = [build(ps) for ps in groups.values()]

    def run_all():
        for op in ops:
            op()

    return run_all

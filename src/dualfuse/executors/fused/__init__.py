"""fused: both towers as one co-scheduled stream of horizontally fused Triton launches.

For each call shape ``(image batch, text batch, text length)`` a :class:`Runner` is built once:
static buffers for both towers, the co-scheduled plan (dualfuse.plan: one stage = one launch covering a step
of each tower), and one prepared kernel op per stage (GroupedLinear, GroupedLayerNorm, GroupedAttention,
Embeddings, PoolIndices). On CUDA the whole sequence of launches is captured into ONE CUDA graph; a call copies
the inputs into the static buffers, replays the graph and clones the embeddings out. Runners are cached per
shape in a bounded LRU. Image-only and text-only calls have plans (and graphs) of their own. Text lengths are
padded up to a few buckets where that cannot change the output (causal text towers pooled at EOS / argmax / the
first token: FusedExecutor._resolve_text_buckets), so ``padding=True`` streams reuse a handful of runners;
``warmup(shapes)`` builds runners up front and ``build_times`` keeps each runner's first-call time. uint8 camera
frames run on runners of their own whose patch embedding has the image mean/std folded in (``frame_patch``).

On CPU the same launches run through the Triton interpreter when TRITON_INTERPRET=1 (slow; for tests).

Threads, streams, faults: one reentrant lock per executor covers the runner cache (build, capture, LRU) and each
call's input copies, replay, output clone and bad-id flag read, so concurrent calls return what serial calls return
(they run one at a time). A call's work is issued on the caller's current CUDA stream; a call on another stream than
the runner's previous call first waits for that call on the device. Outputs are fresh tensors, never views of a
runner's buffers. A runner is cached only once built and captured: an error, an out-of-memory error (re-raised naming
the call shape and its buffers' size) or a KeyboardInterrupt leaves the cache as it was and the caller's stream
current.

``dualfuse.fuse(model)`` wraps this executor in :class:`dualfuse.executors.dropin.FusedModel`, a drop-in
with the source model's calls.

Layout: ``buffers.py`` (static buffers of a runner), ``runner.py`` (:class:`Runner`: plan stages -> kernel ops,
capture, replay), ``executor.py`` (:class:`FusedExecutor`, coverage, buckets, warmup, NaFlex grids).
"""
from __future__ import annotations

from .executor import MAX_HEAD_DIM, FusedExecutor, unsupported_reason
from .runner import Runner

__all__ = ["FusedExecutor", "Runner", "unsupported_reason", "MAX_HEAD_DIM"]

"""How dualfuse times things: one place, so that every figure (bench, profile latency, ceilings, the kernel
benchmarks) comes from the same clock and the same statistics.

- :func:`time_calls`: per-call milliseconds of ``fn(i)``. On CUDA, events recorded around each call on the current
  stream and the device synchronized after each call: the GPU starts every call idle, so the time includes the
  launch overhead the GPU waits for (per-call latency, what a user of ``encode`` sees). On CPU,
  ``time.perf_counter``. ``flush_l2=True`` overwrites a buffer larger than the L2 cache before each call, outside
  the timed span, so that weights do not stay cached between calls (cold-cache kernel timings).
- :func:`time_graph`: the given launches captured once in a CUDA graph, then replayed back to back; per-replay
  milliseconds (kernel time without launch overhead).
- :func:`best_of`: the fastest of a few runs, in seconds: for ceilings, where the best run is closest to the peak.
- :func:`stats`: median, p90, mean, min, max of samples (percentiles interpolated like numpy's default).
"""
from __future__ import annotations

import math
import time

import torch

# Bigger than the L2 of any card we time on (H100 50 MiB, H200 60 MiB), as triton.testing.do_bench's flush.
L2_FLUSH_BYTES = 256 << 20


def sync(device) -> None:
    """Wait for the device's queued work; nothing to wait for on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _l2_flusher(device: torch.device):
    if device.type != "cuda":
        return None
    buf = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    return buf.zero_


def time_calls(fn, iters: int, device, *, on_step=None, flush_l2: bool = False) -> list[float]:
    """Call ``fn(i)`` for i in range(iters); per-call milliseconds (see the module docstring).

    ``on_step()`` runs after each call, outside the timed span (a progress bar)."""
    device = torch.device(device)
    samples = []
    flush = _l2_flusher(device) if flush_l2 else None
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        torch.cuda.synchronize(device)
        for i in range(iters):
            if flush is not None:
                flush()
            starts[i].record()
            fn(i)
            ends[i].record()
            ends[i].synchronize()
            if on_step:
                on_step()
        samples = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for i in range(iters):
            t0 = time.perf_counter()
            fn(i)
            samples.append((time.perf_counter() - t0) * 1e3)
            if on_step:
                on_step()
    return samples


def time_graph(layers, replays: int, *, warmup: int = 10, warm_ms: float = 30.0) -> list[float]:
    """Capture every launch of ``layers`` (a list of lists of zero-argument callables) in one CUDA graph and
    replay it ``replays`` times back to back; per-replay milliseconds.

    The launches run once on a side stream before the capture (compilation, cuBLAS handles and workspaces stay
    out of the graph). The graph is replayed for at least ``warmup`` replays and ``warm_ms`` before timing:
    clocks drop while the host compiles, and a few replays don't bring them back."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for ops in layers:
            for op in ops:
                op()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for ops in layers:
            for op in ops:
                op()
    t_end = time.perf_counter() + warm_ms / 1e3
    n = 0
    while n < warmup or time.perf_counter() < t_end:
        graph.replay()
        n += 1
        if n % 10 == 0:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    for s, e in zip(starts, ends):
        s.record()
        graph.replay()
        e.record()
    torch.cuda.synchronize()
    del graph
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def best_of(fn, device, reps: int) -> float:
    """Seconds of the fastest of ``reps`` calls of ``fn()``."""
    return min(time_calls(lambda i: fn(), reps, device)) / 1e3


def percentile(values, q: float, *, nearest: bool = False) -> float:
    """The ``q``-th percentile of ``values`` (any order; NaN when empty): linear interpolation between the closest
    ranks (numpy's default), or with ``nearest`` the value at the nearest rank."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100.0
    if nearest:
        return xs[min(len(xs) - 1, max(0, int(round(pos))))]
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def stats(samples: list[float]) -> dict:
    """median_ms, p90_ms, mean_ms, min_ms, max_ms and runs of per-call milliseconds."""
    xs = sorted(samples)
    return dict(median_ms=percentile(xs, 50), p90_ms=percentile(xs, 90),
                mean_ms=sum(xs) / len(xs) if xs else float("nan"), min_ms=xs[0] if xs else float("nan"),
                max_ms=xs[-1] if xs else float("nan"), runs=len(xs))

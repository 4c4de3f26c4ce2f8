"""Labels for CUDA graph replays: the replayed kernels carry no ranges, so they are matched, in launch order, to
the kernels of one labelled run outside the graph (the graph executor: both towers run eagerly with labels; its
replay is an interleaving of the two towers' sequences, recovered by dynamic programming over kernel names and
durations; fused: the k-th kernel is plan stage k). When the sequences do not match, the kernels that could not
be matched are marked ``unattributed`` and the report says so."""
from __future__ import annotations

import math
from collections import Counter, defaultdict

from .analyze import Event, classify


def match_order(replay: list[Event], refs: list[list[Event]]) -> tuple[int, str | None]:
    """Label replayed kernels from labelled reference sequences (one run outside the graph), in launch order.

    1. Exact: with one reference sequence the k-th replayed kernel is the k-th reference kernel; with two (the
       towers of a two-branch graph) the replay, sorted by start, is an interleaving of both, recovered by dynamic
       programming over names (durations break ties between same-named kernels).
    2. When names or counts differ (inside a graph cuBLAS/cuDNN may pick other kernels), each stream of the
       replay is aligned to the reference sequence it resembles most by edit distance over names: kernels
       matched by name or standing in the place of a differently named one take its labels; extra kernels take
       the labels of the kernel before them on their stream. The note says how many of each.
    3. Otherwise the kernels past the longest exact match stay 'unattributed'.
    Returns (kernels labelled, note or None)."""
    replay.sort(key=lambda e: e.start_us)
    refs = [r for r in refs if r]
    total_ref = sum(len(r) for r in refs)
    if not refs:
        return 0, "no labelled reference kernels to match the CUDA graph replay against"
    if len(refs) == 1:
        ref = refs[0]
        k = 0
        while k < min(len(ref), len(replay)) and replay[k].name == ref[k].name:
            _copy_labels(replay[k], ref[k])
            k += 1
    else:
        k = _interleave(replay, refs[0], refs[1])
    if k == len(replay) == total_ref:
        return k, None
    streams: dict = defaultdict(list)
    for e in replay:
        streams[e.stream].append(e)
    if len(streams) == len(refs):
        for e in replay:
            _clear_labels(e)
        groups = list(streams.values())
        if len(refs) == 2 and _similarity(groups[0], refs[1]) + _similarity(groups[1], refs[0]) > \
                _similarity(groups[0], refs[0]) + _similarity(groups[1], refs[1]):
            groups.reverse()
        same = subst = extra = 0
        for group, ref in zip(groups, refs):
            a, b, c = _align_stream(group, ref)
            same, subst, extra = same + a, subst + b, extra + c
        note = (f"CUDA graph replay has {len(replay)} kernels, the labelled run outside the graph {total_ref} "
                "(code can take other paths while a graph is captured: transformers builds an explicit causal mask, "
                f"attention may pick another backend): aligned per stream by name — {same} matched, {subst} in the "
                f"place of a differently named kernel, {extra} extra kernel(s) given the labels of the kernel "
                "before them on their stream")
        return len(replay), note
    return k, (f"CUDA graph replay has {len(replay)} kernels, the labelled run {total_ref}; {k} matched in order, "
               f"{len(replay) - k} left unattributed")


def _clear_labels(e: Event):
    e.tower, e.layer, e.op, e.parts, e.flops, e.bytes, e.cost_source = "unattributed", None, None, None, None, None, None


def _similarity(group: list[Event], ref: list[Event]) -> float:
    a, b = Counter(e.name for e in group), Counter(e.name for e in ref)
    return sum((a & b).values()) - 0.5 * abs(len(group) - len(ref))


def _align_stream(group: list[Event], ref: list[Event]) -> tuple[int, int, int]:
    """Edit-distance alignment of one stream's replayed kernels with a reference sequence; labels copied."""
    n, m = len(group), len(ref)
    gcls, rcls = [classify(e.name) for e in group], [classify(e.name) for e in ref]
    INF = float("inf")
    cost = [[INF] * (m + 1) for _ in range(n + 1)]
    move = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n + 1):
        cost[i][0], move[i][0] = float(i), 1
    for j in range(m + 1):
        cost[0][j], move[0][j] = float(j), 2
    cost[0][0] = 0.0
    for i in range(1, n + 1):
        gi = group[i - 1]
        ci, cprev = cost[i], cost[i - 1]
        for j in range(1, m + 1):
            rj = ref[j - 1]
            if gi.name == rj.name:
                d = cprev[j - 1] + 0.01 * min(abs(math.log((gi.dur_us + 0.05) / (rj.dur_us + 0.05))), 1.0)
            else:  # a differently named kernel in its place: cheaper when it does the same kind of work
                d = cprev[j - 1] + (0.5 if gcls[i - 1] == rcls[j - 1] else 1.0)
            best, mv = d, 0
            if cprev[j] + 1.0 < best:  # extra replay kernel
                best, mv = cprev[j] + 1.0, 1
            if ci[j - 1] + 1.0 < best:  # reference kernel missing from the replay
                best, mv = ci[j - 1] + 1.0, 2
            ci[j], move[i][j] = best, mv
    pairs: list = [None] * n
    i, j = n, m
    while i > 0 or j > 0:
        mv = move[i][j]
        if i > 0 and j > 0 and mv == 0:
            pairs[i - 1] = j - 1
            i, j = i - 1, j - 1
        elif i > 0 and (mv == 1 or j == 0):
            i -= 1
        else:
            j -= 1
    same = subst = extra = 0
    for k, e in enumerate(group):
        r = pairs[k]
        if r is not None:
            src = ref[r]
            if src.name == e.name:
                _copy_labels(e, src)
                same += 1
            else:
                e.tower, e.layer, e.op, e.parts = src.tower, src.layer, src.op, src.parts
                subst += 1
    for k, e in enumerate(group):
        if pairs[k] is None:
            nb = next((group[x] for x in range(k - 1, -1, -1) if pairs[x] is not None), None) or \
                next((group[x] for x in range(k + 1, n) if pairs[x] is not None), None)
            if nb is not None:
                e.tower, e.layer, e.op = nb.tower, nb.layer, nb.op
                extra += 1
    return same, subst, extra


def _copy_labels(dst: Event, src: Event):
    for f in ("tower", "layer", "op", "op_class", "flops", "bytes", "parts", "cost_source", "cpu_op", "shapes",
              "dtypes"):
        setattr(dst, f, getattr(src, f))
    if dst.blocks is None:
        dst.blocks = src.blocks


def _interleave(replay: list[Event], a: list[Event], b: list[Event]) -> int:
    n, m = len(a), len(b)
    R = len(replay)
    INF = float("inf")

    def c(x: Event, y: Event) -> float:
        if x.name != y.name:
            return INF
        return abs(math.log((x.dur_us + 0.05) / (y.dur_us + 0.05)))

    # cost[i][j]: best cost of explaining replay[:i+j] with a[:i] and b[:j]
    cost = [[INF] * (m + 1) for _ in range(n + 1)]
    cost[0][0] = 0.0
    best = (0, 0, 0)  # (matched, i, j)
    for s in range(0, min(R, n + m) + 1):
        lo, hi = max(0, s - m), min(n, s)
        any_ok = False
        for i in range(lo, hi + 1):
            j = s - i
            cur = cost[i][j]
            if cur == INF:
                continue
            any_ok = True
            if s > best[0] or (s == best[0] and cur < cost[best[1]][best[2]]):
                best = (s, i, j)
            if s == R:
                continue
            r = replay[s]
            if i < n:
                v = cur + c(r, a[i])
                if v < cost[i + 1][j]:
                    cost[i + 1][j] = v
            if j < m:
                v = cur + c(r, b[j])
                if v < cost[i][j + 1]:
                    cost[i][j + 1] = v
        if not any_ok:
            break
    s, i, j = best
    # backtrack
    while s > 0:
        r = replay[s - 1]
        ca = cost[i - 1][j] + c(r, a[i - 1]) if i > 0 else INF
        cb = cost[i][j - 1] + c(r, b[j - 1]) if j > 0 else INF
        if ca <= cb and ca < INF:
            _copy_labels(r, a[i - 1])
            i -= 1
        elif cb < INF:
            _copy_labels(r, b[j - 1])
            j -= 1
        else:  # pragma: no cover - cost table is consistent
            break
        s -= 1
    return best[0]

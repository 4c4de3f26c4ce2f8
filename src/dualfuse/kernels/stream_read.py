"""Stream-read kernel: every byte of a buffer read once, folded into one int32 word per program (wrapping sum).

Its time is the buffer's read bandwidth (dualfuse.hostmem.measure_weight_bandwidth: host-mapped vs device memory).
The result depends only on the bytes and the grid, so a read of host-mapped memory must equal the same read of a
device copy bit for bit. Pointer loads only (no tensor descriptors: they may not read host memory).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import num_sms

BLOCK = 4096  # int32 words per program per step (16 KiB): enough bytes in flight per SM to cover PCIe latency


@triton.jit
def _stream_read_kernel(src, out, n, steps, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    offs = tl.arange(0, BLOCK)
    for s in range(steps):
        base = (s * nprog + pid).to(tl.int64) * BLOCK
        idx = base + offs
        acc += tl.load(src + idx, mask=idx < n, other=0)
    tl.store(out + pid, tl.sum(acc, axis=0))


def stream_read(words: torch.Tensor, programs: int | None = None) -> torch.Tensor:
    """Read every int32 of a 1-D ``words`` tensor once; returns the per-program wrapping sums (int32
    [programs]). ``programs``: default 4 per SM the kernels may use (a green context's count under one)."""
    if words.dtype != torch.int32 or words.dim() != 1:
        raise ValueError(f"stream_read: expected a 1-D int32 tensor, got {words.dtype} of shape {list(words.shape)}")
    n = words.numel()
    programs = programs or 4 * num_sms(words.device)
    programs = max(1, min(programs, triton.cdiv(n, BLOCK)))
    steps = triton.cdiv(n, programs * BLOCK)
    out = torch.empty(programs, dtype=torch.int32, device=words.device)
    _stream_read_kernel[(programs,)](words, out, n, steps, BLOCK=BLOCK, num_warps=8)
    return out

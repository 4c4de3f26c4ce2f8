"""Stream-read kernel: every byte of a buffer read once, folded into one int32 word per program (wrapping sum).

Its time is the buffer's read bandwidth (dualfuse.hostmem.measure_weight_bandwidth: host-mapped vs device memory).
The result depends only on the bytes and the grid, so a read of host-mapped memory must equal the same read of a
device copy bit for bit. Pointer loads only (no tensor descriptors: they may not read host memory).

``readers=R`` reads the buffer R times, the R reads of each block by R programs adjacent in launch order, so they run
at about the same time, as the M tiles of one weight tile do in the grouped GEMM (GROUP_M ordering; with split-K
they are S programs apart instead of adjacent). Its time says whether such re-reads reach memory again or are served
once (by the L2, or by merged requests): time x R, or time x 1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import num_sms

BLOCK = 4096  # int32 words per program per step (16 KiB): enough bytes in flight per SM to cover PCIe latency


@triton.jit
def _stream_read_kernel(src,  # int32 [n]: the buffer
                        out,  # int32 [programs x readers]: each program's wrapping sum
                        n, steps, readers, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    slots = tl.num_programs(0) // readers  # programs per read of the buffer
    slot = pid // readers  # programs pid .. pid + readers - 1 read the same blocks
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    offs = tl.arange(0, BLOCK)
    for s in range(steps):
        base = (s * slots + slot).to(tl.int64) * BLOCK
        idx = base + offs
        acc += tl.load(src + idx, mask=idx < n, other=0)
    tl.store(out + pid, tl.sum(acc, axis=0))


def stream_read(words: torch.Tensor, programs: int | None = None, readers: int = 1) -> torch.Tensor:
    """Read every int32 of a 1-D ``words`` tensor ``readers`` times (module docstring); returns the per-program
    wrapping sums (int32 [programs x readers]). ``programs``: programs per read, default 4 per SM the kernels may use
    (a green context's count under one)."""
    if words.dtype != torch.int32 or words.dim() != 1:
        raise ValueError(f"stream_read: expected a 1-D int32 tensor, got {words.dtype} of shape {list(words.shape)}")
    if not isinstance(readers, int) or readers < 1:
        raise ValueError(f"stream_read: readers must be an int >= 1, got {readers!r}")
    n = words.numel()
    programs = programs or 4 * num_sms(words.device)
    programs = max(1, min(programs, triton.cdiv(n, BLOCK)))
    steps = triton.cdiv(n, programs * BLOCK)
    out = torch.empty(programs * readers, dtype=torch.int32, device=words.device)
    _stream_read_kernel[(programs * readers,)](words, out, n, steps, readers, BLOCK=BLOCK, num_warps=8)
    return out

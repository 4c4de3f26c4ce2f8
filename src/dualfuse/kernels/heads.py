"""Pooling helpers: per-batch pooled row indices computed on the device (graph-capturable).

The towers' heads are built from three launches that together cover both towers:

1. :class:`PoolIndices` (this module) writes, for every sequence ``b``, the flat row index
   ``b*S + pos`` of its pooled token into a preallocated int32/int64 buffer. ``pos`` is
     - ``"cls"``: 0 (CLIP vision class token),
     - ``"last"``: S-1 (SigLIP text),
     - ``"first_eos"``: first position with ``input_ids == eos_token_id``, 0 if there is none
       (HF CLIP: ``(ids == eos).int().argmax(-1)``),
     - ``"argmax"``: ``input_ids.argmax(-1)``, the first maximum on ties (open_clip, legacy HF CLIP
       configs whose ``eos_token_id`` is 2).
   One program per sequence, one launch for all problems; no host/device sync, no allocation.
2. Final LayerNorm + pooling = one :class:`dualfuse.kernels.layernorm.GroupedLayerNorm` launch whose
   problems carry ``row_index`` = these buffers, with ``x`` the [B*S, D] hidden states (``out[i] =
   LN(x[row_index[i]])``, so only the pooled rows are normalized). For CLIP's vision tower
   (``post_layernorm`` on token 0) and text tower (``final_layer_norm`` then EOS pooling; LN is
   per row so gather-then-LN equals LN-then-gather).
3. Projection = one grouped-linear launch (``dualfuse.kernels.gemm``) over the pooled rows of both
   towers (``visual_projection`` / ``text_projection``; SigLIP's text ``head`` with bias).

SigLIP's vision head (attention pooling with a learned probe) is not a row gather: it is the
probe's attention over all tokens (``GroupedAttention`` with a batch-stride-0 query), then LN + MLP.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._utils import LAUNCH_OPTIONS, problem_of

__all__ = ["POOL_KINDS", "PoolProblem", "PoolIndices", "pool_indices"]

POOL_KINDS = {"cls": 0, "last": 1, "first_eos": 2, "argmax": 3}
# Metadata columns: one int64 row per problem (launch order), defined once for the host that fills the rows and the
# kernel that reads them (tl.constexpr objects: a @triton.jit function may read them; they also index the host's rows).
_IDS = tl.constexpr(0)  # input_ids [B, L] int32 or int64 (0 when absent: "cls" / "last" without ids)
_IDS_KIND = tl.constexpr(1)  # 1: int32 ids, 2: int64 ids (0 when absent)
_IDS_SB = tl.constexpr(2)  # input_ids batch stride (elements)
_IDS_SL = tl.constexpr(3)  # input_ids token stride (elements)
_L = tl.constexpr(4)  # tokens per sequence L
_S = tl.constexpr(5)  # rows per sequence S of the flat [B*S, D] hidden states
_KIND = tl.constexpr(6)  # POOL_KINDS code
_EOS = tl.constexpr(7)  # eos_token_id ("first_eos"; 0 otherwise)
_OUT = tl.constexpr(8)  # out [B] int32 or int64 pooled row indices
_OUT_KIND = tl.constexpr(9)  # 1: int32 out, 2: int64 out
_NF = 10
_MAX_L = 1 << 16


@dataclass
class PoolProblem:
    """Pooled row indices for one tower: ``out[b] = b * seq_len + pos_b``.

    kind: "cls" | "last" | "first_eos" | "argmax".
    out: [B] int32/int64 buffer, written.
    input_ids: [B, L] int32/int64; needed for "first_eos"/"argmax" (optional for "cls"/"last").
    eos_token_id: needed for "first_eos".
    seq_len: S, the rows per sequence in the flat [B*S, D] hidden states; defaults to L
        (required for "cls"/"last" without input_ids). "last" pools row S-1.
    """

    kind: str
    out: Tensor
    input_ids: Tensor | None = None
    eos_token_id: int | None = None
    seq_len: int | None = None


@triton.jit
def _pool_kernel(
    meta,  # int64 [P, NF]: one row per problem (the columns above)
    starts,  # int64 [P]: each problem's first program id (a one-column table), increasing
    n_problems,
    NF: tl.constexpr,
    BLOCK_L: tl.constexpr,  # next_pow2 of the longest L that is scanned ("first_eos" / "argmax")
):
    """One program per sequence: ``out[b] = b * S + pos_b`` of its problem."""
    pid = tl.program_id(0)
    prob = problem_of(pid, starts, n_problems, 1, 0)  # starts as an int64 [P, 1] table, the start in column 0
    row = meta + prob * NF
    ids_addr = tl.load(row + _IDS)  # [B, L] int32 or int64 token ids (their dtype: ids_kind)
    ids_kind = tl.load(row + _IDS_KIND)
    ids_sb = tl.load(row + _IDS_SB)
    ids_sl = tl.load(row + _IDS_SL)
    L = tl.load(row + _L)
    S = tl.load(row + _S)
    kind = tl.load(row + _KIND)
    eos = tl.load(row + _EOS)
    out_addr = tl.load(row + _OUT)  # [B] int32 or int64 row indices (their dtype: out_kind)
    out_kind = tl.load(row + _OUT_KIND)
    b = (pid - tl.load(starts + prob)).to(tl.int64)

    pos = tl.zeros([], dtype=tl.int64)
    if kind == 1:
        pos = S - 1
    elif kind >= 2:
        offs = tl.arange(0, BLOCK_L).to(tl.int64)
        ok = offs < L
        ptrs_off = b * ids_sb + offs * ids_sl
        if ids_kind == 1:
            ids = tl.load(ids_addr.to(tl.pointer_type(tl.int32)) + ptrs_off, mask=ok, other=0).to(tl.int64)
        else:
            ids = tl.load(ids_addr.to(tl.pointer_type(tl.int64)) + ptrs_off, mask=ok, other=0)
        big = BLOCK_L + 1
        if kind == 2:
            first = tl.min(tl.where(ok & (ids == eos), offs, big), axis=0)
            pos = tl.where(first == big, 0, first)
        else:
            mx = tl.max(tl.where(ok, ids, -9223372036854775807), axis=0)
            pos = tl.min(tl.where(ok & (ids == mx), offs, big), axis=0)
    val = b * S + pos
    if out_kind == 1:
        tl.store(out_addr.to(tl.pointer_type(tl.int32)) + b, val.to(tl.int32))
    else:
        tl.store(out_addr.to(tl.pointer_type(tl.int64)) + b, val)


class PoolIndices:
    """Prepared pooled-row-index computation for several problems (one launch, graph-capturable)."""

    def __init__(self, problems: Sequence[PoolProblem]):
        problems = list(problems)
        if not problems:
            raise ValueError("PoolIndices: expected at least one PoolProblem, got none")
        device = None
        rows, starts = [], []
        start, max_l = 0, 1
        for i, p in enumerate(problems):
            where = f"PoolIndices problem {i}"
            if not isinstance(p, PoolProblem):
                raise ValueError(f"{where}: expected a PoolProblem, got {type(p).__name__}")
            if p.kind not in POOL_KINDS:
                raise ValueError(f"{where}: kind must be one of {sorted(POOL_KINDS)}, got {p.kind!r}")
            out, ids = p.out, p.input_ids
            if not isinstance(out, Tensor) or out.dim() != 1 or out.dtype not in (torch.int32, torch.int64) \
                    or out.numel() < 1 or (out.numel() > 1 and out.stride(0) != 1):
                got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(f"{where}: out must be a contiguous non-empty 1-D int32/int64 tensor, got {got}")
            device = device or out.device
            if out.device != device:
                raise ValueError(f"{where}: out is on {out.device}, expected {device} (all on one device)")
            B = out.numel()
            if ids is None:
                if p.kind in ("first_eos", "argmax"):
                    raise ValueError(f"{where}: kind {p.kind!r} needs input_ids, got None")
                if p.seq_len is None:
                    raise ValueError(f"{where}: kind {p.kind!r} without input_ids needs seq_len, got None")
                L = int(p.seq_len)
            else:
                if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int32, torch.int64):
                    got = f"{tuple(ids.shape)} {ids.dtype}" if isinstance(ids, Tensor) else type(ids).__name__
                    raise ValueError(f"{where}: input_ids must be a [B, L] int32/int64 tensor, got {got}")
                if ids.device != device:
                    raise ValueError(f"{where}: input_ids is on {ids.device}, expected {device}")
                if ids.shape[0] != B:
                    raise ValueError(f"{where}: out has {B} entries but input_ids has batch {ids.shape[0]}")
                L = ids.shape[1]
            S = L if p.seq_len is None else int(p.seq_len)
            if L < 1 or L > _MAX_L or S < L:
                raise ValueError(f"{where}: need 1 <= L <= {_MAX_L} and seq_len >= L, got L={L}, seq_len={S}")
            eos = 0
            if p.kind == "first_eos":
                if p.eos_token_id is None:
                    raise ValueError(f"{where}: kind 'first_eos' needs eos_token_id, got None")
                eos = int(p.eos_token_id)
            if p.kind in ("first_eos", "argmax"):
                max_l = max(max_l, L)
            r = [0] * _NF
            if ids is not None:
                r[_IDS], r[_IDS_KIND] = ids.data_ptr(), (1 if ids.dtype == torch.int32 else 2)
                r[_IDS_SB], r[_IDS_SL] = ids.stride(0), ids.stride(1)
            r[_L], r[_S], r[_KIND], r[_EOS] = L, S, POOL_KINDS[p.kind], eos
            r[_OUT], r[_OUT_KIND] = out.data_ptr(), (1 if out.dtype == torch.int32 else 2)
            rows.append(r)
            starts.append(start)
            start += B
        self.problems = problems
        self.num_programs = start
        self.block_l = triton.next_power_of_2(max_l)
        self.meta = torch.tensor(rows, dtype=torch.int64).to(device)
        self.starts = torch.tensor(starts, dtype=torch.int64).to(device)

    @property
    def outputs(self) -> list[Tensor]:
        return [p.out for p in self.problems]

    def __call__(self) -> None:
        _pool_kernel[(self.num_programs,)](self.meta, self.starts, len(self.problems), NF=_NF,
                                           BLOCK_L=self.block_l, num_warps=1, **LAUNCH_OPTIONS)


def pool_indices(input_ids: Tensor | None, kind: str, eos_token_id: int | None = None,
                 seq_len: int | None = None, out: Tensor | None = None, batch: int | None = None) -> Tensor:
    """Write the pooled flat row indices ``b*seq_len + pos`` into ``out`` (allocated int64 [B] if None).

    ``input_ids`` [B, L] (may be None for "cls"/"last": then give ``batch`` or ``out``, and
    ``seq_len``). Launches one kernel, no sync; returns ``out``.
    """
    if out is None:
        if isinstance(input_ids, Tensor):
            B, device = input_ids.shape[0], input_ids.device
        elif batch is not None:
            B, device = int(batch), torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            raise ValueError("pool_indices: give input_ids, out or batch to know the batch size")
        out = torch.empty(B, dtype=torch.int64, device=device)
    op = PoolIndices([PoolProblem(kind, out, input_ids, eos_token_id, seq_len)])
    op()
    return out

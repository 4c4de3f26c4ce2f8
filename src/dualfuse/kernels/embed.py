"""Embeddings of both towers in one Triton launch.

* Vision (:class:`PatchEmbedProblem`): the patch "convolution" (stride = kernel = patch size) is a
  GEMM ``[B*T, C*p*p] @ W^T`` whose A-operand addresses are computed from ``pixel_values`` directly
  (no unfold copy). Row ``m = b*T + t`` is token ``t`` of image ``b``; with a class token, token 0
  has an all-zero A row and gets ``class_embedding`` instead of the conv bias. The epilogue adds
  the conv bias, the class embedding and the positional embedding and writes ``out[b, t]``.
  Pixels may be any float dtype; they are cast to the weight dtype for the tensor-core dot (fp32
  weights use IEEE fp32 dots), accumulation in fp32. uint8 pixels (camera frames, any strides: a
  channels-last ``[B, H, W, C]`` frame is passed as its ``permute(0, 3, 1, 2)`` view, no copy) are read
  as ``x / 255``: the GEMM sums ``x * w`` exactly and the epilogue scales by 1/255 in fp32 before the
  bias; fold the model's mean/std into ``weight`` and ``bias`` (:func:`fold_normalization`).
* Text (:class:`TokenEmbedProblem`): a gather ``out[b, l] = token_weight[ids[b, l]] + pos[l]``.
  Token ids are read on the device and must lie in ``[0, V)`` (not checked: no host sync).

:class:`Embeddings` takes any number of both kinds and runs them all in ONE launch (programs
``[0, n_patch_tiles)`` do GEMM tiles, the rest do token rows). :class:`PatchEmbed` and
:class:`TokenEmbed` are the one-kind special cases; :func:`patch_embed` / :func:`token_embed`
allocate, build and run once. CLIP's pre-LayerNorm is a following GroupedLayerNorm launch.

Dtypes of one launch: all parameters (conv weight, bias, class/positional embeddings, token tables)
share one dtype; all outputs share one dtype; all pixel tensors share one dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._utils import (LAUNCH_OPTIONS, check_tensor, describe, device_props, gdc_launch, load_field, pdl_supported, pow2_divisor,
                     problem_of)

__all__ = ["PatchEmbedProblem", "TokenEmbedProblem", "Embeddings", "PatchEmbed", "TokenEmbed",
           "patch_embed", "token_embed", "fold_normalization"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Metadata columns: one int64 row per problem (launch order) in a patch table and a token table, defined once for the
# host that fills the rows and the kernel that reads them. tl.constexpr objects: a @triton.jit function may read a
# module-level global only when it is one; they also index the host's rows (``row[_P_PIX]``). Strides and sizes are in
# elements.
# Patch table (PatchEmbedProblem):
_P_PIX = tl.constexpr(0)  # pixel_values [B, C, H, W] uint8 or float pixels
_P_SB = tl.constexpr(1)  # pixel_values strides: batch,
_P_SC = tl.constexpr(2)  # channel,
_P_SH = tl.constexpr(3)  # row,
_P_SW = tl.constexpr(4)  # column
_P_P = tl.constexpr(5)  # patch size p
_P_WP = tl.constexpr(6)  # patches per image row, W // p
_P_W = tl.constexpr(7)  # weight [D, C*p*p]
_P_W_SN = tl.constexpr(8)  # weight row stride
_P_C = tl.constexpr(9)  # channels C
_P_BIAS = tl.constexpr(10)  # bias [D] address, 0 if none
_P_CLS = tl.constexpr(11)  # class_embedding [D] address, 0 if none
_P_POS = tl.constexpr(12)  # pos_embedding [T, D]
_P_POS_S = tl.constexpr(13)  # pos_embedding row stride
_P_OUT = tl.constexpr(14)  # out [B, T, D]
_P_O_SB = tl.constexpr(15)  # out batch stride
_P_O_ST = tl.constexpr(16)  # out token stride
_P_B = tl.constexpr(17)  # images B
_P_T = tl.constexpr(18)  # tokens per image T: patches + class token
_P_D = tl.constexpr(19)  # width D
_P_K = tl.constexpr(20)  # C*p*p (the GEMM's K; not read by the kernel)
_P_START = tl.constexpr(21)  # first program id (GEMM tile) of this problem
_P_N_NB = tl.constexpr(22)  # column blocks of this problem, cdiv(D, BLOCK_N)
_NPF = 23
# Token table (TokenEmbedProblem):
_T_IDS = tl.constexpr(0)  # input_ids [B, L] int32 or int64
_T_IDS_KIND = tl.constexpr(1)  # 1: int32 ids, 2: int64 ids
_T_IDS_SB = tl.constexpr(2)  # input_ids batch stride
_T_IDS_SL = tl.constexpr(3)  # input_ids token stride
_T_TOK = tl.constexpr(4)  # token_weight [V, D]
_T_TOK_S = tl.constexpr(5)  # token_weight row stride
_T_POS = tl.constexpr(6)  # pos_embedding [>= L, D]
_T_POS_S = tl.constexpr(7)  # pos_embedding row stride
_T_OUT = tl.constexpr(8)  # out [B, L, D]
_T_O_SB = tl.constexpr(9)  # out batch stride
_T_O_SL = tl.constexpr(10)  # out token stride
_T_B = tl.constexpr(11)  # sequences B
_T_L = tl.constexpr(12)  # tokens per sequence L
_T_D = tl.constexpr(13)  # width D
_T_START = tl.constexpr(14)  # first program id (token block) of this problem
_T_V = tl.constexpr(15)  # vocabulary V (rows of token_weight)
_NTF = 16
# Columns the kernel reads with an alignment hint (load_field): addresses, hinted PTR_ALIGN bytes, and strides / widths,
# hinted ELT_ALIGN elements; each of the two is the largest power of two <= 16 dividing all its columns in every row.
_P_PTR_COLS = (_P_PIX, _P_W, _P_POS, _P_OUT)
_P_ELT_COLS = (_P_SB, _P_SC, _P_SH, _P_W_SN, _P_POS_S, _P_O_SB, _P_O_ST, _P_D)
_T_PTR_COLS = (_T_TOK, _T_POS, _T_OUT)
_T_ELT_COLS = (_T_TOK_S, _T_POS_S, _T_O_SB, _T_O_SL, _T_D)


@dataclass
class PatchEmbedProblem:
    """Vision tower input: patch GEMM + (class token) + positional embedding.

    pixel_values: [B, C, H, W], any float dtype or uint8 (read as x / 255), any strides, H and W >= patch_size.
    Like a stride-p Conv2d,
    the last H % p rows and W % p columns are not read (SigLIP so400m: 384 px, patch 14 -> 27x27 patches).
    weight: [D, C*p*p] (conv weight flattened in (c, ph, pw) order), any strides.
    bias: [D] or None. class_embedding: [D] or None. pos_embedding: [T, D], T = (H/p)*(W/p) + has_class.
    out: [B, T, D], last dim contiguous.
    """

    pixel_values: Tensor
    weight: Tensor
    bias: Tensor | None
    class_embedding: Tensor | None
    pos_embedding: Tensor
    out: Tensor
    patch_size: int


@dataclass
class TokenEmbedProblem:
    """Text tower input: ``out[b, l] = token_weight[input_ids[b, l]] + pos_embedding[l]``.

    input_ids: [B, L] int32/int64. token_weight: [V, D]. pos_embedding: [L_max >= L, D].
    out: [B, L, D]. Last dims of the float tensors contiguous.
    """

    input_ids: Tensor
    token_weight: Tensor
    pos_embedding: Tensor
    out: Tensor


@triton.jit
def _patch_tile(tile, pm, n_patch, pix_ref, w_ref, o_ref, NPF: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KP: tl.constexpr, EVEN_P: tl.constexpr,
                PIX_W1: tl.constexpr, IEEE: tl.constexpr, PTR_ALIGN: tl.constexpr, ELT_ALIGN: tl.constexpr,
                PIX_U8: tl.constexpr):
    """GEMM tile ``tile`` of the patch problems (rows of ``pm``): patches @ weight^T + bias / class + positions."""
    # The K loop walks the (channel, kernel row) pixel rows of the patches, KY of them per step; a K
    # tile is KY rows x BLOCK_KP columns (kx), BLOCK_KP = next_pow2(patch size). EVEN_P: every
    # patch size == BLOCK_KP and a multiple of KY (no K masks; weight tiles contiguous).
    KY: tl.constexpr = BLOCK_K // BLOCK_KP
    prob = problem_of(tile, pm, n_patch, NPF, _P_START)
    row = pm + prob * NPF
    pix = load_field(row, _P_PIX, pix_ref.dtype, PTR_ALIGN)  # [B, C, H, W] uint8 or float pixels
    sb = load_field(row, _P_SB, tl.int64, ELT_ALIGN)
    sc = load_field(row, _P_SC, tl.int64, ELT_ALIGN)
    sh = load_field(row, _P_SH, tl.int64, ELT_ALIGN)
    sw = tl.load(row + _P_SW)
    if EVEN_P:
        P = BLOCK_KP
    else:
        P = tl.load(row + _P_P)
    Wp = tl.load(row + _P_WP)
    w_ptr = load_field(row, _P_W, w_ref.dtype, PTR_ALIGN)  # [D, C*p*p] weight
    w_sn = load_field(row, _P_W_SN, tl.int64, ELT_ALIGN)
    C = tl.load(row + _P_C)
    bias_addr = tl.load(row + _P_BIAS)  # [D] bias, 0 if none
    cls_addr = tl.load(row + _P_CLS)  # [D] class embedding, 0 if none
    pos_ptr = load_field(row, _P_POS, w_ref.dtype, PTR_ALIGN)  # [T, D] positional embedding
    pos_s = load_field(row, _P_POS_S, tl.int64, ELT_ALIGN)
    o_ptr = load_field(row, _P_OUT, o_ref.dtype, PTR_ALIGN)  # [B, T, D] out
    o_sb = load_field(row, _P_O_SB, tl.int64, ELT_ALIGN)
    o_st = load_field(row, _P_O_ST, tl.int64, ELT_ALIGN)
    B = tl.load(row + _P_B)
    T = tl.load(row + _P_T)
    D = load_field(row, _P_D, tl.int64, ELT_ALIGN)
    start = tl.load(row + _P_START)
    n_nb = tl.load(row + _P_N_NB)
    has_cls = (cls_addr != 0).to(tl.int64)

    local = tile - start
    pid_m = local // n_nb
    pid_n = local % n_nb
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < B * T
    n_ok = offs_n < D
    b = offs_m // T
    t = offs_m % T
    patch = t - has_cls
    is_patch = m_ok & (patch >= 0)
    patch = tl.maximum(patch, 0)
    py = patch // Wp
    px = patch % Wp
    if PIX_W1:
        a_row = b * sb + py * P * sh + px * P
    else:
        a_row = b * sb + py * P * sh + px * P * sw
    offs_j = tl.arange(0, BLOCK_K)
    ky_l = offs_j // BLOCK_KP
    kx = offs_j % BLOCK_KP
    if PIX_W1:
        kx_off = kx
    else:
        kx_off = kx * sw
    CP = C * P
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r0 in range(0, CP, KY):
        r = r0 + ky_l  # pixel row of the patch: channel c = r // P, kernel row ky = r % P
        a_col = (r // P) * sc + (r % P) * sh + kx_off
        if EVEN_P:
            a = tl.load(pix + a_row[:, None] + a_col[None, :], mask=is_patch[:, None], other=0.0)
            w = tl.load(w_ptr + offs_n[None, :] * w_sn + (r0 * P + offs_j)[:, None], mask=n_ok[None, :], other=0.0)
        else:
            k_ok = (r < CP) & (kx < P)
            a = tl.load(pix + a_row[:, None] + a_col[None, :], mask=is_patch[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + offs_n[None, :] * w_sn + (r * P + kx)[:, None], mask=n_ok[None, :] & k_ok[:, None],
                        other=0.0)
        if IEEE:
            acc += tl.dot(a.to(w.dtype), w, input_precision="ieee")
        else:
            acc += tl.dot(a.to(w.dtype), w)
    if PIX_U8:  # uint8 pixels are x / 255: integers 0..255 are exact in every dot dtype, the scale is fp32
        acc = acc * (1.0 / 255.0)
    mask = m_ok[:, None] & n_ok[None, :]
    acc += tl.load(pos_ptr + t[:, None] * pos_s + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    if bias_addr != 0:
        bias = tl.load(bias_addr.to(w_ref.dtype) + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        acc += tl.where(is_patch[:, None], bias[None, :], 0.0)
    if cls_addr != 0:
        cls = tl.load(cls_addr.to(w_ref.dtype) + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        acc += tl.where((t == 0)[:, None], cls[None, :], 0.0)
    tl.store(o_ptr + b[:, None] * o_sb + t[:, None] * o_st + offs_n[None, :], acc.to(o_ref.dtype.element_ty),
             mask=mask)


@triton.jit
def _token_tile(tile, tm, n_token, w_ref, o_ref, bad_ptr, NTF: tl.constexpr, BLOCK_T: tl.constexpr,
                BLOCK_DT: tl.constexpr, PTR_ALIGN: tl.constexpr, ELT_ALIGN: tl.constexpr):
    """Token block ``tile`` of the token problems (rows of ``tm``): ``out[b, l] = token_weight[ids[b, l]] + pos[l]``."""
    prob = problem_of(tile, tm, n_token, NTF, _T_START)
    row = tm + prob * NTF
    ids_addr = tl.load(row + _T_IDS)  # [B, L] int32 or int64 token ids (their dtype: ids_kind)
    ids_kind = tl.load(row + _T_IDS_KIND)
    ids_sb = tl.load(row + _T_IDS_SB)
    ids_sl = tl.load(row + _T_IDS_SL)
    tok_ptr = load_field(row, _T_TOK, w_ref.dtype, PTR_ALIGN)  # [V, D] token table
    tok_s = load_field(row, _T_TOK_S, tl.int64, ELT_ALIGN)
    pos_ptr = load_field(row, _T_POS, w_ref.dtype, PTR_ALIGN)  # [>= L, D] positional embedding
    pos_s = load_field(row, _T_POS_S, tl.int64, ELT_ALIGN)
    o_ptr = load_field(row, _T_OUT, o_ref.dtype, PTR_ALIGN)  # [B, L, D] out
    o_sb = load_field(row, _T_O_SB, tl.int64, ELT_ALIGN)
    o_sl = load_field(row, _T_O_SL, tl.int64, ELT_ALIGN)
    B = tl.load(row + _T_B)
    L = tl.load(row + _T_L)
    D = load_field(row, _T_D, tl.int64, ELT_ALIGN)
    start = tl.load(row + _T_START)
    V = tl.load(row + _T_V)

    offs = (tile - start) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs < B * L
    b = offs // L
    l = offs % L
    id_off = b * ids_sb + l * ids_sl
    if ids_kind == 1:
        ids = tl.load(ids_addr.to(tl.pointer_type(tl.int32)) + id_off, mask=t_ok, other=0).to(tl.int64)
    else:
        ids = tl.load(ids_addr.to(tl.pointer_type(tl.int64)) + id_off, mask=t_ok, other=0)
    # an id outside the table is flagged for the caller (no host sync here) and reads row 0 instead of memory
    # outside the table
    bad = t_ok & ((ids < 0) | (ids >= V))
    n_bad = tl.sum(bad.to(tl.int32), axis=0)
    tl.atomic_max(bad_ptr, 1, mask=n_bad > 0)
    ids = tl.where(bad, 0, ids)
    offs_d0 = tl.arange(0, BLOCK_DT)
    for d0 in range(0, D, BLOCK_DT):
        offs_d = d0 + offs_d0
        mask = t_ok[:, None] & (offs_d < D)[None, :]
        e = tl.load(tok_ptr + ids[:, None] * tok_s + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        e += tl.load(pos_ptr + l[:, None] * pos_s + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(o_ptr + b[:, None] * o_sb + l[:, None] * o_sl + offs_d[None, :], e.to(o_ref.dtype.element_ty),
                 mask=mask)


@triton.jit
def _embed_kernel(
    pm,  # int64 [n_patch, NPF]: patch table (_P_* columns)
    tm,  # int64 [n_token, NTF]: token table (_T_* columns)
    n_patch,
    n_token,
    n_patch_tiles,  # programs [0, n_patch_tiles) do GEMM tiles, the rest token blocks
    pix_ref,  # a tensor of the pixel dtype (pointer element type only)
    w_ref,  # a tensor of the parameter dtype
    o_ref,  # a tensor of the output dtype
    bad_ptr,  # int32 [1]: set to 1 when a token id is outside its table
    NPF: tl.constexpr,
    NTF: tl.constexpr,
    HAS_PATCH: tl.constexpr,
    HAS_TOKEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_KP: tl.constexpr,  # next_pow2(largest patch size)
    EVEN_P: tl.constexpr,  # every patch size == BLOCK_KP and a multiple of BLOCK_K // BLOCK_KP: no K masks
    PIX_W1: tl.constexpr,  # every pixel column stride is 1
    IEEE: tl.constexpr,  # fp32 parameters: IEEE fp32 dots (not TF32)
    BLOCK_T: tl.constexpr,  # tokens per token program
    BLOCK_DT: tl.constexpr,  # columns per step of a token program
    PTR_ALIGN: tl.constexpr,  # every hinted address (_P_PTR_COLS, _T_PTR_COLS) is a multiple of this many bytes
    ELT_ALIGN: tl.constexpr,  # every hinted stride and width (_P_ELT_COLS, _T_ELT_COLS): of this many elements
    PDL_TRIGGER: tl.constexpr,
    PIX_U8: tl.constexpr,  # uint8 pixels, read as x / 255
):
    """Patch GEMM tiles and token blocks of every problem of one Embeddings, in one launch."""
    pid = tl.program_id(0)
    if PDL_TRIGGER:
        # let a PDL-launched next kernel start now (it waits for this launch's completion before reading
        # what it writes). This kernel itself is not PDL-launched: it reads inputs copied in before it.
        gdc_launch()
    if HAS_PATCH and HAS_TOKEN:
        if pid < n_patch_tiles:
            _patch_tile(pid, pm, n_patch, pix_ref, w_ref, o_ref, NPF, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_KP, EVEN_P,
                        PIX_W1, IEEE, PTR_ALIGN, ELT_ALIGN, PIX_U8)
        else:
            _token_tile(pid - n_patch_tiles, tm, n_token, w_ref, o_ref, bad_ptr, NTF, BLOCK_T, BLOCK_DT, PTR_ALIGN,
                        ELT_ALIGN)
    elif HAS_PATCH:
        _patch_tile(pid, pm, n_patch, pix_ref, w_ref, o_ref, NPF, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_KP, EVEN_P,
                    PIX_W1, IEEE, PTR_ALIGN, ELT_ALIGN, PIX_U8)
    else:
        _token_tile(pid, tm, n_token, w_ref, o_ref, bad_ptr, NTF, BLOCK_T, BLOCK_DT, PTR_ALIGN, ELT_ALIGN)






def _launch_dtypes(patch_problems: list, token_problems: list):
    """(first problem, its weight, device, parameter dtype, output dtype) one Embeddings launch shares; ValueError
    for no problems, a problem of the wrong type, or non-float parameters / outputs."""
    if not patch_problems and not token_problems:
        raise ValueError("Embeddings: expected at least one PatchEmbedProblem or TokenEmbedProblem, got none")
    for i, p in enumerate(patch_problems):
        if not isinstance(p, PatchEmbedProblem):
            raise ValueError(f"Embeddings: patch problem {i} must be a PatchEmbedProblem, got {type(p).__name__}")
    for i, p in enumerate(token_problems):
        if not isinstance(p, TokenEmbedProblem):
            raise ValueError(f"Embeddings: token problem {i} must be a TokenEmbedProblem, got {type(p).__name__}")
    first = patch_problems[0] if patch_problems else token_problems[0]
    w0 = first.weight if patch_problems else first.token_weight
    if not isinstance(w0, Tensor) or not isinstance(first.out, Tensor):
        raise ValueError("Embeddings: weights and outputs must be tensors")
    w_dtype, o_dtype = w0.dtype, first.out.dtype
    if w_dtype not in _FLOAT_DTYPES or o_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"Embeddings: parameter/output dtypes must be in {_FLOAT_DTYPES}, got {w_dtype}, {o_dtype}")
    return first, w0, w0.device, w_dtype, o_dtype


def _patch_row(where: str, p: PatchEmbedProblem, device, pix_dtype, w_dtype, o_dtype) -> list[int]:
    """A patch problem's metadata row (the _P_* columns but _P_START / _P_N_NB), after checking it."""
    x = p.pixel_values
    check_tensor(where, "pixel_values", x, device, pix_dtype)
    if x.dtype not in _FLOAT_DTYPES + (torch.float64, torch.uint8):
        raise ValueError(f"{where}: pixel_values must be a float tensor or uint8 (read as x / 255), got "
                         f"{x.dtype}")
    for name in ("weight", "pos_embedding"):
        check_tensor(where, name, getattr(p, name), device, w_dtype)
    for name in ("bias", "class_embedding"):
        check_tensor(where, name, getattr(p, name), device, w_dtype, allow_none=True)
    check_tensor(where, "out", p.out, device, o_dtype)
    P = p.patch_size
    if not isinstance(P, int) or isinstance(P, bool) or P < 1:
        raise ValueError(f"{where}: patch_size must be a positive int, got {P!r}")
    if x.dim() != 4:
        raise ValueError(f"{where}: pixel_values must be [B, C, H, W], got {describe(x)}")
    B, C, Hh, Ww = x.shape
    if B < 1 or Hh < P or Ww < P:
        raise ValueError(f"{where}: image {Hh}x{Ww} (batch {B}) must be non-empty and at least patch_size {P}")
    Hp, Wp = Hh // P, Ww // P
    Kdim = C * P * P
    w = p.weight
    if w.dim() != 2 or w.shape[1] != Kdim or w.stride(1) != 1:
        raise ValueError(f"{where}: weight must be [D, C*p*p] = [D, {Kdim}] with a contiguous last dim, "
                         f"got {describe(w)}")
    D = w.shape[0]
    has_cls = p.class_embedding is not None
    T = Hp * Wp + int(has_cls)
    for name in ("bias", "class_embedding"):
        t = getattr(p, name)
        if t is not None and (t.shape != (D,) or (D > 1 and t.stride(0) != 1)):
            raise ValueError(f"{where}: {name} must be contiguous [{D}], got {describe(t)}")
    pos = p.pos_embedding
    if pos.dim() != 2 or tuple(pos.shape) != (T, D) or pos.stride(1) != 1:
        raise ValueError(f"{where}: pos_embedding must be [{T}, {D}] with a contiguous last dim, got {describe(pos)}")
    out = p.out
    if out.dim() != 3 or tuple(out.shape) != (B, T, D) or out.stride(2) != 1:
        raise ValueError(f"{where}: out must be [{B}, {T}, {D}] with a contiguous last dim, got {describe(out)}")
    r = [0] * _NPF
    r[_P_PIX], r[_P_SB], r[_P_SC], r[_P_SH], r[_P_SW] = (x.data_ptr(),) + tuple(x.stride())
    r[_P_P], r[_P_WP] = P, Wp
    r[_P_W], r[_P_W_SN], r[_P_C] = w.data_ptr(), w.stride(0), C
    r[_P_BIAS] = p.bias.data_ptr() if p.bias is not None else 0
    r[_P_CLS] = p.class_embedding.data_ptr() if has_cls else 0
    r[_P_POS], r[_P_POS_S] = pos.data_ptr(), pos.stride(0)
    r[_P_OUT], r[_P_O_SB], r[_P_O_ST] = out.data_ptr(), out.stride(0), out.stride(1)
    r[_P_B], r[_P_T], r[_P_D], r[_P_K] = B, T, D, Kdim
    return r


def _token_row(where: str, p: TokenEmbedProblem, device, w_dtype, o_dtype) -> list[int]:
    """A token problem's metadata row (the _T_* columns but _T_START), after checking it."""
    ids = p.input_ids
    check_tensor(where, "input_ids", ids, device)
    if ids.dtype not in (torch.int32, torch.int64) or ids.dim() != 2:
        raise ValueError(f"{where}: input_ids must be [B, L] int32/int64, got {describe(ids)}")
    B, L = ids.shape
    if B < 1 or L < 1:
        raise ValueError(f"{where}: input_ids must be non-empty, got {tuple(ids.shape)}")
    check_tensor(where, "token_weight", p.token_weight, device, w_dtype)
    check_tensor(where, "pos_embedding", p.pos_embedding, device, w_dtype)
    check_tensor(where, "out", p.out, device, o_dtype)
    tw, pos, out = p.token_weight, p.pos_embedding, p.out
    if tw.dim() != 2 or tw.stride(1) != 1:
        raise ValueError(f"{where}: token_weight must be [V, D] with a contiguous last dim, got {describe(tw)}")
    D = tw.shape[1]
    if pos.dim() != 2 or pos.shape[0] < L or pos.shape[1] != D or pos.stride(1) != 1:
        raise ValueError(f"{where}: pos_embedding must be [>= {L}, {D}] with a contiguous last dim, got {describe(pos)}")
    if out.dim() != 3 or tuple(out.shape) != (B, L, D) or out.stride(2) != 1:
        raise ValueError(f"{where}: out must be [{B}, {L}, {D}] with a contiguous last dim, got {describe(out)}")
    r = [0] * _NTF
    r[_T_IDS], r[_T_IDS_KIND] = ids.data_ptr(), (1 if ids.dtype == torch.int32 else 2)
    r[_T_IDS_SB], r[_T_IDS_SL] = ids.stride(0), ids.stride(1)
    r[_T_TOK], r[_T_TOK_S] = tw.data_ptr(), tw.stride(0)
    r[_T_POS], r[_T_POS_S] = pos.data_ptr(), pos.stride(0)
    r[_T_OUT], r[_T_O_SB], r[_T_O_SL] = out.data_ptr(), out.stride(0), out.stride(1)
    r[_T_B], r[_T_L], r[_T_D] = B, L, D
    r[_T_V] = tw.shape[0]
    return r


class Embeddings:
    """Prepared embeddings of any number of patch and token problems, in ONE launch.

    ``block_m``, ``block_n``, ``block_k`` (patch GEMM tile), ``block_t`` (tokens per text program),
    ``num_warps``, ``num_stages`` override the defaults.

    Token ids are range-checked on the device, without a host sync: a launch that meets an id outside
    ``[0, V)`` sets ``bad_ids`` (int32 [1], on the device) to 1 and reads table row 0 for that id (never memory
    outside the table). The caller reads ``bad_ids`` when it needs the outputs anyway, raises, and zeroes it;
    see :meth:`raise_on_bad_ids`.
    """

    def __init__(self, patch_problems: Sequence[PatchEmbedProblem] = (),
                 token_problems: Sequence[TokenEmbedProblem] = (), *, block_m: int | None = None,
                 block_n: int | None = None, block_k: int | None = None, block_t: int | None = None,
                 num_warps: int | None = None, num_stages: int | None = None):
        patch_problems, token_problems = list(patch_problems), list(token_problems)
        first, w0, device, w_dtype, o_dtype = _launch_dtypes(patch_problems, token_problems)
        on_cuda = device_props(device) is not None  # a CUDA device, or planning for one (target_device)
        self.block_m = block_m or (64 if on_cuda else 32)
        self.block_n = block_n or (64 if on_cuda else 32)
        self.block_t = block_t or (16 if on_cuda else 8)
        self.num_warps = num_warps or 4
        self.num_stages = num_stages or (3 if on_cuda else 1)
        for name, val in (("block_m", self.block_m), ("block_n", self.block_n), ("block_k", block_k or 16),
                          ("block_t", self.block_t)):
            if val < (16 if name != "block_t" else 1) or val & (val - 1):
                raise ValueError(f"Embeddings: {name} must be a power of two (>= 16 for GEMM tiles), got {val}")

        # patch problems: one metadata row each, programs = (row tiles of block_m) x (column tiles of block_n)
        pm_rows, pix_dtype, start = [], None, 0
        for i, p in enumerate(patch_problems):
            r = _patch_row(f"Embeddings patch problem {i}", p, device, pix_dtype, w_dtype, o_dtype)
            pix_dtype = p.pixel_values.dtype
            n_nb = triton.cdiv(r[_P_D], self.block_n)
            r[_P_START], r[_P_N_NB] = start, n_nb
            start += triton.cdiv(r[_P_B] * r[_P_T], self.block_m) * n_nb
            pm_rows.append(r)
        self.num_patch_tiles = start
        sizes = [p.patch_size for p in patch_problems] or [1]
        self.block_kp = triton.next_power_of_2(max(sizes))
        default_k = 32 if not on_cuda else (16 if w_dtype == torch.float32 else 64)  # fp32 dots: avoid spills
        self.block_k = block_k or max(default_k, self.block_kp)
        if self.block_k < self.block_kp:
            raise ValueError(f"Embeddings: block_k must be >= next_pow2(patch_size) = {self.block_kp}, got {self.block_k}")
        ky = self.block_k // self.block_kp
        self._even_p = all(P == self.block_kp and P % ky == 0 for P in sizes)
        self._pix_w1 = all(r[_P_SW] == 1 for r in pm_rows)

        # token problems: one metadata row each, programs of block_t tokens
        tm_rows, start, max_d = [], 0, 16
        for i, p in enumerate(token_problems):
            r = _token_row(f"Embeddings token problem {i}", p, device, w_dtype, o_dtype)
            r[_T_START] = start
            start += triton.cdiv(r[_T_B] * r[_T_L], self.block_t)
            max_d = max(max_d, r[_T_D])
            tm_rows.append(r)
        self.num_token_tiles = start
        self.block_dt = min(triton.next_power_of_2(max_d), 256 if on_cuda else 1024)

        self.patch_problems, self.token_problems = patch_problems, token_problems
        self.num_programs = self.num_patch_tiles + self.num_token_tiles
        self.pm = torch.tensor(pm_rows or [[0] * _NPF], dtype=torch.int64).to(device)
        self.tm = torch.tensor(tm_rows or [[0] * _NTF], dtype=torch.int64).to(device)
        self.bad_ids = torch.zeros(1, dtype=torch.int32, device=device)
        self._pdl_trigger = pdl_supported(device)
        pix_ref = patch_problems[0].pixel_values if patch_problems else w0
        self._refs = (pix_ref, w0, first.out)
        self._ieee = w_dtype == torch.float32
        self._pix_u8 = pix_dtype == torch.uint8
        self._ptr_align = pow2_divisor([r[c] for r in pm_rows for c in _P_PTR_COLS]
                                       + [r[c] for r in tm_rows for c in _T_PTR_COLS], 16)
        self._elt_align = pow2_divisor([r[c] for r in pm_rows for c in _P_ELT_COLS]
                                       + [r[c] for r in tm_rows for c in _T_ELT_COLS], 16)

    @property
    def outputs(self) -> list[Tensor]:
        return [p.out for p in self.patch_problems] + [p.out for p in self.token_problems]

    def __call__(self) -> None:
        pix_ref, w_ref, o_ref = self._refs
        _embed_kernel[(self.num_programs,)](
            self.pm, self.tm, len(self.patch_problems), len(self.token_problems), self.num_patch_tiles,
            pix_ref, w_ref, o_ref, self.bad_ids,
            NPF=_NPF, NTF=_NTF, HAS_PATCH=bool(self.patch_problems), HAS_TOKEN=bool(self.token_problems),
            BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k, BLOCK_KP=self.block_kp,
            EVEN_P=self._even_p, PIX_W1=self._pix_w1, IEEE=self._ieee, BLOCK_T=self.block_t, BLOCK_DT=self.block_dt,
            PTR_ALIGN=self._ptr_align, ELT_ALIGN=self._elt_align, PDL_TRIGGER=self._pdl_trigger,
            PIX_U8=self._pix_u8, num_warps=self.num_warps, num_stages=self.num_stages, **LAUNCH_OPTIONS,
        )


    def raise_on_bad_ids(self) -> None:
        """Raise ValueError if an earlier launch met a token id outside its table (reads ``bad_ids``: one device
        sync), naming each problem's id range; ``bad_ids`` is zeroed first, so the op stays usable."""
        if not self.token_problems or not int(self.bad_ids.item()):
            return
        self.bad_ids.zero_()
        ranges = []
        for p in self.token_problems:
            lo, hi = torch.aminmax(p.input_ids)
            ranges.append(f"ids in [{int(lo)}, {int(hi)}] for a table of {p.token_weight.shape[0]}")
        vocabs = sorted({int(p.token_weight.shape[0]) for p in self.token_problems})
        expected = " or ".join(f"[0, {v})" for v in vocabs)
        raise ValueError(f"input_ids: token ids out of the vocabulary (expected ids in {expected}); "
                         f"got {'; '.join(ranges)}")


class PatchEmbed(Embeddings):
    """Embeddings with patch problems only (one launch)."""

    def __init__(self, problems: Sequence[PatchEmbedProblem], **kwargs):
        super().__init__(problems, (), **kwargs)


class TokenEmbed(Embeddings):
    """Embeddings with token problems only (one launch)."""

    def __init__(self, problems: Sequence[TokenEmbedProblem], **kwargs):
        super().__init__((), problems, **kwargs)


def fold_normalization(weight: Tensor, bias: Tensor | None, mean, std, dtype: torch.dtype | None = None
                       ) -> tuple[Tensor, Tensor]:
    """The patch weight [D, C*p*p] ((c, ph, pw) order) and bias [D] that give, on uint8 pixels read as
    ``x / 255``, what ``weight`` and ``bias`` give on ``(x / 255 - mean_c) / std_c``:
    ``w' = w / std_c`` per input channel, ``b' = b - sum over (c, ky, kx) of w * mean_c / std_c``
    (the kernel's 1/255 scale completes ``w / (255 std_c)``). Computed in fp64, returned in ``dtype``
    (default the weight's), contiguous, on the weight's device."""
    if weight.dim() == 4:
        weight = weight.reshape(weight.shape[0], -1)
    c = len(mean)
    if len(std) != c or weight.dim() != 2 or weight.shape[1] % c:
        raise ValueError(f"fold_normalization: expected a weight [D, C*p*p] and C = {c} means and stds, got "
                         f"{describe(weight)} and {len(std)} stds")
    dtype = dtype or weight.dtype
    w = weight.detach().to(torch.float64).reshape(weight.shape[0], c, -1)
    m = torch.tensor(mean, dtype=torch.float64, device=w.device).view(1, c, 1)
    s = torch.tensor(std, dtype=torch.float64, device=w.device).view(1, c, 1)
    b = bias.detach().to(torch.float64) if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64,
                                                                            device=w.device)
    wf = (w / s).reshape(weight.shape[0], -1)
    bf = b - (w * (m / s)).sum(dim=(1, 2))
    return wf.to(dtype).contiguous(), bf.to(dtype).contiguous()


def patch_embed(pixel_values: Tensor, weight: Tensor, bias: Tensor | None, class_embedding: Tensor | None,
                pos_embedding: Tensor, patch_size: int, out_dtype: torch.dtype | None = None) -> Tensor:
    """Allocate ``out`` [B, T, D] (dtype of ``weight`` unless given), build a PatchEmbed and run it once.

    ``weight`` may also be the conv weight [D, C, p, p]; it is viewed as [D, C*p*p].
    """
    if isinstance(weight, Tensor) and weight.dim() == 4:
        weight = weight.reshape(weight.shape[0], -1)
    if not isinstance(pixel_values, Tensor) or pixel_values.dim() != 4 or not isinstance(weight, Tensor):
        raise ValueError(f"patch_embed: expected pixel_values [B, C, H, W] and weight tensors, got "
                         f"{describe(pixel_values)}, {describe(weight)}")
    if not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_embed: patch_size must be a positive int, got {patch_size!r}")
    B, _, Hh, Ww = pixel_values.shape
    T = (Hh // patch_size) * (Ww // patch_size) + int(class_embedding is not None)
    out = torch.empty((B, T, weight.shape[0]), dtype=out_dtype or weight.dtype, device=weight.device)
    op = PatchEmbed([PatchEmbedProblem(pixel_values, weight, bias, class_embedding, pos_embedding, out, patch_size)])
    op()
    return out


def token_embed(input_ids: Tensor, token_weight: Tensor, pos_embedding: Tensor,
                out_dtype: torch.dtype | None = None) -> Tensor:
    """Allocate ``out`` [B, L, D], build a TokenEmbed and run it once."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or not isinstance(token_weight, Tensor) \
            or token_weight.dim() != 2:
        raise ValueError(f"token_embed: expected input_ids [B, L] and token_weight [V, D], got "
                         f"{describe(input_ids)}, {describe(token_weight)}")
    B, L = input_ids.shape
    out = torch.empty((B, L, token_weight.shape[1]), dtype=out_dtype or token_weight.dtype, device=token_weight.device)
    op = TokenEmbed([TokenEmbedProblem(input_ids, token_weight, pos_embedding, out)])
    op()
    return out

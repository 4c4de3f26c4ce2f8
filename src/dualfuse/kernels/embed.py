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

from ._utils import LAUNCH_OPTIONS, describe, device_props, gdc_launch, pdl_supported, pow2_divisor

__all__ = ["PatchEmbedProblem", "TokenEmbedProblem", "Embeddings", "PatchEmbed", "TokenEmbed",
           "patch_embed", "token_embed", "fold_normalization"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Patch metadata columns.
_PF = dict(pix=0, sb=1, sc=2, sh=3, sw=4, p=5, Wp=6, w=7, w_sn=8, C=9, bias=10, cls=11, pos=12,
           pos_s=13, out=14, o_sb=15, o_st=16, B=17, T=18, D=19, K=20, start=21, n_nb=22)
_NPF = 23
# Token metadata columns.
_TF = dict(ids=0, ids_kind=1, ids_sb=2, ids_sl=3, tok=4, tok_s=5, pos=6, pos_s=7, out=8, o_sb=9,
           o_sl=10, B=11, L=12, D=13, start=14, V=15)
_NTF = 16


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
    # The K loop walks the (channel, kernel row) pixel rows of the patches, KY of them per step; a K
    # tile is KY rows x BLOCK_KP columns (kx), BLOCK_KP = next_pow2(patch size). EVEN_P: every
    # patch size == BLOCK_KP and a multiple of KY (no K masks; weight tiles contiguous).
    KY: tl.constexpr = BLOCK_K // BLOCK_KP
    prob = 0
    for p in range(1, n_patch):
        prob += (tile >= tl.load(pm + p * NPF + 21)).to(tl.int32)
    row = pm + prob * NPF
    pix = tl.load(row + 0).to(pix_ref.dtype)
    sb = tl.load(row + 1)
    sc = tl.load(row + 2)
    sh = tl.load(row + 3)
    sw = tl.load(row + 4)
    if EVEN_P:
        P = BLOCK_KP
    else:
        P = tl.load(row + 5)
    Wp = tl.load(row + 6)
    w_ptr = tl.load(row + 7).to(w_ref.dtype)
    w_sn = tl.load(row + 8)
    C = tl.load(row + 9)
    bias_addr = tl.load(row + 10)
    cls_addr = tl.load(row + 11)
    pos_ptr = tl.load(row + 12).to(w_ref.dtype)
    pos_s = tl.load(row + 13)
    o_ptr = tl.load(row + 14).to(o_ref.dtype)
    o_sb = tl.load(row + 15)
    o_st = tl.load(row + 16)
    B = tl.load(row + 17)
    T = tl.load(row + 18)
    D = tl.load(row + 19)
    start = tl.load(row + 21)
    n_nb = tl.load(row + 22)
    if PTR_ALIGN > 1:
        w_ptr = tl.multiple_of(w_ptr, PTR_ALIGN)
        pos_ptr = tl.multiple_of(pos_ptr, PTR_ALIGN)
        o_ptr = tl.multiple_of(o_ptr, PTR_ALIGN)
        pix = tl.multiple_of(pix, PTR_ALIGN)
    if ELT_ALIGN > 1:
        w_sn = tl.multiple_of(w_sn, ELT_ALIGN)
        pos_s = tl.multiple_of(pos_s, ELT_ALIGN)
        o_sb = tl.multiple_of(o_sb, ELT_ALIGN)
        o_st = tl.multiple_of(o_st, ELT_ALIGN)
        D = tl.multiple_of(D, ELT_ALIGN)
        sb = tl.multiple_of(sb, ELT_ALIGN)
        sc = tl.multiple_of(sc, ELT_ALIGN)
        sh = tl.multiple_of(sh, ELT_ALIGN)
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
    prob = 0
    for p in range(1, n_token):
        prob += (tile >= tl.load(tm + p * NTF + 14)).to(tl.int32)
    row = tm + prob * NTF
    ids_addr = tl.load(row + 0)
    ids_kind = tl.load(row + 1)
    ids_sb = tl.load(row + 2)
    ids_sl = tl.load(row + 3)
    tok_ptr = tl.load(row + 4).to(w_ref.dtype)
    tok_s = tl.load(row + 5)
    pos_ptr = tl.load(row + 6).to(w_ref.dtype)
    pos_s = tl.load(row + 7)
    o_ptr = tl.load(row + 8).to(o_ref.dtype)
    o_sb = tl.load(row + 9)
    o_sl = tl.load(row + 10)
    B = tl.load(row + 11)
    L = tl.load(row + 12)
    D = tl.load(row + 13)
    start = tl.load(row + 14)
    V = tl.load(row + 15)
    if PTR_ALIGN > 1:
        tok_ptr = tl.multiple_of(tok_ptr, PTR_ALIGN)
        pos_ptr = tl.multiple_of(pos_ptr, PTR_ALIGN)
        o_ptr = tl.multiple_of(o_ptr, PTR_ALIGN)
    if ELT_ALIGN > 1:
        tok_s = tl.multiple_of(tok_s, ELT_ALIGN)
        pos_s = tl.multiple_of(pos_s, ELT_ALIGN)
        o_sb = tl.multiple_of(o_sb, ELT_ALIGN)
        o_sl = tl.multiple_of(o_sl, ELT_ALIGN)
        D = tl.multiple_of(D, ELT_ALIGN)

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
def _embed_kernel(pm, tm, n_patch, n_token, n_patch_tiles, pix_ref, w_ref, o_ref, bad_ptr,
                  NPF: tl.constexpr, NTF: tl.constexpr, HAS_PATCH: tl.constexpr, HAS_TOKEN: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KP: tl.constexpr,
                  EVEN_P: tl.constexpr, PIX_W1: tl.constexpr, IEEE: tl.constexpr, BLOCK_T: tl.constexpr,
                  BLOCK_DT: tl.constexpr, PTR_ALIGN: tl.constexpr, ELT_ALIGN: tl.constexpr,
                  PDL_TRIGGER: tl.constexpr, PIX_U8: tl.constexpr):
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
        device, w_dtype, o_dtype = w0.device, w0.dtype, first.out.dtype
        if w_dtype not in _FLOAT_DTYPES or o_dtype not in _FLOAT_DTYPES:
            raise ValueError(f"Embeddings: parameter/output dtypes must be in {_FLOAT_DTYPES}, got {w_dtype}, {o_dtype}")
        pix_dtype = None
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

        def check_tensor(where, name, t, dtype, allow_none=False):
            if t is None and allow_none:
                return
            if not isinstance(t, Tensor):
                raise ValueError(f"{where}: {name} must be a Tensor, got {type(t).__name__}")
            if t.device != device:
                raise ValueError(f"{where}: {name} is on {t.device}, expected {device} (all on one device)")
            if dtype is not None and t.dtype != dtype:
                raise ValueError(f"{where}: {name} dtype {t.dtype} differs from {dtype} (one launch shares dtypes)")

        pm_rows = []
        start = 0
        for i, p in enumerate(patch_problems):
            where = f"Embeddings patch problem {i}"
            x = p.pixel_values
            check_tensor(where, "pixel_values", x, pix_dtype)
            if x.dtype not in _FLOAT_DTYPES + (torch.float64, torch.uint8):
                raise ValueError(f"{where}: pixel_values must be a float tensor or uint8 (read as x / 255), got "
                                 f"{x.dtype}")
            pix_dtype = x.dtype
            for name in ("weight", "pos_embedding"):
                check_tensor(where, name, getattr(p, name), w_dtype)
            for name in ("bias", "class_embedding"):
                check_tensor(where, name, getattr(p, name), w_dtype, allow_none=True)
            check_tensor(where, "out", p.out, o_dtype)
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
            r[_PF["pix"]], r[_PF["sb"]], r[_PF["sc"]], r[_PF["sh"]], r[_PF["sw"]] = (x.data_ptr(),) + tuple(x.stride())
            r[_PF["p"]], r[_PF["Wp"]] = P, Wp
            r[_PF["w"]], r[_PF["w_sn"]], r[_PF["C"]] = w.data_ptr(), w.stride(0), C
            r[_PF["bias"]] = p.bias.data_ptr() if p.bias is not None else 0
            r[_PF["cls"]] = p.class_embedding.data_ptr() if has_cls else 0
            r[_PF["pos"]], r[_PF["pos_s"]] = pos.data_ptr(), pos.stride(0)
            r[_PF["out"]], r[_PF["o_sb"]], r[_PF["o_st"]] = out.data_ptr(), out.stride(0), out.stride(1)
            r[_PF["B"]], r[_PF["T"]], r[_PF["D"]], r[_PF["K"]] = B, T, D, Kdim
            n_nb = triton.cdiv(D, self.block_n)
            r[_PF["start"]], r[_PF["n_nb"]] = start, n_nb
            start += triton.cdiv(B * T, self.block_m) * n_nb
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
        self._pix_w1 = all(r[_PF["sw"]] == 1 for r in pm_rows)

        tm_rows = []
        start = 0
        max_d = 16
        for i, p in enumerate(token_problems):
            where = f"Embeddings token problem {i}"
            ids = p.input_ids
            check_tensor(where, "input_ids", ids, None)
            if ids.dtype not in (torch.int32, torch.int64) or ids.dim() != 2:
                raise ValueError(f"{where}: input_ids must be [B, L] int32/int64, got {describe(ids)}")
            B, L = ids.shape
            if B < 1 or L < 1:
                raise ValueError(f"{where}: input_ids must be non-empty, got {tuple(ids.shape)}")
            check_tensor(where, "token_weight", p.token_weight, w_dtype)
            check_tensor(where, "pos_embedding", p.pos_embedding, w_dtype)
            check_tensor(where, "out", p.out, o_dtype)
            tw, pos, out = p.token_weight, p.pos_embedding, p.out
            if tw.dim() != 2 or tw.stride(1) != 1:
                raise ValueError(f"{where}: token_weight must be [V, D] with a contiguous last dim, got {describe(tw)}")
            D = tw.shape[1]
            if pos.dim() != 2 or pos.shape[0] < L or pos.shape[1] != D or pos.stride(1) != 1:
                raise ValueError(f"{where}: pos_embedding must be [>= {L}, {D}] with a contiguous last dim, got {describe(pos)}")
            if out.dim() != 3 or tuple(out.shape) != (B, L, D) or out.stride(2) != 1:
                raise ValueError(f"{where}: out must be [{B}, {L}, {D}] with a contiguous last dim, got {describe(out)}")
            r = [0] * _NTF
            r[_TF["ids"]], r[_TF["ids_kind"]] = ids.data_ptr(), (1 if ids.dtype == torch.int32 else 2)
            r[_TF["ids_sb"]], r[_TF["ids_sl"]] = ids.stride(0), ids.stride(1)
            r[_TF["tok"]], r[_TF["tok_s"]] = tw.data_ptr(), tw.stride(0)
            r[_TF["pos"]], r[_TF["pos_s"]] = pos.data_ptr(), pos.stride(0)
            r[_TF["out"]], r[_TF["o_sb"]], r[_TF["o_sl"]] = out.data_ptr(), out.stride(0), out.stride(1)
            r[_TF["B"]], r[_TF["L"]], r[_TF["D"]], r[_TF["start"]] = B, L, D, start
            r[_TF["V"]] = tw.shape[0]
            start += triton.cdiv(B * L, self.block_t)
            max_d = max(max_d, D)
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
        self._ptr_align = pow2_divisor(
            [r[_PF[k]] for r in pm_rows for k in ("pix", "w", "pos", "out")]
            + [r[_TF[k]] for r in tm_rows for k in ("tok", "pos", "out")], 16)
        self._elt_align = pow2_divisor(
            [r[_PF[k]] for r in pm_rows for k in ("sb", "sc", "sh", "w_sn", "pos_s", "o_sb", "o_st", "D")]
            + [r[_TF[k]] for r in tm_rows for k in ("tok_s", "pos_s", "o_sb", "o_sl", "D")], 16)

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

"""Block config and split-K choice for a grouped-linear launch.

Skinny M (batch 1, and ViT-L/14's 257 rows): a launch is latency-bound. The config comes from a small cost model
(`_estimate_us`, fitted to H200 timings): all programs in ONE wave, the streamed bytes (weight tile AND x rows:
narrow N tiles re-read x) spread over as many SMs as possible, split-K only where the tiles are too few (it costs
~3 memory round trips). Many rows (batch 32): 128x256 or 64x128 tiles by tile count and K, no split-K. Under the
interpreter: small fixed tiles (fast tests).

`CONFIG_KEYS` are the keys a caller may override (GroupedLinear(config=...)).
"""
from __future__ import annotations

import triton

from ...config import GemmConfig
from .._utils import device_props, device_smem_bytes, num_sms
from .regime import as_regime, byte_bound_candidates, estimate_byte_bound_us, tuned_config

CONFIG_KEYS = GemmConfig.keys()  # documented field by field in dualfuse.config.GemmConfig


def prefetch_steps(v) -> int:
    """BLOCK_K steps of weights each program asks L2 for (config "prefetch": False / None / 0 = off, or n)."""
    if v is False or v is None:
        return 0
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"config prefetch must be False or an int >= 0 (BLOCK_K steps), got {v!r}")
    return v


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _smem_bytes(cfg: dict, elt: int, w_elt: int | None = None) -> int:
    """Shared memory a config needs: pipelined A/B tiles (B of w_elt-byte weights: 1 when quantized), or the fp32
    epilogue tile if larger."""
    w_elt = elt if w_elt is None else w_elt
    pipe = cfg["num_stages"] * (cfg["BLOCK_M"] * elt + cfg["BLOCK_N"] * w_elt) * cfg["BLOCK_K"]
    return max(pipe, cfg["BLOCK_M"] * cfg["BLOCK_N"] * 4)


def _is_skinny(dims, device) -> bool:
    """Few rows (batch 1): too few 128x128 output tiles to fill the SMs, or every M <= 128."""
    tiles128 = sum(triton.cdiv(m, 128) * triton.cdiv(n, 128) for m, n, _ in dims)
    return max(m for m, _, _ in dims) <= 128 or tiles128 < num_sms(device)


def _fit_smem(cfg: dict, elt: int, device, w_elt: int | None = None) -> dict:
    limit = device_smem_bytes(device)
    while cfg["num_stages"] > 2 and _smem_bytes(cfg, elt, w_elt) > limit:
        cfg["num_stages"] -= 1
    while _smem_bytes(cfg, elt, w_elt) > limit and cfg["BLOCK_N"] > 32:
        cfg["BLOCK_N"] //= 2
    while _smem_bytes(cfg, elt, w_elt) > limit and cfg["BLOCK_K"] > 32:
        cfg["BLOCK_K"] //= 2
    return cfg


# ---- batch-1 cost model: picks the skinny config. One launch ~ T_LAUNCH + waves * T_PROGRAM + (programs
# per SM) * max(streamed bytes / SM_BYTES_PER_US, padded FLOPs / SM_FLOP_PER_US) + split tail. A program's
# streamed bytes are its weight tile AND its x rows (each N tile re-reads x: narrow tiles cost L2
# traffic); at batch 1 a program streams at ~75 GB/s (latency-bound: a few pipeline stages in flight), so
# spreading the bytes over all SMs in ONE wave matters more than anything else. The split tail (partial
# store, arrival atomic, partial loads) costs ~3 round trips. The constants are fitted to cold-L2
# single-launch timings on an H200 (ViT-B/32 and ViT-L/14 steps at batch 1; benchmarks/NOTES-gemm.md).
_T_LAUNCH, _T_PROGRAM, _T_SPLIT, _T_SPLIT_EACH = 2.5, 2.5, 2.5, 0.5  # µs
_SM_BYTES_PER_US, _SM_FLOP_PER_US = 75e3, 3e6
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) the model chooses from (BLOCK_M 64 entries shrink for M <= 32)
_SKINNY_TILES = ((64, 64, 128, 4, 4), (64, 32, 128, 4, 5), (128, 128, 64, 8, 4), (64, 128, 64, 4, 5),
                 (128, 64, 128, 8, 4), (128, 32, 128, 4, 5))
# (programs_per_sm, min_k_iters, max_split): no split-K, or split-K to about one program per SM
_SKINNY_SPLITS = ((0, 1, 1), (1, 2, 8), (1, 4, 4))
# L2 prefetch of each program's first 2 BLOCK_K steps of weights, requested before gdc_wait: under PDL their
# DRAM latency overlaps the previous launch's drain. Prefetching the whole slice is slower, and more than 2
# steps no faster (benchmarks/NOTES-gemm.md).
_SKINNY_PREFETCH = 2


def _estimate_us(dims, cfg: dict, splits, elt: int, sms: int, smem_limit: int, w_elt: int | None = None) -> float:
    """Modelled µs of one skinny launch (see the constants above). w_elt: bytes per weight element (1 for int8 /
    fp8 weights; default elt)."""
    w_elt = elt if w_elt is None else w_elt
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    ctas = max(1, min(smem_limit // _smem_bytes(cfg, elt, w_elt), 65536 // (cfg["num_warps"] * 32 * 200)))
    programs, t_prog, max_s = 0, 0.0, 1
    for (m, n, k), s in zip(dims, splits):
        tiles_m = triton.cdiv(m, bm)
        iters = max(1, triton.cdiv(k, bk))
        ips = triton.cdiv(iters, max(1, s))
        s_eff = triton.cdiv(iters, ips)
        max_s = max(max_s, s_eff)
        programs += tiles_m * triton.cdiv(n, bn) * s_eff
        stream = ips * bk * (w_elt * bn + elt * m / tiles_m) / _SM_BYTES_PER_US  # masked x rows move no bytes
        compute = 2 * bm * bn * bk * ips / (_SM_FLOP_PER_US * (1.0 if bn >= 64 else 0.75 if bn == 32 else 0.5))
        t_prog = max(t_prog, stream, compute)
    t = _T_LAUNCH + triton.cdiv(programs, sms * ctas) * _T_PROGRAM + triton.cdiv(programs, sms) * t_prog
    if max_s > 1:
        t += _T_SPLIT + _T_SPLIT_EACH * (max_s - 1)
    return t


def _skinny_configs(max_m: int) -> list[dict]:
    out = []
    for bm, bn, bk, warps, stages in _SKINNY_TILES:
        if bm == 64 and max_m <= 32:
            bm = max(16, next_pow2(max_m))
        for pps, mki, cap in _SKINNY_SPLITS:
            c = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages,
                     programs_per_sm=pps, min_k_iters=mki, max_split=cap, prefetch=_SKINNY_PREFETCH)
            if c not in out:
                out.append(c)
    return out


def _ranked_skinny(dims, elt, device, base=None, nosplit=None, w_elt=None) -> list[tuple[float, dict]]:
    """Skinny configs (fitting the device's shared memory), best modelled first."""
    sms, limit = num_sms(device), device_smem_bytes(device)
    ranked = []
    for c in _skinny_configs(max(m for m, _, _ in dims)):
        c = {**c, **(base or {})}
        if _smem_bytes(c, elt, w_elt) > limit:
            continue
        ranked.append((_estimate_us(dims, c, choose_splits(dims, c, device, None, nosplit), elt, c.get("num_sms") or sms,
                                    limit, w_elt), c))
    ranked.sort(key=lambda t: t[0])  # stable: ties keep the table's order
    return ranked


def default_config(problems, device, base: dict | None = None) -> dict:
    """Heuristic block config by shape. Small fixed tiles under the interpreter (fast tests). base: the
    caller's overrides (e.g. num_sms of a green context), which the skinny model ranks with. The device's SMs and
    shared memory come from kernels._utils (under target_device: the target's, computable without its GPU)."""
    elt = problems[0].x.element_size()
    w_elt = max(p.weight.element_size() for p in problems)  # 1 where every weight is quantized (int8 / fp8)
    dims = [(p.x.shape[0], p.weight.shape[0], p.x.shape[1]) for p in problems]
    max_m = max(m for m, _, _ in dims)
    if device_props(device) is None:  # the interpreter (no CUDA device, no target_device)
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
    regime = as_regime((base or {}).get("regime"))
    if regime is not None and regime.byte_bound and elt != 4:
        return byte_bound_config(problems, device, base, regime)
    if elt == 4:  # fp32 inputs ("ieee" dot = FMA path): correctness use, keep tiles modest
        cfg = dict(BLOCK_M=min(64, max(16, next_pow2(max_m))), BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4,
                   num_stages=3)
    elif _is_skinny(dims, device):
        ranked = _ranked_skinny(dims, elt, device, base, nosplit(problems), w_elt)
        if ranked:
            cfg = dict(ranked[0][1])
        else:
            cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3, programs_per_sm=0,
                       prefetch=_SKINNY_PREFETCH)
        # TMA loads where every problem has <= 128 rows (ViT-B/32 at batch 1); with more rows (ViT-B/16, L/14,
        # SigLIP at batch 1: 196..257) the pointer loads are faster (BENCHMARKS.md)
        cfg["tma"] = max_m <= 128
        return cfg
    else:
        # many rows (batch 32): 128 x 256 tiles where there are enough of them for ~2.5 waves (or long K
        # amortises a ragged last wave), else 64 x 128 (3 programs per SM smooth a ragged wave); see
        # benchmarks/NOTES-gemm.md. No split-K.
        sms = num_sms(device)
        tiles256 = sum(triton.cdiv(m, 128) * triton.cdiv(n, 256) for m, n, _ in dims)
        k_avg = sum(k for _, _, k in dims) / len(dims)
        if tiles256 >= 2.5 * sms or (k_avg >= 2048 and tiles256 >= 1.5 * sms):
            cfg = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
        else:
            cfg = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)
        cfg["programs_per_sm"] = 0
        # tensor-descriptor loads where the card has TMA (sm_90+; else pointer loads): faster at batch 32 for
        # every architecture (BENCHMARKS.md)
        cfg["tma"] = True
    return _fit_smem(cfg, elt, device, w_elt)


def _ctas_per_sm(cfg: dict, elt: int, w_elt: int, smem_limit: int) -> int:
    """Programs one SM holds at once: shared memory and registers (~200 per thread) permitting."""
    return max(1, min(smem_limit // _smem_bytes(cfg, elt, w_elt), 65536 // (cfg["num_warps"] * 32 * 200)))


def ranked_byte_bound(dims, elt: int, w_elt: int, sms: int, smem_limit: int, regime, keep_k=None, device=None,
                      base: dict | None = None) -> list[tuple[float, dict]]:
    """Byte-bound configs (regime.byte_bound_candidates) that fit shared memory, best modelled first (ties keep
    the candidates' order: fewer splits and shallower pipelines first)."""
    ranked = []
    for c in byte_bound_candidates(max(m for m, _, _ in dims), sms):
        c = {**c, **{k: v for k, v in (base or {}).items() if k not in ("regime",)}}
        if _smem_bytes(c, elt, w_elt) > smem_limit:
            continue
        splits = choose_splits(dims, c, device, None, keep_k)
        ranked.append((estimate_byte_bound_us(dims, c, splits, w_elt, sms, _ctas_per_sm(c, elt, w_elt, smem_limit),
                                              regime), c))
    ranked.sort(key=lambda t: t[0])
    return ranked


def byte_bound_config(problems, device, base: dict | None, regime) -> dict:
    """The config of one launch in the byte-bound regime: the stand-in's measured pick for this shape where the
    table has one (regime.tuned_config), else the best of the byte-bound cost model."""
    elt = problems[0].x.element_size()
    w_elt = max(p.weight.element_size() for p in problems)
    dims = [(p.x.shape[0], p.weight.shape[0], p.x.shape[1]) for p in problems]
    sms = (base or {}).get("num_sms") or num_sms(device)
    keep_k = nosplit(problems)
    tuned = tuned_config(dims, w_elt, sms)
    if tuned is not None and not (any(keep_k) and tuned.get("programs_per_sm")):
        return {**tuned, "num_sms": sms, "tma": False}
    ranked = ranked_byte_bound(dims, elt, w_elt, sms, device_smem_bytes(device), regime, keep_k, device, base)
    if not ranked:
        return _fit_smem(dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3,
                              programs_per_sm=1, num_sms=sms, tma=False), elt, device, w_elt)
    return dict(ranked[0][1])


def nosplit(problems) -> list[bool]:
    """Problems that must keep all of K in one program: a folded LayerNorm without given statistics computes
    them from whole rows of x."""
    return [p.norm is not None and p.norm.stats is None for p in problems]


def choose_splits(dims, cfg, device, split_k, nosplit=None) -> list[int]:
    """K splits per problem. dims: [(M, N, K)]. split_k: None (auto), int (all), or list (per problem).
    nosplit: per problem, True = never split (folded LayerNorm); an explicit split_k > 1 there is an error.

    Auto: no split while the output tiles of all problems fill the SMs (or programs_per_sm == 0); below
    that (skinny M), split so the launch has ~num_sms * programs_per_sm programs of about equal K work: a
    problem with 4x the K gets 4x the splits (work-proportional), no split gets fewer than min_k_iters
    BLOCK_K steps, and no problem more than max_split splits."""
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    tiles = [triton.cdiv(m, bm) * triton.cdiv(n, bn) for m, n, _ in dims]
    iters = [max(1, triton.cdiv(k, bk)) for _, _, k in dims]
    if split_k is not None:
        ks = [split_k] * len(dims) if isinstance(split_k, int) else list(split_k)
        if len(ks) != len(dims) or any(not isinstance(s, int) or s < 1 for s in ks):
            raise ValueError(f"split_k must be None, an int >= 1 or one int >= 1 per problem, got {split_k!r}")
        out = [min(s, it) for s, it in zip(ks, iters)]
        bad = [i for i, s in enumerate(out) if s > 1 and nosplit and nosplit[i]]
        if bad:
            raise ValueError(f"split_k: problem(s) {bad} have a folded LayerNorm, which needs all of K in one "
                             f"program; give them split 1 (a per-problem list), got {split_k!r}")
        return out
    sms = cfg.get("num_sms") or num_sms(device)
    pps = cfg.get("programs_per_sm", 2)
    if sum(tiles) >= sms or not pps:
        return [1] * len(dims)
    target = sms * pps
    work = sum(t * it for t, it in zip(tiles, iters))
    per_split = max(cfg.get("min_k_iters", 4), work / target)
    cap = cfg.get("max_split", 64)
    out = [max(1, min(cap, it, int(it / per_split + 0.5))) for it in iters]
    return [1 if nosplit and nosplit[i] else s for i, s in enumerate(out)]

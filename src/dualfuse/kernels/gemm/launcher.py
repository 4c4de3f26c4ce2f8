"""The launcher: `GroupedLinear` validates once, builds the per-problem fields (table.py), picks block config and
split-K (heuristics.py), allocates the split-K workspace and compiles; `__call__` only launches (no sync, no
allocation) so a CUDA graph can capture it. `grouped_linear(...)` is the convenience wrapper for one-off calls."""
from __future__ import annotations

import torch
import triton

from ...config import GemmConfig
from .._utils import LAUNCH_OPTIONS, is_interpreter, pdl_supported, target_props
from .heuristics import CONFIG_KEYS, choose_splits, default_config, next_pow2, nosplit, prefetch_steps
from .kernel import grouped_linear_kernel
from .problems import FLOAT_DTYPES, LinearProblem, validate_problems
from .table import MAX_ARG_PROBLEMS, NUM_COLS, kernel_args, pack_row

try:  # host-side tensor descriptors (Triton >= 3.4): the optional TMA path
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None


def _tma_supported(problems, device, aligned: bool) -> bool:
    """Tensor-descriptor loads apply: a Triton with TensorDescriptor, an sm_90+ GPU (or the interpreter), <= 4
    problems (descriptors travel as kernel arguments), 16-bit inputs, 16-byte aligned rows, 2-D x and w with
    unit column stride, no quantized weight (those launches keep pointer loads)."""
    if TensorDescriptor is None or len(problems) > MAX_ARG_PROBLEMS or not aligned:
        return False
    if any(p.weight_scale is not None for p in problems):
        return False
    if problems[0].x.element_size() != 2:
        return False
    target = target_props()  # planning for another device (target_device): its capability decides
    if target is not None:
        if target.capability[0] < 9:
            return False
    elif not is_interpreter() and (device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9):
        return False
    return all(p.x.stride(1) == 1 and p.weight.stride(1) == 1 for p in problems)


class _Plan:
    """Everything one launch needs: per-problem fields, workspace, grid, constexprs. Built once."""

    def __init__(self, problems, cfg: dict, splits: list[int]):
        device = problems[0].x.device
        outs = [p.out for p in problems]
        bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
        x_dtype = problems[0].x.dtype

        rows = []
        for i, p in enumerate(problems):
            out = p.out
            M, K = p.x.shape
            N = p.weight.shape[0]
            iters = triton.cdiv(K, bk)
            s = max(1, min(splits[i], iters)) if iters > 0 else 1
            ips = triton.cdiv(iters, s) if iters > 0 else 0
            s = triton.cdiv(iters, ips) if iters > 0 else 1  # drop empty splits
            if p.partial_sums and s != out.shape[0]:
                raise ValueError(
                    f"problem {i}: partial_sums out has {out.shape[0]} slices, but K={K} in steps of BLOCK_K={bk} "
                    f"({iters} steps) splits into {s} non-empty parts; allocate [S, M, N] with S = "
                    f"GroupedLinear.partial_slices(K, S, BLOCK_K) (here {s}) or pass a matching split")
            tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
            rows.append(dict(i=i, p=p, M=M, N=N, K=K, S=s, ips=ips, tiles=tiles))
        # heaviest programs get the lowest ids: they start first (longest-processing-time-first)
        rows.sort(key=lambda r: -r["ips"])
        self.splits = [0] * len(rows)
        fields, start, ws_off, cnt_off = [], 0, 0, 0
        for r in rows:
            p = r["p"]
            self.splits[r["i"]] = r["S"]
            fields.append(pack_row(p, start=start, splits=r["S"], iters=r["ips"], ws_off=ws_off, cnt_off=cnt_off))
            start += r["tiles"] * r["S"]
            if r["S"] > 1 and not p.partial_sums:
                ws_off += r["tiles"] * r["S"] * bm * bn
                cnt_off += r["tiles"]
        self.num_programs = start
        self.meta_in_args = len(rows) <= MAX_ARG_PROBLEMS
        self.meta = torch.tensor(fields if not self.meta_in_args else [[0] * NUM_COLS.value], dtype=torch.int64,
                                 device=device)
        # every workspace slot is written before it is read
        self.ws = torch.empty(max(ws_off, 1), dtype=torch.float32, device=device)
        self.cnt = torch.zeros(max(cnt_off, 1), dtype=torch.int32, device=device)  # last arrival resets
        scalars = kernel_args(fields)

        ptrs = [t for p, out in zip(problems, outs) for t in (p.x, p.weight, out, p.bias, p.residual) if t is not None]
        strides = [(p.x.stride(0), p.x.element_size()) for p in problems]
        strides += [(p.weight.shape[1], p.weight.element_size()) for p in problems]
        strides += [(o.stride(-2), o.element_size()) for o in outs]
        strides += [(o.shape[-1], e) for o in outs for e in (o.element_size(), problems[0].x.element_size())]
        strides += [(p.residual.stride(0), p.residual.element_size()) for p in problems if p.residual is not None]
        aligned = all(t.data_ptr() % 16 == 0 for t in ptrs) and all((s * e) % 16 == 0 for s, e in strides)
        bias_ref = next((p.bias for p in problems if p.bias is not None), problems[0].x)
        quantized = [p for p in problems if p.weight_scale is not None]
        wq_ref = quantized[0].weight if quantized else problems[0].x
        scale_ref = quantized[0].weight_scale if quantized else problems[0].x
        interp = (is_interpreter() or device.type != "cuda") and target_props() is None
        use_pdl = bool(cfg.get("pdl", True)) and pdl_supported(device)
        any_split = any(r["S"] > 1 and not r["p"].partial_sums for r in rows)
        any_partial = any(r["p"].partial_sums for r in rows)
        max_tiles_m = max(triton.cdiv(r["M"], bm) for r in rows)
        warps = cfg["num_warps"]
        per_thread = bm * bn // (32 * warps)  # fp32 accumulator elements per thread
        use_tma = bool(cfg.get("tma", False)) and _tma_supported(problems, device, aligned)
        descs = [None] * (2 * MAX_ARG_PROBLEMS)
        if use_tma:  # in the kernel's problem order (rows), padded with problem 0's
            for j in range(MAX_ARG_PROBLEMS):
                p = rows[j]["p"] if j < len(rows) else rows[0]["p"]
                descs[2 * j] = TensorDescriptor.from_tensor(p.x, [bm, bk])
                descs[2 * j + 1] = TensorDescriptor.from_tensor(p.weight, [bn, bk])
        self.args = (self.meta, self.ws, self.cnt, problems[0].x, outs[0], bias_ref, wq_ref, scale_ref, *scalars,
                     *descs)
        self.constexprs = dict(
            NUM_PROBLEMS=len(rows),
            META_IN_ARGS=self.meta_in_args,
            BLOCK_M=bm,
            BLOCK_N=bn,
            BLOCK_K=bk,
            GROUP_M=cfg["GROUP_M"],
            EVEN_K=all(r["K"] % bk == 0 for r in rows),
            ALIGNED=aligned,
            VEC_IN=16 // problems[0].x.element_size(),
            VEC_OUT=16 // outs[0].element_size(),
            EARLY_EPI=bool(cfg.get("early_epilogue", bm * bn <= 128 * 64 and max_tiles_m <= 8)),
            ANY_SPLIT=any_split,
            ANY_PARTIAL=any_partial,
            RED_CHUNK=(4 if per_thread <= 32 else 2 if per_thread <= 64 else 1) if any_split else 1,
            INPUT_PRECISION=cfg.get("input_precision", "ieee") if x_dtype == torch.float32 else "tf32",
            PREFETCH=0 if interp else prefetch_steps(cfg.get("prefetch", False)),
            PF_LINES=max(1, bk * max(p.weight.element_size() for p in problems) // 128),
            USE_PDL=use_pdl,
            NORM=any(p.norm is not None for p in problems),
            NORM_PREPASS=any(p.norm is not None and p.norm.stats is None for p in problems),
            NORM_STATS_IN=any(p.norm is not None and p.norm.stats is not None for p in problems),
            MAX_PARTS=next_pow2(max([triton.cdiv(p.x.shape[1], p.norm.stats_part_width) for p in problems
                                      if p.norm is not None and p.norm.stats is not None] or [1])),
            STATS_OUT=any(p.row_stats_out is not None for p in problems),
            USE_TMA=use_tma,
            ANY_WQ=bool(quantized),
            ALL_WQ=len(quantized) == len(problems),
            VEC_K=16 if len(quantized) == len(problems) else 16 // problems[0].x.element_size(),
            WIDEN_BITS=cfg.get("widen", "bits") == "bits" and wq_ref.dtype == torch.int8 and x_dtype == torch.float16,
        )
        self.launch_opts = dict(num_warps=warps, num_stages=cfg["num_stages"], **LAUNCH_OPTIONS)
        if use_pdl:
            self.launch_opts["launch_pdl"] = True
        self.grid = (self.num_programs,)

    def warmup(self):
        """Compile and load without running, so the first __call__ can be captured by a CUDA graph."""
        if self.num_programs and not is_interpreter():
            ck = grouped_linear_kernel.warmup(*self.args, grid=self.grid, **self.constexprs, **self.launch_opts)
            init = getattr(ck, "_init_handles", None)
            if init is not None:
                init()  # module load onto the device now, not lazily inside a graph capture

    def launch(self):
        if self.num_programs:
            grouped_linear_kernel[self.grid](*self.args, **self.constexprs, **self.launch_opts)


class GroupedLinear:
    """All problems in ONE kernel launch.

    Built once (validates, builds the per-problem fields, picks config, allocates any split-K workspace);
    calling it only launches — no host<->device sync, no allocation, so a CUDA graph can capture
    __call__ and replay it. Pointers are baked in: the tensors in the problems must stay alive and be
    reused (static buffers).

    split_k: None = heuristic; an int forces that many K splits on every problem (clamped to its K
    iterations); a list gives one per problem. config: overrides of the heuristic block config, a
    dualfuse.config.GemmConfig or a dict of its keys.

    Determinism: every call gives the same bits (split-K partials are summed in split order).

    One GroupedLinear must not run concurrently with itself (its split-K workspace and counters are
    per object); different objects may run on different streams. Problems in one launch must not write
    memory another problem of the same launch reads (except residual is out, which is supported).
    """

    def __init__(self, problems: list[LinearProblem], *, split_k=None, config: GemmConfig | dict | None = None):
        validate_problems(problems)
        self.problems = list(problems)
        device = self.problems[0].x.device
        if isinstance(config, GemmConfig):
            config = config.to_dict() or None
        if config is not None:
            if not isinstance(config, dict) or not set(config) <= CONFIG_KEYS:
                raise ValueError(f"config must be a dict with keys from {sorted(CONFIG_KEYS)}, got {config!r}")
            GemmConfig(**config)  # ValueError for a bad value
        cfg = {**default_config(self.problems, device, config), **(config or {})}
        for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
            v = cfg[k]
            if not isinstance(v, int) or v < 16 or v & (v - 1):
                raise ValueError(f"config {k} must be a power of two >= 16, got {v!r}")
        dims = [(p.x.shape[0], p.weight.shape[0], p.x.shape[1]) for p in self.problems]
        self.config = cfg
        splits = choose_splits(dims, cfg, device, split_k, nosplit(self.problems))
        # partial-sums problems split into as many parts as their out has slices (checked by _Plan)
        splits = [p.out.shape[0] if p.partial_sums else s for p, s in zip(self.problems, splits)]
        self._plan = _Plan(self.problems, cfg, splits)
        self.splits = self._plan.splits  # K splits per problem, in the caller's order
        self.num_programs = self._plan.num_programs
        self._plan.warmup()

    @property
    def outputs(self) -> list[torch.Tensor]:
        return [p.out for p in self.problems]

    @staticmethod
    def partial_slices(K: int, split: int, block_k: int) -> int:
        """Slices a partial_sums out needs when K (in steps of block_k) is split `split` ways: empty parts are
        dropped, so this can be less than `split`."""
        iters = max(1, triton.cdiv(K, block_k))
        s = max(1, min(split, iters))
        return triton.cdiv(iters, triton.cdiv(iters, s))

    @property
    def uses_tma(self) -> bool:
        """Whether the launch loads x / w tiles by tensor descriptors (config "tma" where _tma_supported)."""
        return bool(self._plan.constexprs["USE_TMA"])

    @property
    def block_n(self) -> int:
        """Columns per output tile: the part width of the row statistics this launch writes (row_stats_out)."""
        return self.config["BLOCK_N"]

    def __call__(self) -> None:
        self._plan.launch()


def grouped_linear(xs, weights, biases=None, activations=None, residuals=None, out_dtype=None, norms=None,
                   **kwargs) -> list[torch.Tensor]:
    """Convenience: allocate outputs, build a GroupedLinear, run it once, return outputs. norms: per problem
    None or the FoldedLayerNorm of fold_layernorm (then weights/biases must be the folded ones)."""
    if not isinstance(xs, (list, tuple)) or not isinstance(weights, (list, tuple)):
        raise ValueError("xs and weights must be lists of tensors")
    n = len(xs)
    biases = [None] * n if biases is None else list(biases)
    activations = [activations] * n if activations is None or isinstance(activations, str) else list(activations)
    residuals = [None] * n if residuals is None else list(residuals)
    norms = [None] * n if norms is None else list(norms)
    if not (len(weights) == len(biases) == len(activations) == len(residuals) == len(norms) == n):
        raise ValueError(f"xs, weights, biases, activations, residuals, norms must have equal lengths, got "
                         f"{n}, {len(weights)}, {len(biases)}, {len(activations)}, {len(residuals)}, {len(norms)}")
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be None or one of fp16/bf16/fp32, got {out_dtype}")
    problems = []
    for x, w, b, a, r, nm in zip(xs, weights, biases, activations, residuals, norms):
        if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor) or x.dim() != 2 or w.dim() != 2:
            raise ValueError(f"each x must be a 2-D [M, K] tensor and each weight a 2-D [N, K] tensor, got "
                             f"{getattr(x, 'shape', type(x).__name__)} and {getattr(w, 'shape', type(w).__name__)}")
        out = torch.empty((x.shape[0], w.shape[0]), dtype=out_dtype or x.dtype, device=x.device)
        problems.append(LinearProblem(x, w, out, bias=b, activation=a, residual=r, norm=nm))
    GroupedLinear(problems, **kwargs)()
    return [p.out for p in problems]

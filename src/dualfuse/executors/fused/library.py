"""Library kernels inside the fused runner: cuBLAS GEMMs through torch and PyTorch's SDPA, chosen per stage and per
tower where the calibrated cost model says they beat the grouped Triton launch (dualfuse.calibration).

A library step runs the same problem as the Triton kernel would, on the runner's static buffers, so it is
captured into the same CUDA graph:

- GEMM ``out = act(x @ W.T + bias) + residual`` (:class:`LibraryLinear`): no activation and no residual ->
  ``torch.addmm(bias, x, W.T, out=out)`` (cuBLAS, the bias in its epilogue); tanh-GELU on CUDA ->
  ``torch._addmm_activation(bias, x, W.T, use_gelu=True)`` (cuBLASLt's bias + GELU epilogue); other activations
  -> addmm, then the activation as torch ops in the graph; a residual -> cuBLAS accumulates into the residual
  stream (``out.addmm_(x, W.T)``, beta = 1) where it is ``out`` and has x's dtype, then the bias; otherwise the
  result is added by a torch op. ``torch._grouped_mm`` is not used: it groups problems that share K and N, and the
  two towers' steps do not.
- Attention (:class:`LibraryAttention`): ``scaled_dot_product_attention`` on [B, H, S, Dh] views of the packed
  QKV buffer (flash attention on CUDA where it applies), written back into the runner's attention buffer.

Only plain problems may take the library path (:func:`library_ok`): no LayerNorm folded in, no row statistics
for a folded LayerNorm, no deferred split-K sums, 16/32-bit weights (int8 / fp8 weights keep the Triton path:
dequantizing them for cuBLAS would spend the memory they save), and for attention a real per-batch query (SigLIP's
pooling probe keeps Triton). On CPU (tests) the same torch ops run on the CPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...calibration import LIBRARY, attention_signature, linear_signature
from ...reference import activation


def library_ok(problem) -> bool:
    """Whether a kernel problem can run as a library call (module docstring)."""
    from ...kernels.attention import AttentionProblem
    from ...kernels.gemm import LinearProblem

    if isinstance(problem, LinearProblem):
        return (problem.norm is None and problem.row_stats_out is None and not problem.partial_sums
                and problem.weight_scale is None and problem.x.dtype == problem.weight.dtype)
    if isinstance(problem, AttentionProblem):
        return problem.q.stride(0) != 0 and problem.q.shape[1] == problem.k.shape[1]
    return False


def signature(problem) -> str:
    from ...kernels.attention import AttentionProblem

    return attention_signature(problem) if isinstance(problem, AttentionProblem) else linear_signature(problem)


def _activation(y: torch.Tensor, kind: str | None) -> torch.Tensor:
    return y if kind is None else activation(y, kind)


class LibraryLinear:
    """Each problem as a cuBLAS GEMM (through torch) with its epilogue; build once, ``__call__`` only launches."""

    def __init__(self, problems):
        self.problems = list(problems)
        for p in self.problems:
            if not library_ok(p):
                raise AssertionError(f"LibraryLinear: problem {linear_signature(p)} needs the Triton kernel")
        self._calls = [self._prepare(p) for p in self.problems]

    @staticmethod
    def _prepare(p):
        x, wt, out, bias, act, res = p.x, p.weight.t(), p.out, p.bias, p.activation, p.residual
        cuda = x.device.type == "cuda"
        if res is None and act is None:
            if bias is None:
                return lambda: torch.mm(x, wt, out=out)
            return lambda: torch.addmm(bias, x, wt, out=out)
        if res is None and act == "gelu_tanh" and cuda and bias is not None:
            # cuBLASLt bias + GELU(tanh) epilogue (on CPU torch applies the exact GELU here: not used there)
            return lambda: out.copy_(torch._addmm_activation(bias, x, wt, use_gelu=True))
        if res is None:
            return lambda: out.copy_(_activation(torch.addmm(bias, x, wt) if bias is not None else x @ wt, act))
        if act is None and res is out and out.dtype == x.dtype:
            if bias is None:
                return lambda: out.addmm_(x, wt)

            def accumulate():  # cuBLAS adds into the residual stream (beta = 1), then the bias
                out.addmm_(x, wt)
                out.add_(bias)

            return accumulate

        def general():
            y = torch.addmm(bias, x, wt) if bias is not None else x @ wt
            torch.add(res, _activation(y, act), out=out)

        return general

    def __call__(self):
        for call in self._calls:
            call()


class LibraryAttention:
    """Each problem through ``scaled_dot_product_attention`` (flash / memory-efficient kernels where they apply)."""

    def __init__(self, problems):
        self.problems = list(problems)
        for p in self.problems:
            if not library_ok(p):
                raise AssertionError(f"LibraryAttention: problem {attention_signature(p)} needs the Triton kernel")
        self._calls = [self._prepare(p) for p in self.problems]

    @staticmethod
    def _prepare(p):
        b, sq, hd = p.q.shape
        h = p.heads
        dh = hd // h
        q = p.q.unflatten(-1, (h, dh)).transpose(1, 2)  # [B, H, S, Dh] views of the packed buffer
        k = p.k.unflatten(-1, (h, dh)).transpose(1, 2)
        v = p.v.unflatten(-1, (h, dh)).transpose(1, 2)
        out = p.out.view(b, sq, h, dh)
        causal, scale = p.causal, p.scale

        def call():
            o = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
            out.copy_(o.transpose(1, 2))

        return call

    def __call__(self):
        for call in self._calls:
            call()


LIBRARY_OPS = {"linear": LibraryLinear, "attention": LibraryAttention}


def build_chosen(build, runner, stage, problems, impls):
    """The stage's launches for a per-step choice ``impls`` ("triton" | "library" per step): the Triton steps
    through the usual builder ``build`` (one grouped launch), the library steps as one library op; run one after
    the other in the graph."""
    from ...plan import Stage

    lib = [i for i, c in enumerate(impls) if c == LIBRARY]
    if not lib:
        return build(runner, stage, problems)
    tri = [i for i in range(len(problems)) if i not in lib]
    ops = [LIBRARY_OPS[stage.kind]([problems[i] for i in lib])]
    if tri:
        ops.insert(0, build(runner, Stage(stage.kind, [stage.steps[i] for i in tri]), [problems[i] for i in tri]))
    if len(ops) == 1:
        return ops[0]

    def run_all():
        for op in ops:
            op()

    return run_all


def choose(runner, stage, problems, calibration, mode: str) -> tuple[tuple[str, ...], str]:
    """(implementation per step, why) for a stage: ``mode`` "library" takes the library path wherever a problem
    allows it; "auto" asks the calibration's cost model (no calibration: Triton)."""
    n = len(problems)
    if stage.kind not in LIBRARY_OPS:
        return ("triton",) * n, "no library kernel for this kind"
    allowed = [library_ok(p) for p in problems]
    if mode == "library":
        return tuple(LIBRARY if ok else "triton" for ok in allowed), "gemm_impl='library'"
    if calibration is None:
        return ("triton",) * n, "no calibration"
    return calibration.choose_stage([signature(p) for p in problems], allowed)

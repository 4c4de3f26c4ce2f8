"""Grouped GEMM: `out_i = act(x_i @ w_i.T + bias_i) + residual_i` for several problems in ONE launch.

Optionally with the LayerNorm before it folded in (vertical fusion, `fold_layernorm`):
`out_i = act(LN(x_i) @ w_i.T + bias_i) + residual_i` without an LN launch or a normalized copy of x: the LN's
scale and shift are folded into the weight and bias once and the epilogue applies each row's mean and rstd. The
row statistics come from the launch that wrote x (`row_stats_out`: every output tile leaves its rows' mean and
sum of squared deviations; the folded GEMM merges the parts, Chan et al.), or, without them, from a pass over the
program's x rows before its K loop. The folded GEMMs cost about what the LayerNorm launches they replace cost
under PDL (BENCHMARKS.md), so the fused executor leaves folding off by default.

Weight-only quantization: a problem's weight may be int8 (or fp8 e4m3 on compute capability >= 8.9) with one
scale per output channel (``LinearProblem.weight_scale``, made by ``dualfuse.quantize.quantize_weight``): the 1-byte
tiles are widened to the activation dtype in registers and the fp32 sums scaled before the epilogue. Quantized and
16-bit problems may share a launch.

Why: the two towers of a dual encoder do the same step (QKV, out-proj, FC1, FC2) on different shapes. At batch 1
each step is tiny (M = 50 / 77 rows), so the time is launch gaps, per-program latency and streaming the weights;
one launch that covers both towers halves the launches and lets the tiles of both towers share the SMs.

Layout (Liger-Kernel style: kernel, then launcher, then glue):
- `kernel.py`: `grouped_linear_kernel`, one program = one (problem, output tile, K split); TMA loads, PDL,
  the in-launch split-K reduction, the folded-LN epilogue.
- `table.py`: the per-problem fields (columns `COL_*`), defined once: packed by the host (`pack_row`), read by
  the kernel (kernel arguments for up to MAX_ARG_PROBLEMS problems, else an int64 table on the device).
- `launcher.py`: `GroupedLinear` (build once, `__call__` only launches: CUDA-graph capturable) and
  `grouped_linear(...)`.
- `heuristics.py`: block config and split-K choice (a cost model for skinny M).
- `problems.py`: `LinearProblem`, `FoldedLayerNorm`, `row_stats_buffer` and input validation.
- `fold.py`: `fold_layernorm`.
"""
from .._utils import pdl_supported
from .fold import fold_layernorm
from .heuristics import choose_splits
from .launcher import GroupedLinear, grouped_linear
from .problems import FoldedLayerNorm, LinearProblem, row_stats_buffer
from .table import MAX_ARG_PROBLEMS

__all__ = ["FoldedLayerNorm", "LinearProblem", "GroupedLinear", "fold_layernorm", "grouped_linear", "row_stats_buffer"]

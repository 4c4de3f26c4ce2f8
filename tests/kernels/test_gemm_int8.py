"""Grouped GEMM with weight-only quantized weights (int8; fp8 e4m3 on compute capability >= 8.9): against a
reference from the dequantized weight, every epilogue, split-K, partial sums, folded LayerNorm, quantized and
16-bit problems in one launch, the scale layout, and bad input.

CPU runs go through the Triton interpreter: fp16 / fp32 activations (bf16 tl.dot is wrong there); bf16, fp8 and
real ViT-B/32 shapes in CUDA graphs are GPU tests.
"""
import pytest
import torch
import torch.nn.functional as F

from gemm_cases import EPILOGUES, check_outputs, launch_and_check
from gemm_cases import reference as _ref
from gemm_cases import rel_err as _rel_err

from dualfuse.kernels.gemm import MAX_ARG_PROBLEMS, GroupedLinear, LinearProblem, fold_layernorm
from dualfuse.quantize import dequantize_weight, quantize_weight, resolve_weights

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
TOL = {torch.float16: 1e-2, torch.bfloat16: 1.5e-2, torch.float32: 1e-4}
FP8 = getattr(torch, "float8_e4m3fn", None)




def _dq(p):
    return dequantize_weight(p.weight, p.weight_scale) if p.weight_scale is not None else p.weight


def _make(M, N, K, dtype, *, quant="int8", bias=False, activation=None, residual=None, scale_dtype=torch.float32,
          gen=None):
    """A problem with fresh random inputs and a weight quantized from a random fp32 one (quant None: 16-bit);
    out NaN-poisoned unless it is the residual (in place)."""
    x = torch.randn(M, K, generator=gen).to(DEV, dtype)
    w32 = torch.randn(N, K, generator=gen) / K**0.5
    if quant is None:
        w, s = w32.to(DEV, dtype), None
    else:
        w, s = quantize_weight(w32.to(DEV), quant, scale_dtype)
    b = torch.randn(N, generator=gen).to(DEV, dtype) if bias else None
    res = torch.randn(M, N, generator=gen).to(DEV, dtype) if residual in ("sep", "inplace") else None
    out = res if residual == "inplace" else torch.full((M, N), float("nan"), device=DEV, dtype=dtype)
    return LinearProblem(x, w, out, bias=b, activation=activation, residual=res, weight_scale=s)


def _expected(problems):  # before the run: an in-place residual is the output
    return [_ref(p.x, _dq(p), p.bias, p.activation, p.residual) for p in problems]


def _check(problems, refs, dtype):
    check_outputs(problems, refs, TOL[dtype])


def _run(problems, dtype, **kw):
    return launch_and_check(problems, _expected(problems), TOL[dtype], **kw)


@pytest.fixture
def gen(test_seed):
    return torch.Generator().manual_seed(test_seed ^ 0x1A78)


# ---------------------------------------------------------------------------------------------------
# quantize_weight: the format
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16])
def test_quantize_weight_layout_and_rounding(scale_dtype, gen):
    w = torch.randn(40, 72, generator=gen) * torch.rand(40, 1, generator=gen)
    w[3] = 0.0  # an all-zero row
    q, s = quantize_weight(w, "int8", scale_dtype)
    assert q.dtype == torch.int8 and tuple(q.shape) == (40, 72) and q.is_contiguous()
    assert s.dtype == scale_dtype and tuple(s.shape) == (40,) and s.is_contiguous()
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    amax = w.abs().amax(1)
    nz = amax > 0
    torch.testing.assert_close(s.float()[nz], (amax[nz] / 127).to(scale_dtype).float())
    assert (q[3] == 0).all() and float(s[3]) == 1.0
    # q = round(W / stored scale): within half a step of the weight
    err = (dequantize_weight(q, s) - w).abs()
    assert (err <= s.float()[:, None] * 0.5 * (1 + 1e-3) + 1e-7).all()
    with pytest.raises(ValueError, match="fmt must be 'int8' or 'fp8'"):
        quantize_weight(w, "int4")
    with pytest.raises(ValueError, match="2-D floating-point"):
        quantize_weight(q, "int8")
    with pytest.raises(ValueError, match="scale_dtype"):
        quantize_weight(w, "int8", torch.bfloat16)


def test_weights_option_values():
    assert resolve_weights(None) == "fp16" and resolve_weights("fp16") == "fp16" and resolve_weights("int8") == "int8"
    with pytest.raises(ValueError, match=r"one of \['fp16', 'int8', 'fp8'\]"):
        resolve_weights("int4")
    with pytest.raises(ValueError, match=r"one of \['fp16', 'int8', 'fp8'\]"):
        resolve_weights(torch.int8)


# ---------------------------------------------------------------------------------------------------
# shapes, epilogues, split-K
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("M,N,K", [(1, 40, 72), (3, 96, 48), (50, 72, 96), (77, 40, 96),
                                   pytest.param(197, 48, 64, marks=pytest.mark.slow),
                                   pytest.param(257, 24, 80, marks=pytest.mark.slow)])
def test_single_problem_shapes(M, N, K, dtype, gen):
    _run([_make(M, N, K, dtype, bias=True, gen=gen)], dtype)




# the fast tier: the epilogues where the weight scale meets a bias, an activation and a residual; the rest are slow
@pytest.mark.parametrize("split_k", [1, pytest.param(3, marks=pytest.mark.slow)])
@pytest.mark.parametrize("epilogue", [e if e in ("none", "bias", "all") else pytest.param(e, marks=pytest.mark.slow)
                                      for e in EPILOGUES])
def test_epilogues_two_problems(epilogue, split_k, gen):
    dt = torch.float16
    kw = EPILOGUES[epilogue]
    problems = [_make(50, 72, 96, dt, **kw, gen=gen), _make(77, 40, 96, dt, **kw, gen=gen)]
    g = _run(problems, dt, split_k=split_k)
    assert g.splits == [min(split_k, -(-96 // g.config["BLOCK_K"]))] * 2
    assert g._plan.constexprs["ANY_WQ"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("split_k", [None, pytest.param(2, marks=pytest.mark.slow)])
def test_mixed_int8_and_16bit_problems_one_launch(dtype, split_k, gen):
    """Unequal problems, some int8 (fp32 and fp16 scales may not mix: fp32 here), some 16-bit, one launch."""
    problems = [
        _make(50, 72, 96, dtype, bias=True, activation="quick_gelu", gen=gen),
        _make(77, 40, 72, dtype, quant=None, residual="inplace", gen=gen),
        _make(3, 96, 40, dtype, bias=True, activation="gelu_tanh", residual="sep", gen=gen),
        _make(1, 24, 136, dtype, quant=None, bias=True, gen=gen),
    ]
    _run(problems, dtype, split_k=split_k)


def test_more_problems_than_kernel_arguments(gen):
    """Above MAX_ARG_PROBLEMS the scale addresses come from the device table."""
    dt = torch.float16
    dims = [(3, 40, 40), (50, 72, 96), (1, 16, 72), (77, 40, 40), (20, 96, 40), (9, 24, 72)]
    problems = [_make(m, n, k, dt, quant=None if i % 3 == 2 else "int8", bias=i % 2 == 0,
                      residual=("inplace", None, "sep")[i % 3], gen=gen) for i, (m, n, k) in enumerate(dims)]
    assert len(problems) > MAX_ARG_PROBLEMS
    g = _run(problems, dt, split_k=2)
    assert g._plan.meta_in_args is False


def test_fp16_scales(gen):
    dt = torch.float16
    problems = [_make(50, 72, 96, dt, bias=True, scale_dtype=torch.float16, gen=gen),
                _make(77, 40, 48, dt, residual="inplace", scale_dtype=torch.float16, gen=gen)]
    _run(problems, dt, split_k=2)


@pytest.mark.parametrize("split_k", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_repeated_calls_identical(split_k, gen):
    dt = torch.float16
    problems = [_make(50, 72, 96, dt, bias=True, activation="gelu", residual="inplace", gen=gen),
                _make(77, 40, 96, dt, quant=None, bias=True, gen=gen)]
    h0 = problems[0].out.clone()
    refs = _expected(problems)
    g = GroupedLinear(problems, split_k=split_k)
    first = None
    for _ in range(2):
        problems[0].out.copy_(h0)
        problems[1].out.fill_(float("nan"))
        g()
        _check(problems, refs, dt)
        outs = [p.out.clone() for p in problems]
        first = first or outs
        assert all(torch.equal(a, b) for a, b in zip(first, outs))
    assert int(g._plan.cnt.abs().sum()) == 0


def test_skinny_tiles_unaligned_k(gen):
    """Narrow N tiles, BLOCK_K > K, K not a multiple of 16 (no 16-byte hints for the int8 rows)."""
    dt = torch.float16
    problems = [_make(50, 72, 40, dt, bias=True, activation="quick_gelu", residual="inplace", gen=gen),
                _make(77, 40, 104, dt, bias=True, residual="sep", gen=gen)]
    g = _run(problems, dt, split_k=2, config={"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 64})
    assert g._plan.constexprs["EVEN_K"] is False and g._plan.constexprs["ALIGNED"] is False


def test_tma_not_used_with_quantized_weights(gen):
    dt = torch.float16
    g = _run([_make(50, 64, 96, dt, bias=True, gen=gen), _make(7, 32, 64, dt, quant=None, gen=gen)], dt,
             config={"tma": True})
    assert not g.uses_tma
    assert GroupedLinear([_make(7, 32, 64, dt, quant=None, gen=gen)], config={"tma": True}).uses_tma


def test_widen_bits_is_exact_for_every_int8_value():
    """The integer widening (config widen "bits", the default for int8 weights with fp16 activations) maps each of
    the 256 int8 values to itself: x = identity, scale 1, so out = w.T exactly."""
    q = (torch.arange(256) - 128).to(torch.int8).view(16, 16)  # every int8 value once, [N=16, K=16]
    x = torch.eye(16, dtype=torch.float16, device=DEV)
    for widen in ("bits", "convert"):
        out = torch.full((16, 16), float("nan"), dtype=torch.float16, device=DEV)
        p = LinearProblem(x, q.to(DEV), out, weight_scale=torch.ones(16, device=DEV))
        g = GroupedLinear([p], config={"widen": widen})
        assert g._plan.constexprs["WIDEN_BITS"] == (widen == "bits")
        g()
        assert torch.equal(out.cpu(), q.T.to(torch.float16)), widen


@pytest.mark.parametrize("split_k", [1, pytest.param(2, marks=pytest.mark.slow)])
@pytest.mark.parametrize("shapes,block", [
    ([(1, 40, 72), (77, 24, 96)], {}),  # the heuristic's tiles, K unaligned to BLOCK_K
    pytest.param([(50, 72, 96), (3, 40, 40)], {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32},  # M over several row tiles
                 marks=pytest.mark.slow),
    ([(17, 96, 64)], {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 16}),
])
def test_widen_bits_equals_convert(shapes, block, split_k, gen):
    """Both widenings give the dot the same fp16 operands, so the same bits, with the epilogue, split-K and an
    in-place residual; both match the dequantized reference."""
    dt = torch.float16
    problems = [_make(m, n, k, dt, bias=True, activation="quick_gelu" if i == 0 else None,
                      residual="inplace" if i == 1 else None, gen=gen) for i, (m, n, k) in enumerate(shapes)]
    start = [p.out.clone() for p in problems]
    outs = {}
    for widen in ("bits", "convert"):
        for p, o in zip(problems, start):
            p.out.copy_(o)
        g = _run(problems, dt, split_k=split_k, config={"widen": widen, **block})
        assert g._plan.constexprs["WIDEN_BITS"] == (widen == "bits")
        outs[widen] = [p.out.clone() for p in problems]
    assert all(torch.equal(a, b) for a, b in zip(outs["bits"], outs["convert"]))


def test_widen_bits_only_for_int8_weights_with_fp16_activations(gen):
    mixed = [_make(50, 64, 96, torch.float16, bias=True, gen=gen), _make(7, 32, 64, torch.float16, quant=None, gen=gen)]
    assert _run(mixed, torch.float16)._plan.constexprs["WIDEN_BITS"]  # the int8 problem's loop; fp16's is unchanged
    fp32 = [_make(9, 32, 48, torch.float32, gen=gen)]
    assert not _run(fp32, torch.float32)._plan.constexprs["WIDEN_BITS"]
    with pytest.raises(ValueError, match="config widen must be 'bits' or 'convert'"):
        GroupedLinear(mixed, config={"widen": "fast"})


# ---------------------------------------------------------------------------------------------------
# deferred split-K (partial sums) and the folded LayerNorm
# ---------------------------------------------------------------------------------------------------
def test_partial_sums_are_scaled(gen):
    """Each slice holds scaled partial sums: they add up to x @ dequant(W).T, next to an fp16-weight problem."""
    dt = torch.float16
    cfg = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}
    parts = []
    for (M, N, K, s), quant in zip([(50, 72, 128, 4), (77, 40, 96, 3), (1, 24, 64, 1)], ("int8", None, "int8")):
        p = _make(M, N, K, dt, quant=quant, gen=gen)
        out = torch.full((GroupedLinear.partial_slices(K, s, 32), M, N), float("nan"), device=DEV)
        parts.append(LinearProblem(p.x, p.weight, out, partial_sums=True, weight_scale=p.weight_scale))
    GroupedLinear(parts, config=cfg)()
    for i, p in enumerate(parts):
        assert not torch.isnan(p.out).any(), f"partial problem {i}: a slice not fully written"
        assert _rel_err(p.out.double().sum(0), p.x.double() @ _dq(p).double().T) <= TOL[dt]


@pytest.mark.slow
def test_partial_sums_into_layernorm(gen):
    """int8 GEMM (partial sums) -> LayerNorm(add=...) == int8 GEMM (bias, residual in place) -> LayerNorm."""
    from dualfuse.kernels.layernorm import GroupedLayerNorm, LayerNormProblem

    dt = torch.float16
    M, N, K = 50, 72, 192
    p = _make(M, N, K, dt, bias=True, gen=gen)
    h0 = torch.randn(M, N, generator=gen).to(DEV)
    ln_w, ln_b = torch.randn(N, generator=gen).to(DEV, dt), torch.randn(N, generator=gen).to(DEV, dt)
    cfg = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}
    h_ref, y_ref = h0.clone(), torch.empty(M, N, device=DEV, dtype=dt)
    GroupedLinear([LinearProblem(p.x, p.weight, h_ref, bias=p.bias, residual=h_ref, weight_scale=p.weight_scale)],
                  config=cfg, split_k=3)()
    GroupedLayerNorm([LayerNormProblem(h_ref, ln_w, ln_b, y_ref, 1e-5)])()
    h, y = h0.clone(), torch.full((M, N), float("nan"), device=DEV, dtype=dt)
    parts = torch.full((3, M, N), float("nan"), device=DEV)
    GroupedLinear([LinearProblem(p.x, p.weight, parts, partial_sums=True, weight_scale=p.weight_scale)], config=cfg)()
    GroupedLayerNorm([LayerNormProblem(h, ln_w, ln_b, y, 1e-5, add=parts, add_bias=p.bias)])()
    torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y.float(), y_ref.float(), atol=2e-3, rtol=1e-3)
    ref = h0.double() + _ref(p.x, _dq(p), p.bias)
    assert _rel_err(h, ref) <= 1e-3


def _make_ln_q(M, N, K, dtype, *, activation=None, residual=None, gen=None):
    """LN -> int8 linear: folded in fp32 (W' = W * gamma), then W' quantized; the column sums are those of the
    dequantized W'. Reference: LN(x) @ dequant(W').T / gamma-less form, i.e. the unfolded LN with W = W' / gamma."""
    x = (torch.randn(M, K, generator=gen) + 0.5).to(DEV, dtype)
    w = (torch.randn(N, K, generator=gen) / K**0.5).to(DEV)
    b = torch.randn(N, generator=gen).to(DEV)
    gam = (1 + 0.5 * torch.randn(K, generator=gen)).to(DEV)
    bet = (0.5 * torch.randn(K, generator=gen)).to(DEV)
    wf, bf, norm = fold_layernorm(w, b, gam, bet, 1e-5, dtype=torch.float32)
    q, s = quantize_weight(wf, "int8")
    norm.colsum = dequantize_weight(q, s).sum(1).contiguous()
    res = torch.randn(M, N, generator=gen).to(DEV, dtype) if residual else None
    out = res if residual == "inplace" else torch.full((M, N), float("nan"), device=DEV, dtype=dtype)
    # what the kernel computes: rstd * (x @ W'q.T - mean * colsum) + b' == LN0(x) @ W'q.T + b' (LN0: no affine)
    ln0 = F.layer_norm(x.double(), (K,), eps=1e-5)
    ref = _ref(ln0, dequantize_weight(q, s), bf.to(dtype), activation, res)
    return LinearProblem(x, q, out, bias=bf.to(dtype), activation=activation, residual=res, norm=norm,
                         weight_scale=s), ref


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.float32, marks=pytest.mark.slow)])
def test_folded_layernorm_int8(dtype, gen):
    made = [_make_ln_q(1, 40, 48, dtype, gen=gen), _make_ln_q(77, 72, 136, dtype, activation="quick_gelu", gen=gen),
            _make_ln_q(50, 96, 64, dtype, residual="inplace", gen=gen)]
    plain = _make(50, 40, 72, dtype, quant=None, bias=True, gen=gen)
    problems = [p for p, _ in made] + [plain]
    refs = [r for _, r in made] + _expected([plain])
    GroupedLinear(problems)()
    _check(problems, refs, dtype)


def test_folded_layernorm_int8_close_to_unquantized(gen):
    """Quantizing after the fold stays close to the fp32 LN -> linear (the int8 error, nothing more)."""
    M, N, K = 50, 96, 136
    x = torch.randn(M, K, generator=gen).to(DEV)
    w = (torch.randn(N, K, generator=gen) / K**0.5).to(DEV)
    gam = (1 + 0.5 * torch.randn(K, generator=gen)).to(DEV)
    bet = (0.5 * torch.randn(K, generator=gen)).to(DEV)
    wf, bf, norm = fold_layernorm(w, None, gam, bet, 1e-5, dtype=torch.float32)
    q, s = quantize_weight(wf, "int8")
    norm.colsum = dequantize_weight(q, s).sum(1).contiguous()
    out = torch.full((M, N), float("nan"), device=DEV)
    GroupedLinear([LinearProblem(x, q, out, bias=bf, norm=norm, weight_scale=s)])()
    ref = F.linear(F.layer_norm(x, (K,), gam, bet, 1e-5), w)
    cos = F.cosine_similarity(out.double(), ref.double(), dim=1)
    assert cos.min() >= 0.999 and _rel_err(out, ref.double()) <= 2e-2, (cos.min(), _rel_err(out, ref.double()))


# ---------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------
def test_scale_errors(gen):
    dt = torch.float16
    p = _make(4, 40, 72, dt, gen=gen)
    q, s = p.weight, p.weight_scale
    w16 = torch.randn(40, 72, generator=gen).to(DEV, dt)

    def lp(w, scale, **kw):
        return GroupedLinear([LinearProblem(p.x, w, p.out, weight_scale=scale, **kw)])

    cases = [
        (lambda: lp(q, None), "needs its per-output-channel weight_scale"),
        (lambda: lp(q, s[:39].contiguous()), "weight_scale must be a contiguous [N=40]"),
        (lambda: lp(q, s.view(40, 1)), "weight_scale must be a contiguous [N=40]"),
        (lambda: lp(q, torch.stack([s, s], 1)[:, 0]), "weight_scale must be a contiguous [N=40]"),
        (lambda: lp(q, s.to(torch.bfloat16)), "weight_scale dtype must be fp32 or fp16"),
        (lambda: lp(q, s.double()), "weight_scale dtype must be fp32 or fp16"),
        (lambda: lp(q, "s"), "weight_scale must be a contiguous [N=40]"),
        (lambda: lp(w16, s), "weight_scale is only for quantized weights"),
        (lambda: lp(q.to(torch.int16), s), "weight_scale is only for quantized weights"),
        (lambda: lp(q.to(torch.int16), None), "weight dtype must equal x dtype"),
        (lambda: lp(torch.empty(40, 72, device="meta", dtype=torch.int8), s), "must be on"),
        (lambda: lp(q, torch.empty(40, device="meta")), "must be on"),
    ]
    p2 = _make(4, 40, 72, dt, scale_dtype=torch.float16, gen=gen)
    cases.append((lambda: GroupedLinear([p, p2]), "share one weight dtype and one scale dtype"))
    for fn, msg in cases:
        with pytest.raises(ValueError) as ei:
            fn()
        assert msg in str(ei.value), f"expected {msg!r} in {str(ei.value)!r}"


@pytest.mark.skipif(FP8 is None, reason="torch without float8_e4m3fn")
def test_fp8_refused_without_the_capability(gen):
    """fp8 e4m3 weights need compute capability >= 8.9: refused on the CPU interpreter and on sm_80 / sm_87."""
    if HAS_CUDA and torch.cuda.get_device_capability() >= (8, 9):
        pytest.skip("this GPU has fp8")
    dt = torch.float16
    x = torch.randn(4, 32, generator=gen).to(DEV, dt)
    q, s = quantize_weight(torch.randn(16, 32, generator=gen), "fp8")
    assert q.dtype == FP8
    with pytest.raises(ValueError, match=r"compute capability >= 8\.9"):
        GroupedLinear([LinearProblem(x, q.to(DEV), torch.empty(4, 16, device=DEV, dtype=dt), weight_scale=s.to(DEV))])
    with pytest.raises(ValueError, match=r"weights='fp8': .*compute capability >= 8\.9"):
        resolve_weights("fp8", DEV)


# ---------------------------------------------------------------------------------------------------
# GPU: bf16, fp8, real shapes, CUDA graphs
# ---------------------------------------------------------------------------------------------------
REAL = [  # (M, N, K) of one ViT-B/32 layer at batch 1: vision then text
    ((50, 2304, 768), (77, 1536, 512)),  # QKV
    ((50, 768, 768), (77, 512, 512)),  # out-proj (+ residual)
    ((50, 3072, 768), (77, 2048, 512)),  # FC1 (+ activation)
    ((50, 768, 3072), (77, 512, 2048)),  # FC2 (+ residual)
]
STEP_KW = [dict(bias=True), dict(bias=True, residual="inplace"), dict(bias=True, activation="quick_gelu"),
           dict(bias=True, residual="inplace")]


def _fmts():
    out = ["int8"]
    if HAS_CUDA and FP8 is not None and torch.cuda.get_device_capability() >= (8, 9):
        out.append("fp8")
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("step", range(4))
def test_gpu_real_shapes_graph(dtype, step, gen):
    """Each step of a ViT-B/32 layer, batch 1 (default skinny configs: split-K, PDL, prefetch) and batch 16 and
    32, int8 (and fp8 where the card has it), eager and replayed in a CUDA graph."""
    kw = STEP_KW[step]
    for fmt in _fmts():
        for dims in (REAL[step], [(16, n, k) for _, n, k in REAL[step]], [(32 * m, n, k) for m, n, k in REAL[step]]):
            problems = [_make(*d, dtype, quant=fmt, **kw, gen=gen) for d in dims]
            res0 = [p.out.clone() for p in problems]
            refs = _expected(problems)
            g = GroupedLinear(problems)
            g()
            torch.cuda.synchronize()
            _check(problems, refs, dtype)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                g()
            for _ in range(2):
                for p, r0 in zip(problems, res0):
                    p.out.copy_(r0) if "residual" in kw else p.out.fill_(float("nan"))
                graph.replay()
                torch.cuda.synchronize()
                _check(problems, refs, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_mixed_and_partial_and_folded(dtype, gen):
    """Awkward shapes on the GPU: int8 and 16-bit problems in one launch with split-K; partial sums; a folded LN."""
    for split_k in (None, 1, 4):
        problems = [_make(197, 72, 136, dtype, bias=True, activation="gelu", gen=gen),
                    _make(1, 40, 520, dtype, quant=None, residual="inplace", gen=gen),
                    _make(77, 96, 768, dtype, bias=True, residual="sep", gen=gen)]
        _run(problems, dtype, split_k=split_k)
    made = [_make_ln_q(50, 2304, 768, dtype, gen=gen), _make_ln_q(77, 2048, 512, dtype, activation="quick_gelu",
                                                                   gen=gen)]
    GroupedLinear([p for p, _ in made])()
    _check([p for p, _ in made], [r for _, r in made], dtype)
    p = _make(50, 768, 3072, dtype, gen=gen)
    parts = torch.full((4, 50, 768), float("nan"), device=DEV)
    GroupedLinear([LinearProblem(p.x, p.weight, parts, partial_sums=True, weight_scale=p.weight_scale)],
                  split_k=4)()
    assert not torch.isnan(parts).any()
    assert _rel_err(parts.double().sum(0), p.x.double() @ _dq(p).double().T) <= TOL[dtype]


def test_tall_tile_int8(gen):
    """The byte-bound regime's tall tile (BLOCK_M 256) with int8 weights: 196 rows and 77 in one launch."""
    dt = torch.float16
    problems = [_make(196, 64, 96, dt, bias=True, activation="gelu", gen=gen), _make(77, 32, 64, dt, gen=gen)]
    g = _run(problems, dt, config={"BLOCK_M": 256, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3})
    assert g.config["BLOCK_M"] == 256 and g._plan.constexprs["ANY_WQ"]

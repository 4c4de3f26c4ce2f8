"""Grouped GEMM (dualfuse.kernels.gemm): correctness of every epilogue, split-K, replay safety, bad input.

CPU runs go through the Triton interpreter (conftest sets TRITON_INTERPRET=1), so shapes stay small and
dtypes are fp16/fp32 (bf16 tl.dot is garbage under the interpreter); bf16 and real shapes are GPU tests.
"""
import pytest
import torch
import torch.nn.functional as F

from gemm_cases import EPILOGUES, check_outputs, launch_and_check
from gemm_cases import reference as _ref
from gemm_cases import rel_err as _rel_err

from dualfuse.kernels.gemm import MAX_ARG_PROBLEMS, GroupedLinear, LinearProblem, choose_splits, grouped_linear

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
TOL = {torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float32: 1e-4}
ACTS = [None, "quick_gelu", "gelu", "gelu_tanh"]




def _make(M, N, K, dtype, *, bias=False, activation=None, residual=None, device=DEV, gen=None):
    """A problem with fresh random inputs; out NaN-poisoned unless it is the residual (in-place)."""
    x = torch.randn(M, K, generator=gen).to(device=device, dtype=dtype)
    w = (torch.randn(N, K, generator=gen) / K**0.5).to(device=device, dtype=dtype)
    b = torch.randn(N, generator=gen).to(device=device, dtype=dtype) if bias else None
    res = None
    if residual in ("sep", "inplace"):
        res = torch.randn(M, N, generator=gen).to(device=device, dtype=dtype)
    out = res if residual == "inplace" else torch.full((M, N), float("nan"), device=device, dtype=dtype)
    return LinearProblem(x, w, out, bias=b, activation=activation, residual=res)


def _expected(problems):
    # computed before the run: with an in-place residual, out holds the residual only until then
    return [_ref(p.x, p.weight, p.bias, p.activation, p.residual) for p in problems]


def _check(problems, refs, dtype):
    check_outputs(problems, refs, TOL[dtype])


def _expected_splits(problems, g, split_k):
    """A forced split_k is clamped to the number of BLOCK_K steps of each problem's K."""
    return [min(split_k, -(-p.x.shape[1] // g.config["BLOCK_K"])) for p in problems]


def _run(problems, dtype, **kw):
    return launch_and_check(problems, _expected(problems), TOL[dtype], **kw)


@pytest.fixture
def gen(test_seed):
    # the test's seed (tests/conftest.py: its own per test, printed on failure), on a stream apart from the
    # global generator's: draws from both never repeat each other's values
    return torch.Generator().manual_seed(test_seed ^ 0x5EED_5EED)


# ---------------------------------------------------------------------------------------------------
# shapes and dtypes
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("M,N,K", [(1, 40, 72), (3, 96, 40), (50, 72, 96), (77, 40, 96),
                                   pytest.param(197, 48, 64, marks=pytest.mark.slow)])
def test_single_problem_shapes(M, N, K, dtype, gen):
    _run([_make(M, N, K, dtype, bias=True, gen=gen)], dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("split_k", [None, 2, pytest.param(3, marks=pytest.mark.slow)])
def test_three_unequal_problems(dtype, split_k, gen):
    problems = [
        _make(50, 72, 96, dtype, bias=True, activation="quick_gelu", gen=gen),
        _make(77, 40, 72, dtype, residual="inplace", gen=gen),
        _make(3, 96, 40, dtype, bias=True, activation="gelu_tanh", residual="sep", gen=gen),
    ]
    g = _run(problems, dtype, split_k=split_k)
    if split_k:
        assert g.splits == _expected_splits(problems, g, split_k)


@pytest.mark.slow
def test_large_m_two_problems(gen):
    dt = torch.float16
    _run([_make(257, 40, 40, dt, bias=True, activation="gelu", gen=gen),
          _make(197, 48, 72, dt, residual="inplace", gen=gen)], dt, split_k=2)


# ---------------------------------------------------------------------------------------------------
# epilogues, split-K on and off
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split_k", [1, pytest.param(3, marks=pytest.mark.slow)])
@pytest.mark.parametrize("epilogue", list(EPILOGUES))
def test_epilogues_two_problems(epilogue, split_k, gen):
    dt = torch.float16
    kw = EPILOGUES[epilogue]
    problems = [_make(50, 72, 96, dt, **kw, gen=gen), _make(77, 40, 96, dt, **kw, gen=gen)]
    g = _run(problems, dt, split_k=split_k)
    assert g.splits == _expected_splits(problems, g, split_k)


def test_mixed_epilogues_per_problem(gen):
    """Each problem has its own bias/activation/residual choice in the same launch."""
    dt = torch.float16
    problems = [_make(3, 40, 40, dt, activation=a, bias=i % 2 == 0, residual=("sep", None, "inplace", None)[i],
                      gen=gen) for i, a in enumerate(ACTS)]
    _run(problems, dt, split_k=2)


@pytest.mark.slow
def test_auto_split_k_heuristic(gen):
    """With many SMs and few tiles the heuristic splits K, more for the problem with the larger K."""
    dt = torch.float16
    problems = [_make(50, 64, 512, dt, bias=True, residual="inplace", gen=gen),
                _make(77, 32, 128, dt, bias=True, activation="gelu", gen=gen)]
    g = _run(problems, dt, config={"num_sms": 64, "min_k_iters": 1})
    assert g.splits[0] > g.splits[1] > 1, g.splits


def test_split_k_per_problem_list_and_clamp(gen):
    dt = torch.float32
    problems = [_make(50, 40, 72, dt, residual="inplace", gen=gen), _make(1, 72, 40, dt, bias=True, gen=gen)]
    g = _run(problems, dt, split_k=[3, 50])  # 50 splits > K iterations: clamped
    assert g.splits == [min(3, -(-72 // g.config["BLOCK_K"])), -(-40 // g.config["BLOCK_K"])]


# ---------------------------------------------------------------------------------------------------
# replay safety: same answer every call (split-K counters reset themselves; in-place residual)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("split_k", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_repeated_calls_identical(split_k, gen):
    dt = torch.float16
    problems = [_make(50, 72, 96, dt, bias=True, activation="quick_gelu", residual="inplace", gen=gen),
                _make(77, 40, 96, dt, bias=True, residual="sep", gen=gen)]
    h0 = problems[0].out.clone()
    refs = _expected(problems)
    g = GroupedLinear(problems, split_k=split_k)
    results = []
    for _ in range(3):
        problems[0].out.copy_(h0)  # the residual buffer is the output: restore it, as a model step would
        problems[1].out.fill_(float("nan"))
        g()
        _check(problems, refs, dt)
        results.append([p.out.clone() for p in problems])
        assert int(g._plan.cnt.abs().sum()) == 0, "split-K tile counters must be back to 0 after a launch"
    for later in results[1:]:
        for a, b in zip(results[0], later):
            assert torch.equal(a, b), "repeated call gave a different result"


@pytest.mark.parametrize("early", [False, True])
def test_skinny_tiles_and_early_epilogue(early, gen):
    """Narrow N tiles, BLOCK_K > K, several M tiles, bias/residual loaded before or after the K loop."""
    dt = torch.float16
    problems = [_make(50, 72, 40, dt, bias=True, activation="quick_gelu", residual="inplace", gen=gen),
                _make(77, 40, 96, dt, bias=True, residual="sep", gen=gen)]
    cfg = {"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 64, "early_epilogue": early}
    g = _run(problems, dt, split_k=2, config=cfg)
    assert g._plan.constexprs["EARLY_EPI"] is early and g._plan.constexprs["EVEN_K"] is False


def test_more_problems_than_kernel_arguments(gen):
    """Above MAX_ARG_PROBLEMS problems the per-problem fields come from the device table instead."""
    dt = torch.float16
    dims = [(3, 40, 40), (50, 72, 96), (1, 16, 72), (77, 40, 40), (20, 96, 40), (9, 24, 72)]
    acts = ACTS + ACTS
    problems = [_make(m, n, k, dt, bias=i % 2 == 0, activation=acts[i], residual=("inplace", None, "sep")[i % 3],
                      gen=gen) for i, (m, n, k) in enumerate(dims)]
    assert len(problems) > MAX_ARG_PROBLEMS
    g = _run(problems, dt, split_k=2)
    assert g._plan.meta_in_args is False


def test_table_columns_are_the_kernel_arguments():
    """table.ARG_NAMES names the kernel's per-problem arguments in column order: one definition of the fields for
    the host (pack_row, kernel_args) and both kernel paths (arguments, table rows)."""
    import inspect

    from dualfuse.kernels.gemm import kernel, table

    params = list(inspect.signature(kernel.grouped_linear_kernel.fn).parameters)
    first = params.index("xa0")
    want = [f"{a}{i}" for i in range(table.MAX_ARG_PROBLEMS) for a in table.ARG_NAMES]
    assert params[first:first + len(want)] == want
    assert len(table.ARG_NAMES) == table.NUM_COLS.value


def test_split_heuristic_policies():
    """Work-proportional splits, capped by max_split; programs_per_sm=0 or enough tiles: no split."""
    dims = [(50, 768, 3072), (77, 512, 2048)]  # ViT-B/32 FC2 at batch 1
    cfg = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, num_sms=132, programs_per_sm=1, min_k_iters=2, max_split=8)
    s = choose_splits(dims, cfg, torch.device("cpu"), None)
    assert s[0] > s[1] > 1 and max(s) <= 8, s
    tiles = [1 * 12, 1 * 8]
    assert 0.7 * 132 <= sum(t * k for t, k in zip(tiles, s)) <= 1.3 * 132, s
    assert choose_splits(dims, {**cfg, "max_split": 3}, torch.device("cpu"), None) == [3, 3]
    assert choose_splits(dims, {**cfg, "programs_per_sm": 0}, torch.device("cpu"), None) == [1, 1]
    assert choose_splits(dims, {**cfg, "num_sms": 16}, torch.device("cpu"), None) == [1, 1]


def test_inplace_accumulates_like_hidden_update(gen):
    """Two calls with out = residual = hidden: hidden + 2 * proj(x)."""
    dt = torch.float32
    p = _make(77, 40, 72, dt, residual="inplace", gen=gen)
    h0 = p.out.clone()
    g = GroupedLinear([p], split_k=2)
    g()
    g()
    ref = h0.double() + 2 * (p.x.double() @ p.weight.double().T)
    assert _rel_err(p.out, ref) <= TOL[dt]


# ---------------------------------------------------------------------------------------------------
# layouts: strided views, misaligned pointers, output dtype
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("split_k", [1, 2])
def test_strided_views_write_only_their_window(split_k, gen):
    dt = torch.float16
    M, N, K = 50, 40, 72
    xbuf = torch.randn(M, K + 24, generator=gen).to(DEV, dt)
    x = xbuf[:, 8:8 + K]  # row stride K + 24 (> K), 16-byte aligned start
    w = (torch.randn(N, K, generator=gen) / K**0.5).to(DEV, dt)
    obuf = torch.full((M, N + 16), float("nan"), device=DEV, dtype=dt)
    out = obuf[:, :N]  # row stride N + 16
    rbuf = torch.randn(M, 2 * N, generator=gen).to(DEV, dt)
    res = rbuf[:, N:]
    ref = _ref(x, w, None, "gelu", res)
    GroupedLinear([LinearProblem(x, w, out, activation="gelu", residual=res)], split_k=split_k)()
    _check([LinearProblem(x, w, out)], [ref], dt)
    assert torch.isnan(obuf[:, N:]).all(), "kernel wrote outside the out view"


def test_misaligned_pointers(gen):
    """Views starting 1 element in (not 16-byte aligned) take the unhinted path and stay correct."""
    dt = torch.float16
    M, N, K = 77, 40, 40
    x = torch.randn(M, K + 1, generator=gen).to(DEV, dt)[:, 1:]
    w = (torch.randn(N, K, generator=gen) / K**0.5).to(DEV, dt)
    b = torch.randn(N + 1, generator=gen).to(DEV, dt)[1:]
    out = torch.full((M, N + 1), float("nan"), device=DEV, dtype=dt)[:, 1:]
    p = LinearProblem(x, w, out, bias=b, activation="gelu_tanh")
    g = _run([p], dt, split_k=2)
    assert g._plan.constexprs["ALIGNED"] is False


def test_grouped_linear_convenience_and_out_dtype(gen):
    dt = torch.float16
    xs = [torch.randn(3, 40, generator=gen).to(DEV, dt), torch.randn(50, 72, generator=gen).to(DEV, dt)]
    ws = [(torch.randn(72, 40, generator=gen) / 7).to(DEV, dt), (torch.randn(96, 72, generator=gen) / 8).to(DEV, dt)]
    bs = [torch.randn(72, generator=gen).to(DEV, dt), None]
    rs = [None, torch.randn(50, 96, generator=gen).to(DEV, torch.float32)]
    outs = grouped_linear(xs, ws, bs, ["gelu", None], rs, out_dtype=torch.float32)
    for out, x, w, b, a, r in zip(outs, xs, ws, bs, ["gelu", None], rs):
        assert out.dtype == torch.float32 and not torch.isnan(out).any()
        assert _rel_err(out, _ref(x, w, b, a, r)) <= 1e-2
    (out,) = grouped_linear([xs[0]], [ws[0]], activations="quick_gelu")
    assert out.dtype == dt and _rel_err(out, _ref(xs[0], ws[0], activation="quick_gelu")) <= 1e-2


def test_four_problems_one_launch(gen):
    dt = torch.float32
    problems = [_make(m, n, k, dt, bias=True, activation=a, gen=gen)
                for (m, n, k), a in zip([(1, 40, 40), (3, 72, 40), (50, 40, 96), (77, 96, 72)], ACTS)]
    _run(problems, dt)


# ---------------------------------------------------------------------------------------------------
# bad input -> ValueError that names what was expected and what came
# ---------------------------------------------------------------------------------------------------
def _p(M=4, N=40, K=72, dt=torch.float16, **kw):
    x = torch.randn(M, K).to(DEV, dt)
    w = torch.randn(N, K).to(DEV, dt)
    out = torch.empty(M, N, device=DEV, dtype=dt)
    return LinearProblem(x, w, out, **kw)


def test_errors():
    p = _p()
    cases = [
        (lambda: GroupedLinear([]), "non-empty"),
        (lambda: GroupedLinear(p), "non-empty list"),
        (lambda: GroupedLinear([p, "x"]), "LinearProblem"),
        (lambda: GroupedLinear([LinearProblem(p.x, p.weight[:, :40].contiguous(), p.out)]), "weight must be [N, K=72]"),
        (lambda: GroupedLinear([LinearProblem(p.x, p.weight, p.out[:, :8])]), "out must be [M=4, N=40]"),
        (lambda: GroupedLinear([LinearProblem(p.x[0], p.weight, p.out)]), "x must be 2-D"),
        (lambda: GroupedLinear([LinearProblem(torch.randn(72, 4).to(DEV, torch.float16).t(), p.weight, p.out)]),
         "contiguous last dim"),
        (lambda: GroupedLinear([LinearProblem(p.x, torch.randn(72, 40).to(DEV, torch.float16).t(), p.out)]),
         "weight must be contiguous"),
        (lambda: GroupedLinear([LinearProblem(p.x, p.weight.float(), p.out)]), "weight dtype must equal x dtype"),
        (lambda: GroupedLinear([p, _p(dt=torch.float32)]), "share one input dtype"),
        (lambda: GroupedLinear([LinearProblem(p.x.double(), p.weight.double(), p.out)]), "fp16/bf16/fp32"),
        (lambda: GroupedLinear([_p(activation="relu")]), "activation must be None or one of"),
        (lambda: GroupedLinear([_p(bias=torch.randn(41).to(DEV, torch.float16))]), "bias must be a contiguous [N=40]"),
        (lambda: GroupedLinear([_p(bias=torch.randn(40).to(DEV))]), "bias dtype"),
        (lambda: GroupedLinear([_p(residual=torch.randn(4, 41).to(DEV, torch.float16))]), "residual must be [M=4, N=40]"),
        (lambda: GroupedLinear([LinearProblem(p.x, p.weight, p.out, residual=p.out.float())]), "residual dtype"),
        (lambda: GroupedLinear([p], split_k=0), "split_k"),
        (lambda: GroupedLinear([p, _p()], split_k=[2]), "split_k"),
        (lambda: GroupedLinear([p], config={"BLOCK_Q": 3}), "config must be a dict"),
        (lambda: GroupedLinear([p], config={"BLOCK_N": 48}), "power of two"),
        (lambda: GroupedLinear([p], config={"prefetch": -2}), "prefetch"),
        (lambda: GroupedLinear([p], config={"prefetch": True}), "prefetch"),
        (lambda: grouped_linear([p.x], [p.weight, p.weight]), "equal lengths"),
        (lambda: grouped_linear([p.x], [p.weight], out_dtype=torch.int8), "out_dtype"),
    ]
    # a residual that overlaps out but is not the same view would race between tiles
    buf = torch.empty(5, 40, device=DEV, dtype=torch.float16)
    cases.append((lambda: GroupedLinear([LinearProblem(p.x, p.weight, buf[:4], residual=buf[1:])]),
                  "overlaps out"))
    # devices: meta tensors are never touched by validation beyond .device
    meta_w = torch.empty(40, 72, device="meta", dtype=torch.float16)
    cases.append((lambda: GroupedLinear([LinearProblem(p.x, meta_w, p.out)]), "must be on"))
    for fn, msg in cases:
        with pytest.raises(ValueError) as ei:
            fn()
        assert msg in str(ei.value), f"expected {msg!r} in {str(ei.value)!r}"


# ---------------------------------------------------------------------------------------------------
# GPU: bf16, real shapes, CUDA graphs
# ---------------------------------------------------------------------------------------------------
REAL = [  # (M, N, K) pairs of one ViT-B/32 layer at batch 1: vision then text
    ((50, 2304, 768), (77, 1536, 512)),  # QKV
    ((50, 768, 768), (77, 512, 512)),  # out-proj (+ residual)
    ((50, 3072, 768), (77, 2048, 512)),  # FC1 (+ activation)
    ((50, 768, 3072), (77, 512, 2048)),  # FC2 (+ residual)
]


REAL_L14 = [  # ViT-L/14 at batch 1: 257 vision rows (2 x 128 + 1), 77 text rows
    ((257, 3072, 1024), (77, 2304, 768)),
    ((257, 1024, 1024), (77, 768, 768)),
    ((257, 4096, 1024), (77, 3072, 768)),
    ((257, 1024, 4096), (77, 768, 3072)),
]
STEP_KW = [dict(bias=True), dict(bias=True, residual="inplace"), dict(bias=True, activation="quick_gelu"),
           dict(bias=True, residual="inplace")]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("step", range(4))
def test_gpu_real_shapes(dtype, step, gen):
    kw = STEP_KW[step]
    problems = [_make(*dims, dtype, **kw, gen=gen) for dims in REAL[step]]
    _run(problems, dtype)
    problems = [_make(*dims, dtype, **kw, gen=gen) for dims in REAL_L14[step]]
    _run(problems, dtype)
    # batch 32 (no split-K, big tiles)
    problems = [_make(32 * m, n, k, dtype, **kw, gen=gen) for m, n, k in REAL[step]]
    _run(problems, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("epilogue", list(EPILOGUES))
def test_gpu_epilogues_awkward(dtype, epilogue, gen):
    kw = EPILOGUES[epilogue]
    for split_k in (None, 1, 4):
        problems = [_make(197, 72, 136, dtype, **kw, gen=gen), _make(1, 40, 520, dtype, **kw, gen=gen),
                    _make(77, 96, 768, dtype, **kw, gen=gen)]
        _run(problems, dtype, split_k=split_k)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_cuda_graph_replay(dtype, gen):
    """Capture once, replay many times: same bits every replay (split-K counters, in-place residual)."""
    problems = [_make(50, 768, 3072, dtype, bias=True, residual="inplace", gen=gen),
                _make(77, 512, 2048, dtype, bias=True, residual="inplace", gen=gen)]
    h0 = [p.out.clone() for p in problems]
    refs = _expected(problems)
    g = GroupedLinear(problems)
    assert max(g.splits) > 1, "batch-1 FC2 is expected to use split-K"
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # no warm-up call needed: __init__ compiled the kernel
        g()
    first = None
    for _ in range(5):
        for p, h in zip(problems, h0):
            p.out.copy_(h)
        graph.replay()
        torch.cuda.synchronize()
        _check(problems, refs, dtype)
        outs = [p.out.clone() for p in problems]
        if first is None:
            first = outs
        for a, b in zip(first, outs):
            assert torch.equal(a, b)
    # hidden += proj replayed twice without restoring: accumulates like the model would
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    for p, h in zip(problems, h0):
        delta = _ref(p.x, p.weight, p.bias)
        ref = h.double() + 3 * delta  # restored once above, then 3 replays (last loop + 2)
        assert _rel_err(p.out, ref) <= 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("prefetch", [2])
@pytest.mark.parametrize("split_k", [None, 3])
def test_gpu_pdl_prefetch_chain(split_k, prefetch, gen):
    """Three dependent launches (y = x W1; h += y W2; z = act(h W3)) with programmatic dependent launch and
    the L2 weight prefetch: each program must read its producer's output only after gdc_wait. Eager calls
    and CUDA-graph replays, awkward K (not a multiple of BLOCK_K), in-place residual, split-K counters
    reused by back-to-back launches."""
    from dualfuse.kernels.gemm import pdl_supported

    dt = torch.float16
    cfg = {"pdl": True, "prefetch": prefetch}
    x = torch.randn(77, 520, generator=gen).to(DEV, dt)
    w1 = (torch.randn(776, 520, generator=gen) / 520**0.5).to(DEV, dt)
    w2 = (torch.randn(512, 776, generator=gen) / 776**0.5).to(DEV, dt)
    w3 = (torch.randn(1000, 512, generator=gen) / 512**0.5).to(DEV, dt)
    b3 = torch.randn(1000, generator=gen).to(DEV, dt)
    h0 = torch.randn(77, 512, generator=gen).to(DEV, dt)
    y = torch.empty(77, 776, device=DEV, dtype=dt)
    h = h0.clone()
    z = torch.empty(77, 1000, device=DEV, dtype=dt)
    ops = [GroupedLinear([LinearProblem(x, w1, y)], config=cfg, split_k=split_k),
           GroupedLinear([LinearProblem(y, w2, h, residual=h)], config=cfg, split_k=split_k),
           GroupedLinear([LinearProblem(h, w3, z, bias=b3, activation="gelu")], config=cfg, split_k=split_k)]
    assert ops[0]._plan.constexprs["USE_PDL"] == pdl_supported(DEV)
    assert ops[0]._plan.constexprs["PREFETCH"] == prefetch

    def check(h_in):  # each stage against fp64 from the fp16 input the kernel read
        y_ref = x.double() @ w1.double().T
        assert _rel_err(y, y_ref) <= 1e-2
        assert _rel_err(h, h_in.double() + y.double() @ w2.double().T) <= 1e-2
        assert _rel_err(z, F.gelu(h.double() @ w3.double().T + b3.double())) <= 1e-2

    for _ in range(2):  # eager, back to back
        h.copy_(h0)
        y.fill_(float("nan"))
        z.fill_(float("nan"))
        for op in ops:
            op()
        torch.cuda.synchronize()
        check(h0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for op in ops:
            op()
    for _ in range(3):
        h.copy_(h0)
        y.fill_(float("nan"))
        z.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check(h0)
    for op in ops:
        assert int(op._plan.cnt.abs().sum()) == 0


# ---------------------------------------------------------------------------------------------------
# LayerNorm folded into the GEMM (vertical fusion): out = act(LN(x) @ W.T + b) + residual
# ---------------------------------------------------------------------------------------------------
def _make_ln(M, N, K, dtype, *, activation=None, residual=None, offset=0.0, scale=1.0, eps=1e-5, device=DEV,
             gen=None):
    """A folded-LN problem and its fp64 reference LN(x) @ W.T + b from the unfolded parameters."""
    from dualfuse.kernels.gemm import fold_layernorm

    x = (torch.randn(M, K, generator=gen) * scale + offset).to(device=device, dtype=dtype)
    w = (torch.randn(N, K, generator=gen) / K**0.5).to(device=device, dtype=dtype)
    b = torch.randn(N, generator=gen).to(device=device, dtype=dtype)
    g = (1 + 0.5 * torch.randn(K, generator=gen)).to(device=device, dtype=dtype)
    beta = (0.5 * torch.randn(K, generator=gen)).to(device=device, dtype=dtype)
    res = torch.randn(M, N, generator=gen).to(device=device, dtype=dtype) if residual else None
    out = res if residual == "inplace" else torch.full((M, N), float("nan"), device=device, dtype=dtype)
    ln = F.layer_norm(x.double(), (K,), g.double(), beta.double(), eps)
    ref = _ref(ln, w, b, activation, res)
    wf, bf, norm = fold_layernorm(w, b, g, beta, eps)
    return LinearProblem(x, wf, out, bias=bf, activation=activation, residual=res, norm=norm), ref


LN_SHAPES = [(1, 40, 48), (3, 72, 136), (50, 96, 64), (77, 33 * 8, 200)]  # K not a multiple of BLOCK_K too


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.float32, marks=pytest.mark.slow)])
@pytest.mark.parametrize("kw", [pytest.param(dict(), marks=pytest.mark.slow),
                                pytest.param(dict(activation="quick_gelu"), marks=pytest.mark.slow),
                                pytest.param(dict(activation="gelu_tanh"), marks=pytest.mark.slow),
                                pytest.param(dict(residual="inplace"), marks=pytest.mark.slow),
                                dict(residual="sep", activation="gelu")],
                         ids=["plain", "quick_gelu", "gelu_tanh", "res_inplace", "res_gelu"])
def test_folded_layernorm(dtype, kw, gen):
    """Folded LN problems, alone and mixed with a plain problem in the same launch (3 problems)."""
    made = [_make_ln(*s, dtype, **kw, gen=gen) for s in LN_SHAPES[:2]]
    plain = _make(50, 40, 72, dtype, bias=True, gen=gen)
    refs = [r for _, r in made] + _expected([plain])
    problems = [p for p, _ in made] + [plain]
    GroupedLinear(problems)()
    _check(problems, refs, dtype)
    made = [_make_ln(*s, dtype, **kw, gen=gen) for s in LN_SHAPES[2:]]
    GroupedLinear([p for p, _ in made])()
    _check([p for p, _ in made], [r for _, r in made], dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_folded_layernorm_large_mean(dtype, gen):
    """Rows whose mean is far larger than their spread (|mean| / std = 40): the shifted statistics keep
    LN(x) accurate where E[x^2] - E[x]^2 in fp32 would lose it."""
    p, ref = _make_ln(50, 64, 96, dtype, offset=40.0, scale=1.0, gen=gen)
    GroupedLinear([p])()
    _check([p], [ref], dtype)


def test_folded_layernorm_more_problems_than_args(gen):
    """Above MAX_ARG_PROBLEMS the per-problem fields (eps as float64 bits, colsum address) come from the table."""
    dt = torch.float32
    made = [_make_ln(7 + i, 24 + 8 * i, 40, dt, eps=10.0 ** -(3 + i), gen=gen) for i in range(MAX_ARG_PROBLEMS + 1)]
    g = GroupedLinear([p for p, _ in made])
    assert not g._plan.meta_in_args
    g()
    _check([p for p, _ in made], [r for _, r in made], dt)


def test_folded_layernorm_never_splits(gen):
    dt = torch.float16
    p, ref = _make_ln(1, 32, 512, dt, gen=gen)  # skinny, long K: would split without the LN
    plain = _make(1, 32, 512, dt, gen=gen)
    refs = [ref] + _expected([plain])
    g = GroupedLinear([p, plain], config={"programs_per_sm": 4, "min_k_iters": 1})
    assert g.splits[0] == 1 and g.splits[1] > 1, g.splits
    g()
    _check([p, plain], refs, dt)
    with pytest.raises(ValueError, match="folded LayerNorm"):
        GroupedLinear([p], split_k=2)
    GroupedLinear([p, plain], split_k=[1, 4])()  # a per-problem list that leaves the LN problem whole is fine


def test_fold_layernorm_bad_input():
    from dualfuse.kernels.gemm import FoldedLayerNorm, fold_layernorm

    w, b = torch.randn(8, 16), torch.randn(8)
    with pytest.raises(ValueError, match=r"ln_weight must be a \[16\] tensor"):
        fold_layernorm(w, b, torch.ones(8), torch.zeros(16), 1e-5)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        fold_layernorm(w, b, torch.ones(16), torch.zeros(16), -1.0)
    with pytest.raises(ValueError, match="2-D"):
        fold_layernorm(torch.randn(8), b, torch.ones(16), None, 1e-5)
    x, out = torch.randn(4, 16).to(DEV), torch.empty(4, 8, device=DEV)
    with pytest.raises(ValueError, match="colsum must be a contiguous fp32"):
        GroupedLinear([LinearProblem(x, w.to(DEV), out, norm=FoldedLayerNorm(torch.zeros(8, dtype=torch.float16,
                                                                                          device=DEV), 1e-5))])
    with pytest.raises(ValueError, match="norm must be a FoldedLayerNorm"):
        GroupedLinear([LinearProblem(x, w.to(DEV), out, norm=(torch.zeros(8), 1e-5))])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_folded_layernorm_real_shapes_graph(dtype, gen):
    """QKV and FC1 of ViT-B/32 and ViT-L/14 (batch 1 and 32) with the LN folded in, inside a CUDA graph
    after a producer launch (PDL ordering), replayed."""
    cases = [((50, 2304, 768), (77, 1536, 512)), ((257, 4096, 1024), (77, 3072, 768)),
             ((32 * 50, 3072, 768), (32 * 77, 2048, 512))]
    for dims, act in zip(cases, (None, "quick_gelu", "quick_gelu")):
        made = [_make_ln(*d, dtype, activation=act, gen=gen) for d in dims]
        problems = [p for p, _ in made]
        refs = [r for _, r in made]
        x0 = [p.x.clone() for p in problems]
        src = [torch.zeros_like(p.x) for p in problems]  # a producer launch writes x right before
        prod = GroupedLinear([LinearProblem(s, torch.zeros(s.shape[1], s.shape[1], device=DEV, dtype=dtype), p.x,
                                            residual=s) for s, p in zip(src, problems)])
        g = GroupedLinear(problems)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            prod()
            g()
        for _ in range(3):
            for s, x, p in zip(src, x0, problems):
                s.copy_(x)
                p.x.fill_(float("nan"))
                p.out.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            _check(problems, refs, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.float32, marks=pytest.mark.slow)])
@pytest.mark.parametrize("split_k", [None, pytest.param(3, marks=pytest.mark.slow)])
def test_folded_layernorm_with_statistics_from_the_producer(dtype, split_k, gen):
    """The launch that writes x (here: h += a @ Wo.T, in place, maybe split-K) leaves per-tile row statistics;
    the next launch's folded LayerNorm merges them (Chan) instead of a pass over x. Mixed with a problem that
    computes its own statistics, one without LN and one with awkward widths."""
    from dualfuse.kernels.gemm import fold_layernorm, row_stats_buffer

    shapes = [(50, 72, 40), (3, 136, 24), (77, 200, 96)]  # (rows, width, producer K)
    prods, cons, refs = [], [], []
    for M, D, Ka in shapes:
        a = torch.randn(M, Ka, generator=gen).to(DEV, dtype)
        wo = (torch.randn(D, Ka, generator=gen) / Ka**0.5).to(DEV, dtype)
        h = (torch.randn(M, D, generator=gen) * 2 + 3).to(DEV, dtype)  # residual stream, mean far from 0
        stats = row_stats_buffer(M, D, DEV)
        prods.append(LinearProblem(a, wo, h, residual=h, row_stats_out=stats))
        cons.append((h, stats, D))
    h_new = [(p.residual.double() + p.x.double() @ p.weight.double().T) for p in prods]
    g_prod = GroupedLinear(prods, split_k=split_k)
    g_prod()
    problems = []
    for (h, stats, D), hn in zip(cons, h_new):
        N = 48
        w = (torch.randn(N, D, generator=gen) / D**0.5).to(DEV, dtype)
        b = torch.randn(N, generator=gen).to(DEV, dtype)
        gam = (1 + 0.5 * torch.randn(D, generator=gen)).to(DEV, dtype)
        bet = (0.5 * torch.randn(D, generator=gen)).to(DEV, dtype)
        wf, bf, norm = fold_layernorm(w, b, gam, bet, 1e-5)
        norm.stats, norm.stats_part_width = stats, g_prod.block_n
        out = torch.full((h.shape[0], N), float("nan"), device=DEV, dtype=dtype)
        problems.append(LinearProblem(h, wf, out, bf, "gelu", norm=norm))
        # reference from the h the producer really stored (rounded), as an unfused LN would see it
        refs.append(_ref(F.layer_norm(h.double(), (D,), gam.double(), bet.double(), 1e-5), w, b, "gelu"))
    for h, hn in zip([c[0] for c in cons], h_new):
        assert _rel_err(h, hn) <= TOL[dtype]
    own, own_ref = _make_ln(7, 40, 72, dtype, gen=gen)
    plain = _make(5, 24, 40, dtype, bias=True, gen=gen)
    all_p = problems + [own, plain]
    g = GroupedLinear(all_p, split_k=[2, 1, 2, 1, 1] if split_k else None)
    g()
    _check(all_p, refs + [own_ref] + _expected([plain]), dtype)


def test_row_statistics_bad_input():
    from dualfuse.kernels.gemm import fold_layernorm, row_stats_buffer

    x, w = torch.randn(4, 32, device=DEV), torch.randn(8, 32, device=DEV)
    out = torch.empty(4, 8, device=DEV)
    with pytest.raises(ValueError, match=r"row_stats_out must be a contiguous fp32 \[4, 2\]"):
        GroupedLinear([LinearProblem(x, w, out, row_stats_out=torch.zeros(4, 4, device=DEV))])
    wf, bf, norm = fold_layernorm(w, None, torch.ones(32, device=DEV), None, 1e-5)
    norm.stats, norm.stats_part_width = row_stats_buffer(4, 32, DEV), 24
    with pytest.raises(ValueError, match="stats_part_width must be the producing launch's BLOCK_N"):
        GroupedLinear([LinearProblem(x, wf, out, bf, norm=norm)])
    norm.stats, norm.stats_part_width = torch.zeros(4, 3, device=DEV), 32
    with pytest.raises(ValueError, match=r"norm.stats must be a contiguous fp32 \[4, 4\]"):
        GroupedLinear([LinearProblem(x, wf, out, bf, norm=norm)])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 32])
def test_gpu_folded_layernorm_statistics_chain_in_graph(dtype, batch, gen):
    """ViT-B/32 shapes: out-proj (+ residual, in place, leaves statistics) -> FC1 with ln2 folded, captured in one
    CUDA graph (PDL between them where supported) and replayed; statistics buffers reused across replays."""
    from dualfuse.kernels.gemm import fold_layernorm, row_stats_buffer

    towers = [(50 * batch, 768, 3072), (77 * batch, 512, 2048)]
    prods, cons, h0s, refs = [], [], [], []
    for M, D, Fdim in towers:
        a = torch.randn(M, D, generator=gen).to(DEV, dtype)
        wo = (torch.randn(D, D, generator=gen) / D**0.5).to(DEV, dtype)
        h = (torch.randn(M, D, generator=gen) + 0.5).to(DEV, dtype)
        stats = row_stats_buffer(M, D, DEV)
        prods.append(LinearProblem(a, wo, h, residual=h, row_stats_out=stats))
        w1 = (torch.randn(Fdim, D, generator=gen) / D**0.5).to(DEV, dtype)
        b1 = torch.randn(Fdim, generator=gen).to(DEV, dtype)
        gam = (1 + 0.3 * torch.randn(D, generator=gen)).to(DEV, dtype)
        bet = (0.3 * torch.randn(D, generator=gen)).to(DEV, dtype)
        wf, bf, norm = fold_layernorm(w1, b1, gam, bet, 1e-5)
        norm.stats = stats
        out = torch.empty(M, Fdim, device=DEV, dtype=dtype)
        cons.append((LinearProblem(h, wf, out, bf, "quick_gelu", norm=norm), (w1, b1, gam, bet)))
        h0s.append(h.clone())
    g_prod = GroupedLinear(prods)
    for p, _ in cons:
        p.norm.stats_part_width = g_prod.block_n
    g_cons = GroupedLinear([p for p, _ in cons])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_prod()
        g_cons()
    for _ in range(3):
        for p, h0 in zip(prods, h0s):
            p.out.copy_(h0)
        for p, _ in cons:
            p.out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        refs = []
        for (p, (w1, b1, gam, bet)) in cons:
            ln = F.layer_norm(p.x.double(), (p.x.shape[1],), gam.double(), bet.double(), 1e-5)
            refs.append(_ref(ln, w1, b1, "quick_gelu"))
        _check([p for p, _ in cons], refs, dtype)


# ---------------------------------------------------------------------------------------------------
# tensor-descriptor (TMA) loads: config {"tma": True}
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("split_k", [None, pytest.param(3, marks=pytest.mark.slow)])
def test_tma_loads_awkward_shapes(split_k, gen):
    """x / w tiles by tensor descriptors: rows past M and N and columns past K arrive as zeros (M = 1, 3, 50, 77;
    K not a multiple of BLOCK_K), three unequal problems, every epilogue, in-place residual, split-K."""
    dt = torch.float16
    problems = [_make(50, 72, 96, dt, bias=True, residual="inplace", gen=gen),
                _make(77, 40, 80, dt, bias=True, activation="quick_gelu", gen=gen),
                _make(3, 48, 72, dt, activation="gelu_tanh", residual="sep", gen=gen),
                _make(1, 24, 40, dt, gen=gen)]
    g = _run(problems, dt, split_k=split_k, config={"tma": True})
    assert g.uses_tma


def test_tma_falls_back_where_it_cannot_apply(gen):
    """fp32 inputs, misaligned rows or more problems than kernel arguments: the pointer loads, same results."""
    p32 = [_make(5, 24, 40, torch.float32, gen=gen)]
    assert not _run(p32, torch.float32, config={"tma": True}).uses_tma
    x = torch.randn(6, 41, generator=gen).to(DEV, torch.float16)[:, 1:]  # rows 82 bytes apart: not 16-byte aligned
    w = torch.randn(16, 40, generator=gen).to(DEV, torch.float16)
    prob = [LinearProblem(x, w, torch.full((6, 16), float("nan"), device=DEV, dtype=torch.float16))]
    assert not _run(prob, torch.float16, config={"tma": True}).uses_tma
    many = [_make(5, 16, 32, torch.float16, gen=gen) for _ in range(MAX_ARG_PROBLEMS + 1)]
    assert not _run(many, torch.float16, config={"tma": True}).uses_tma
    assert not GroupedLinear([_make(5, 16, 32, torch.float16, gen=gen)]).uses_tma  # off by default


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 32])
def test_gpu_tma_real_shapes_graph(dtype, rows, gen):
    """The TMA path at ViT-B/32 and SigLIP shapes (batch 1 and 32), each step, eager and replayed in a graph."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor-descriptor loads are used on sm_90+ only")
    for (mv, dv, fv), (mt, dt_, ft) in (((50, 768, 3072), (77, 512, 2048)), ((196, 768, 3072), (64, 768, 3072))):
        for n_of, k_of, res in ((lambda d, f: 3 * d, lambda d, f: d, False), (lambda d, f: f, lambda d, f: d, False),
                                (lambda d, f: d, lambda d, f: f, True)):
            probs = [_make(rows * m, n_of(d, f), k_of(d, f), dtype, bias=True, residual="inplace" if res else None,
                           gen=gen) for m, d, f in ((mv, dv, fv), (mt, dt_, ft))]
            res0 = [p.out.clone() for p in probs]
            refs = _expected(probs)
            g = GroupedLinear(probs, config={"tma": True})
            assert g.uses_tma
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                g()
            for _ in range(2):
                for p, r0 in zip(probs, res0):
                    p.out.copy_(r0) if res else p.out.fill_(float("nan"))
                graph.replay()
                torch.cuda.synchronize()
                _check(probs, refs, dtype)


# ---------------------------------------------------------------------------------------------------
# deferred split-K reduction: partial_sums=True (the raw per-split sums; a LayerNorm with `add` finishes them)
# ---------------------------------------------------------------------------------------------------
def _partial_problem(M, N, K, slices, dtype, gen, block_k=32):
    x = torch.randn(M, K, generator=gen).to(DEV, dtype)
    w = (torch.randn(N, K, generator=gen) / K**0.5).to(DEV, dtype)
    s = GroupedLinear.partial_slices(K, slices, block_k)
    out = torch.full((s, M, N), float("nan"), device=DEV)
    return LinearProblem(x, w, out, partial_sums=True)


@pytest.mark.parametrize("tma", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_partial_sums_slices_sum_to_the_product(tma, gen):
    """Every slice written (NaN-poisoned before), slices sum to x @ w.T; unequal slice counts (1, 3, 4, and a
    K whose split drops an empty part) next to an ordinary split-K problem with an in-place residual."""
    dt = torch.float16
    cfg = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "tma": tma}
    parts = [_partial_problem(50, 72, 128, 4, dt, gen), _partial_problem(77, 40, 96, 3, dt, gen),
             _partial_problem(3, 48, 64, 1, dt, gen), _partial_problem(1, 24, 96, 5, dt, gen)]
    assert [p.out.shape[0] for p in parts] == [4, 3, 1, 3]  # K=96 in 3 steps of 32: 3 non-empty parts of 5
    plain = _make(50, 40, 96, dt, bias=True, residual="inplace", gen=gen)
    h = plain.out.float()  # one launch shares the out dtype: an fp32 residual stream, as in the fused executor
    plain = LinearProblem(plain.x, plain.weight, h, bias=plain.bias, residual=h)
    refs = _expected([plain])
    g = GroupedLinear(parts[:3] + [plain], config=cfg, split_k=[1, 1, 1, 3])
    assert g.splits == [4, 3, 1, 3]
    assert g._plan.constexprs["ANY_PARTIAL"] and g._plan.constexprs["ANY_SPLIT"]
    g()
    g2 = GroupedLinear(parts[3:], config=cfg)
    g2()
    for i, p in enumerate(parts):
        assert not torch.isnan(p.out).any(), f"partial problem {i}: a slice not fully written"
        assert _rel_err(p.out.double().sum(0), p.x.double() @ p.weight.double().T) <= TOL[dt]
        if p.out.shape[0] > 1:  # really split: no slice holds the whole product
            assert not torch.allclose(p.out[0].double(), p.out.double().sum(0), rtol=1e-2, atol=1e-2)
    _check([plain], refs, torch.float16)


def test_partial_sums_feed_a_layernorm_like_the_unfused_epilogue(gen):
    """GEMM (partial sums) -> LayerNorm(add=..., add_bias=bias) == GEMM(bias, residual in place) -> LayerNorm,
    on the residual stream in fp32: x and the normalized rows agree to fp32 rounding."""
    from dualfuse.kernels.layernorm import GroupedLayerNorm, LayerNormProblem

    dt = torch.float16
    M, N, K = 50, 72, 192
    x_in = torch.randn(M, K, generator=gen).to(DEV, dt)
    w = (torch.randn(N, K, generator=gen) / K**0.5).to(DEV, dt)
    b = torch.randn(N, generator=gen).to(DEV, dt)
    h0 = torch.randn(M, N, generator=gen).to(DEV)  # fp32 residual stream
    ln_w, ln_b = torch.randn(N, generator=gen).to(DEV, dt), torch.randn(N, generator=gen).to(DEV, dt)
    cfg = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}
    # unfused: split-K with the in-kernel reduction, then a LayerNorm
    h_ref = h0.clone()
    y_ref = torch.empty(M, N, device=DEV, dtype=dt)
    GroupedLinear([LinearProblem(x_in, w, h_ref, bias=b, residual=h_ref)], config=cfg, split_k=3)()
    GroupedLayerNorm([LayerNormProblem(h_ref, ln_w, ln_b, y_ref, 1e-5)])()
    # deferred: partial sums, the LayerNorm adds them (and the bias) into the residual stream
    h = h0.clone()
    y = torch.full((M, N), float("nan"), device=DEV, dtype=dt)
    parts = torch.full((3, M, N), float("nan"), device=DEV)
    GroupedLinear([LinearProblem(x_in, w, parts, partial_sums=True)], config=cfg)()
    GroupedLayerNorm([LayerNormProblem(h, ln_w, ln_b, y, 1e-5, add=parts, add_bias=b)])()
    torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y.float(), y_ref.float(), atol=2e-3, rtol=1e-3)


def test_partial_sums_bad_input(gen):
    dt = torch.float16
    x = torch.randn(5, 64, generator=gen).to(DEV, dt)
    w = torch.randn(16, 64, generator=gen).to(DEV, dt)
    cfg = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}
    with pytest.raises(ValueError, match=r"contiguous fp32 \[S, M=5, N=16\]"):
        GroupedLinear([LinearProblem(x, w, torch.empty(5, 16, device=DEV), partial_sums=True)])
    with pytest.raises(ValueError, match=r"contiguous fp32 \[S, M=5, N=16\]"):
        GroupedLinear([LinearProblem(x, w, torch.empty(2, 5, 16, device=DEV, dtype=dt), partial_sums=True)])
    with pytest.raises(ValueError, match="bias, residual must be None"):
        out = torch.empty(2, 5, 16, device=DEV)
        GroupedLinear([LinearProblem(x, w, out, bias=torch.zeros(16, device=DEV, dtype=dt),
                                     residual=torch.zeros(5, 16, device=DEV), partial_sums=True)])
    with pytest.raises(ValueError, match="splits into 2 non-empty parts"):  # 64 = 2 steps of 32: not 3 slices
        GroupedLinear([LinearProblem(x, w, torch.empty(3, 5, 16, device=DEV), partial_sums=True)], config=cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_partial_sums_into_layernorm_chain_graph(dtype, gen):
    """ViT-B/32 batch-1 FC2 shapes of both towers as partial sums (4 slices, the default tiles, PDL, TMA where
    the default uses it) -> both towers' next LayerNorm adding them, replayed in a CUDA graph; against the
    unfused chain (in-kernel split-K reduction + residual, then LayerNorm)."""
    from dualfuse.kernels.layernorm import GroupedLayerNorm, LayerNormProblem

    towers = [(50, 768, 3072), (77, 512, 2048)]
    xs = [torch.randn(m, f, generator=gen).to(DEV, dtype) for m, d, f in towers]
    ws = [(torch.randn(d, f, generator=gen) / f**0.5).to(DEV, dtype) for m, d, f in towers]
    bs = [torch.randn(d, generator=gen).to(DEV, dtype) for m, d, f in towers]
    h0 = [torch.randn(m, d, generator=gen).to(DEV) * 3 for m, d, f in towers]
    lns = [(torch.randn(d, generator=gen).to(DEV, dtype), torch.randn(d, generator=gen).to(DEV, dtype))
           for m, d, f in towers]
    ref_h = [h.clone() for h in h0]
    ref_y = [torch.empty(m, d, device=DEV, dtype=dtype) for m, d, f in towers]
    ref_gemm = GroupedLinear([LinearProblem(x, w, h, bias=b, residual=h) for x, w, b, h in zip(xs, ws, bs, ref_h)],
                             split_k=4)
    ref_gemm()
    GroupedLayerNorm([LayerNormProblem(h, lw, lb, y, 1e-5) for h, (lw, lb), y in zip(ref_h, lns, ref_y)])()
    cfg = ref_gemm.config
    slices = [GroupedLinear.partial_slices(f, 4, cfg["BLOCK_K"]) for m, d, f in towers]
    parts = [torch.empty(s, m, d, device=DEV) for s, (m, d, f) in zip(slices, towers)]
    hs = [h.clone() for h in h0]
    ys = [torch.empty(m, d, device=DEV, dtype=dtype) for m, d, f in towers]
    gemm = GroupedLinear([LinearProblem(x, w, p, partial_sums=True) for x, w, p in zip(xs, ws, parts)], config=cfg)
    ln = GroupedLayerNorm([LayerNormProblem(h, lw, lb, y, 1e-5, add=p, add_bias=b)
                           for h, (lw, lb), y, p, b in zip(hs, lns, ys, parts, bs)])
    graph = torch.cuda.CUDAGraph()
    gemm()  # compile / load outside the capture
    ln()
    with torch.cuda.graph(graph):
        gemm()
        ln()
    for _ in range(2):
        for h, h_init, y, p in zip(hs, h0, ys, parts):
            h.copy_(h_init)
            y.fill_(float("nan"))
            p.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for h, y, rh, ry in zip(hs, ys, ref_h, ref_y):
            torch.testing.assert_close(h, rh, atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(y.float(), ry.float(), atol=2e-2, rtol=1e-2)


def test_tall_tiles_of_all_rows(gen):
    """The byte-bound regime's tall tiles (BLOCK_M 256: every row of SigLIP B/16's 196 patches in one tile, each
    weight byte read once): rows beyond M masked, a second problem of 77 rows in the same launch."""
    dt = torch.float16
    problems = [_make(196, 64, 96, dt, bias=True, activation="gelu", gen=gen),
                _make(77, 32, 64, dt, residual="inplace", gen=gen)]
    g = _run(problems, dt, config={"BLOCK_M": 256, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3})
    assert g.config["BLOCK_M"] == 256


def test_tall_tile_folded_layernorm(gen):
    """A folded LayerNorm (row statistics over all of K in the program) in a 256-row tile, beside a plain problem."""
    dt = torch.float16
    ln, ref = _make_ln(196, 64, 96, dt, residual="sep", activation="gelu", gen=gen)
    plain = _make(77, 32, 64, dt, bias=True, gen=gen)
    refs = [ref] + _expected([plain])
    g = GroupedLinear([ln, plain], config={"BLOCK_M": 256, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 8,
                                           "num_stages": 3})
    g()
    assert g.config["BLOCK_M"] == 256
    _check([ln, plain], refs, dt)


def test_tall_tiles_statistics_from_the_producer(gen):
    """The stand-in's no-PDL path with tall tiles: a 256-row producer (h += a @ Wo.T in place) leaves per-part row
    statistics and a 256-row consumer's folded LayerNorm merges them, 196 rows and 77 in each launch."""
    from dualfuse.kernels.gemm import fold_layernorm, row_stats_buffer

    dt = torch.float16
    tall = {"BLOCK_M": 256, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3}
    prods, cons = [], []
    for M, D, Ka in [(196, 64, 48), (77, 96, 40)]:
        a = torch.randn(M, Ka, generator=gen).to(DEV, dt)
        wo = (torch.randn(D, Ka, generator=gen) / Ka**0.5).to(DEV, dt)
        h = (torch.randn(M, D, generator=gen) * 2 + 3).to(DEV, dt)
        stats = row_stats_buffer(M, D, DEV)
        prods.append(LinearProblem(a, wo, h, residual=h, row_stats_out=stats))
        cons.append((h, stats, D))
    g_prod = GroupedLinear(prods, config=tall)
    g_prod()
    assert g_prod.config["BLOCK_M"] == 256
    problems, refs = [], []
    for h, stats, D in cons:
        w = (torch.randn(48, D, generator=gen) / D**0.5).to(DEV, dt)
        b = torch.randn(48, generator=gen).to(DEV, dt)
        gam = (1 + 0.5 * torch.randn(D, generator=gen)).to(DEV, dt)
        bet = (0.5 * torch.randn(D, generator=gen)).to(DEV, dt)
        wf, bf, norm = fold_layernorm(w, b, gam, bet, 1e-5)
        norm.stats, norm.stats_part_width = stats, g_prod.block_n
        out = torch.full((h.shape[0], 48), float("nan"), device=DEV, dtype=dt)
        problems.append(LinearProblem(h, wf, out, bf, "gelu", norm=norm))
        refs.append(_ref(F.layer_norm(h.double(), (D,), gam.double(), bet.double(), 1e-5), w, b, "gelu"))
    g = GroupedLinear(problems, config=tall)
    g()
    assert g.config["BLOCK_M"] == 256 and g._plan.constexprs["NORM_STATS_IN"]  # merged, not recomputed
    _check(problems, refs, dt)

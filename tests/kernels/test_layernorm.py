"""GroupedLayerNorm vs torch.nn.functional.layer_norm (fp32 reference)."""
import pytest
import torch
import torch.nn.functional as F

from graphs import capture_graph

from dualfuse.kernels.layernorm import GroupedLayerNorm, LayerNormProblem, grouped_layer_norm

TOL = {torch.float16: (2e-2, 1e-2), torch.bfloat16: (6e-2, 2e-2), torch.float32: (2e-5, 1e-5)}


def make_problem(rows, d, dtype, device, *, row_stride=None, eps=1e-5, row_index=None, out_dtype=None):
    row_stride = row_stride or d
    base = torch.randn(rows, row_stride, device=device).to(dtype) * 3 + 0.5
    x = base[:, :d]
    w = (torch.randn(d, device=device) * 0.5 + 1).to(dtype)
    b = torch.randn(d, device=device).to(dtype)
    n_out = rows if row_index is None else row_index.numel()
    out = torch.full((n_out, d), float("nan"), dtype=out_dtype or dtype, device=device)
    return LayerNormProblem(x, w, b, out, eps, row_index)


def reference(p):
    x = p.x.float()
    if p.row_index is not None:
        x = x[p.row_index.long()]
    return F.layer_norm(x, (x.shape[1],), p.weight.float(), p.bias.float(), p.eps)


def check(p, dtype=None):
    dtype = dtype or p.out.dtype
    assert not p.out.isnan().any(), "output not fully written"
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(p.out.float(), reference(p), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.float32, marks=pytest.mark.slow)])
def test_awkward_shapes_one_launch(dtype, kernel_device):
    # every awkward row count and width, all problems of one launch
    shapes = [(1, 40), (3, 72), (50, 96), (77, 768), (197, 40), (257, 72), (3, 768), (1, 96)]
    problems = [make_problem(r, d, dtype, kernel_device) for r, d in shapes]
    op = GroupedLayerNorm(problems)
    op()
    for p in problems:
        check(p)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_problem_counts_unequal(n, kernel_device):
    shapes = [(50, 768), (77, 96), (3, 40)][:n]
    problems = [make_problem(r, d, torch.float16, kernel_device, eps=e) for (r, d), e in zip(shapes, [1e-5, 1e-6, 1e-3])]
    GroupedLayerNorm(problems)()
    for p in problems:
        check(p)


def test_row_stride_and_row_index(kernel_device):
    idx32 = torch.tensor([0, 49, 7, 7], dtype=torch.int32, device=kernel_device)
    idx64 = torch.tensor([76, 0, 38], dtype=torch.int64, device=kernel_device)
    problems = [
        make_problem(50, 72, torch.float16, kernel_device, row_stride=3 * 72 + 8, row_index=idx32),
        make_problem(77, 40, torch.float16, kernel_device, row_stride=100, row_index=idx64),
        make_problem(5, 96, torch.float16, kernel_device, row_stride=200),
    ]
    GroupedLayerNorm(problems)()
    for p in problems:
        check(p)


def test_out_dtype_differs_from_x(kernel_device):
    p = make_problem(77, 96, torch.float32, kernel_device, out_dtype=torch.float16)
    GroupedLayerNorm([p])()
    check(p, torch.float16)


def test_repeat_and_static_buffers(kernel_device):
    problems = [make_problem(50, 40, torch.float16, kernel_device), make_problem(3, 72, torch.float16, kernel_device)]
    op = GroupedLayerNorm(problems)
    op()
    first = [p.out.clone() for p in problems]
    op()
    for p, f in zip(problems, first):
        assert torch.equal(p.out, f)
    # new contents in the same buffers: the prepared op picks them up
    for p in problems:
        p.x.copy_(torch.randn_like(p.x, dtype=torch.float32).to(p.x.dtype))
        p.out.fill_(float("nan"))
    op()
    for p in problems:
        check(p)


def test_convenience_nd(kernel_device):
    x1 = torch.randn(2, 50, 72, device=kernel_device, dtype=torch.float16)
    x2 = torch.randn(77, 40, device=kernel_device, dtype=torch.float16)
    ws = [torch.randn(72, device=kernel_device, dtype=torch.float16), torch.randn(40, device=kernel_device, dtype=torch.float16)]
    bs = [torch.randn(72, device=kernel_device, dtype=torch.float16), torch.randn(40, device=kernel_device, dtype=torch.float16)]
    idx = torch.tensor([3, 5], device=kernel_device)
    o1, o2 = grouped_layer_norm([x1, x2], ws, bs, 1e-5, [None, idx])
    assert o1.shape == x1.shape and o2.shape == (2, 40)
    torch.testing.assert_close(o1.float(), F.layer_norm(x1.float(), (72,), ws[0].float(), bs[0].float(), 1e-5),
                               atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(o2.float(), F.layer_norm(x2.float()[idx], (40,), ws[1].float(), bs[1].float(), 1e-5),
                               atol=2e-2, rtol=1e-2)


def test_bad_inputs(kernel_device):
    dev = kernel_device
    good = make_problem(3, 40, torch.float16, dev)
    with pytest.raises(ValueError, match="at least one"):
        GroupedLayerNorm([])
    with pytest.raises(ValueError, match="weight"):
        GroupedLayerNorm([LayerNormProblem(good.x, good.weight[:39], good.bias, good.out, 1e-5)])
    with pytest.raises(ValueError, match="contiguous last dim"):
        x = torch.randn(40, 3, device=dev, dtype=torch.float16).t()
        GroupedLayerNorm([LayerNormProblem(x, good.weight, good.bias, good.out, 1e-5)])
    with pytest.raises(ValueError, match="out must be"):
        GroupedLayerNorm([LayerNormProblem(good.x, good.weight, good.bias, good.out[:2], 1e-5)])
    with pytest.raises(ValueError, match="differ"):
        other = make_problem(3, 40, torch.float32, dev)
        GroupedLayerNorm([good, other])
    with pytest.raises(ValueError, match="row_index"):
        GroupedLayerNorm([LayerNormProblem(good.x, good.weight, good.bias, good.out, 1e-5,
                                           torch.zeros(3, device=dev, dtype=torch.float32))])
    with pytest.raises(ValueError, match="dtype"):
        p = make_problem(3, 40, torch.float16, dev)
        GroupedLayerNorm([LayerNormProblem(p.x.to(torch.int32), p.weight, p.bias, p.out, 1e-5)])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_real_sizes(dtype):
    shapes = [(32 * 50, 768), (32 * 77, 512), (32 * 257, 1024), (32 * 77, 768), (1, 768), (32 * 196, 768)]
    problems = [make_problem(r, d, dtype, "cuda") for r, d in shapes]
    op = GroupedLayerNorm(problems)
    op()
    for p in problems:
        check(p)
    # CUDA graph capture and replay
    g = capture_graph(op)
    for p in problems:
        p.out.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    for p in problems:
        check(p)


# ---- deferred residual add: x += add_bias + sum of a split-K GEMM's partial sums, then LN(x) ----
def _with_add(p, slices, with_bias=True):
    R, D = p.x.shape
    add = torch.randn(slices, R, D, device=p.x.device) * 0.7
    bias = torch.randn(D, device=p.x.device).to(p.weight.dtype) if with_bias else None
    return LayerNormProblem(p.x, p.weight, p.bias, p.out, p.eps, add=add, add_bias=bias)


def _x_after_add(x0, p):
    """What the unfused GEMM epilogue would leave in x: ((sum of slices) + bias) + residual, in x's dtype."""
    acc = p.add[0].clone()
    for s in range(1, p.add.shape[0]):
        acc += p.add[s]
    if p.add_bias is not None:
        acc += p.add_bias.float()
    return (x0.float() + acc).to(x0.dtype)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16])
def test_add_partial_sums_then_normalize(x_dtype, kernel_device):
    # unequal slices per problem (1, 3, 4) next to a problem without add, one launch; widths not powers of two;
    # x written back (the residual stream), out = LN of the new x
    plain = [make_problem(r, d, x_dtype, kernel_device) for r, d in [(50, 96), (77, 40), (3, 72), (1, 96)]]
    problems = [_with_add(plain[0], 4), _with_add(plain[1], 1, with_bias=False), _with_add(plain[2], 3), plain[3]]
    x0 = [p.x.clone() for p in problems]
    GroupedLayerNorm(problems)()
    for p, x_before in zip(problems, x0):
        want_x = _x_after_add(x_before, p) if p.add is not None else x_before
        # fp32 sums may associate differently from the reference by an ulp or so; fp16 rounds once to x's dtype
        tol = dict(atol=1e-5, rtol=1e-5) if x_dtype == torch.float32 else dict(atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(p.x.float(), want_x.float(), **tol)
        check(p)  # reference(p) normalizes the x now in memory


def test_add_repeats_from_the_updated_x(kernel_device):
    # a second launch adds again onto the x the first one wrote (what a replayed graph step does)
    p = _with_add(make_problem(7, 40, torch.float32, kernel_device), 2)
    x0 = p.x.clone()
    op = GroupedLayerNorm([p])
    op()
    op()
    twice = _x_after_add(_x_after_add(x0, p), p)
    torch.testing.assert_close(p.x, twice, atol=1e-5, rtol=1e-5)
    check(p)


def test_add_bad_inputs(kernel_device):
    dev = kernel_device
    p = make_problem(5, 40, torch.float32, dev)
    good = torch.zeros(2, 5, 40, device=dev)
    for bad, match in [(torch.zeros(2, 5, 41, device=dev), r"fp32 \[S, R=5, D=40\]"),
                       (torch.zeros(2, 5, 40, device=dev, dtype=torch.float16), "fp32"),
                       (torch.zeros(9, 5, 40, device=dev), "1 <= S <= 8"),
                       (torch.zeros(5, 40, device=dev), r"\[S, R=5"),
                       (torch.zeros(2, 40, 5, device=dev).transpose(1, 2), "contiguous")]:
        with pytest.raises(ValueError, match=match):
            GroupedLayerNorm([LayerNormProblem(p.x, p.weight, p.bias, p.out, 1e-5, add=bad)])
    with pytest.raises(ValueError, match="add_bias must be a contiguous \\[40\\]"):
        GroupedLayerNorm([LayerNormProblem(p.x, p.weight, p.bias, p.out, 1e-5, add=good,
                                           add_bias=torch.zeros(40, device=dev, dtype=torch.float16))])
    with pytest.raises(ValueError, match="add_bias is only used with add"):
        GroupedLayerNorm([LayerNormProblem(p.x, p.weight, p.bias, p.out, 1e-5, add_bias=p.bias)])
    with pytest.raises(ValueError, match="cannot be combined with row_index"):
        idx = torch.zeros(2, dtype=torch.long, device=dev)
        GroupedLayerNorm([LayerNormProblem(p.x, p.weight, p.bias, p.out[:2], 1e-5, idx, add=good)])

"""L2 prefetch of a later launch's weights (kernels._utils.prefetch_share_l2, GroupedLinear.prefetch_ahead).

The interpreter has no prefetch instruction, so on CPU the helper runs in its COUNT mode: every program adds 1
per line of its share, and each line of every region must be counted exactly once (no line dropped, none
asked twice). The GPU test checks that turning it on leaves results unchanged in eager calls and graphs.
"""
import pytest
import torch
import triton
import triton.language as tl

from dualfuse.kernels._utils import L2_LINE, is_interpreter, l2_regions, prefetch_share_l2
from dualfuse.kernels.gemm import GroupedLinear, LinearProblem

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"


@triton.jit
def _count_kernel(counts_ptr, a0, n0, a1, n1, a2, n2, a3, n3, REGIONS: tl.constexpr, CHUNK: tl.constexpr):
    prefetch_share_l2(tl.program_id(0), tl.num_programs(0), a0, n0, a1, n1, a2, n2, a3, n3, counts_ptr,
                      REGIONS, CHUNK, True)


@pytest.mark.parametrize("programs", [1, 3, 7, 40])
@pytest.mark.parametrize("lines", [[5], [1, 300], [17, 0, 64, 3], [1000, 1]])
def test_prefetch_share_covers_every_line_once(programs, lines):
    counts = torch.zeros(sum(lines), dtype=torch.int32, device=DEV)
    regs = [(0, n) for n in lines] + [(0, 0)] * (4 - len(lines))
    flat = [v for r in regs for v in r]
    _count_kernel[(programs,)](counts, *flat, REGIONS=len(lines), CHUNK=16)
    assert torch.equal(counts.cpu(), torch.ones_like(counts.cpu())), counts.cpu().tolist()


def test_l2_regions_merges_and_pads():
    buf = torch.zeros(4096, dtype=torch.float16)
    a, b, c = buf[:1000], buf[1000:2000], buf[3000:3100]  # a and b touch: one region
    regs = l2_regions([a, b, c])
    lo = buf.data_ptr() // L2_LINE * L2_LINE
    assert regs[0] == (lo, -(-(buf.data_ptr() + 4000 - lo) // L2_LINE))
    c_lo = c.data_ptr() // L2_LINE * L2_LINE
    assert regs[1] == (c_lo, -(-(c.data_ptr() + 200 - c_lo) // L2_LINE))
    assert regs[2:] == [(0, 0), (0, 0)]
    assert l2_regions([]) == [(0, 0)] * 4


def test_l2_regions_bad_input():
    with pytest.raises(ValueError, match="contiguous"):
        l2_regions([torch.zeros(8, 8).t()])
    parts = [torch.zeros(64) for _ in range(5)]
    with pytest.raises(ValueError, match="at most 4"):
        l2_regions(parts)


def _problem(M, N, K, gen, dt=torch.float16):
    x = torch.randn(M, K, generator=gen).to(DEV, dt)
    w = (torch.randn(N, K, generator=gen) / K**0.5).to(DEV, dt)
    return LinearProblem(x, w, torch.full((M, N), float("nan"), device=DEV, dtype=dt))


def test_prefetch_ahead_validation_and_off_on_cpu():
    gen = torch.Generator().manual_seed(0)
    op = GroupedLinear([_problem(5, 40, 48, gen)])
    nxt = _problem(5, 24, 40, gen)
    on = op.prefetch_ahead([nxt.weight])
    assert on == (HAS_CUDA and not is_interpreter())
    op()
    p = op.problems[0]
    assert torch.allclose(p.out.float(), p.x.float() @ p.weight.float().T, atol=1e-2, rtol=1e-2)
    assert op.prefetch_ahead([]) is False
    with pytest.raises(ValueError, match="expected tensors on"):
        op.prefetch_ahead([nxt.weight, "w"])
    with pytest.raises(ValueError, match="contiguous"):
        op.prefetch_ahead([nxt.weight.t()])


@pytest.mark.gpu
@pytest.mark.parametrize("split_k", [None, 3])
def test_gpu_prefetch_ahead_chain_unchanged(split_k):
    """Three dependent launches, each asking L2 for the next one's weights (the last for the first's): the
    same bits as without, eagerly and in a CUDA graph."""
    gen = torch.Generator().manual_seed(1)
    dt = torch.float16
    x = torch.randn(77, 520, generator=gen).to(DEV, dt)
    ws = [(torch.randn(n, k, generator=gen) / k**0.5).to(DEV, dt) for n, k in ((776, 520), (512, 776), (1000, 512))]
    y, h, z = (torch.empty(77, n, device=DEV, dtype=dt) for n in (776, 512, 1000))
    probs = [LinearProblem(x, ws[0], y), LinearProblem(y, ws[1], h), LinearProblem(h, ws[2], z, activation="gelu")]

    def run(ahead: bool):
        ops = [GroupedLinear([p], split_k=split_k) for p in probs]
        if ahead:
            assert all(op.prefetch_ahead([ws[(i + 1) % 3]]) for i, op in enumerate(ops))
            assert ops[0]._plan.constexprs["AHEAD_REGIONS"] == 1
        for t in (y, h, z):
            t.fill_(float("nan"))
        for op in ops:
            op()
        eager = [t.clone() for t in (y, h, z)]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for op in ops:
                op()
        for t in (y, h, z):
            t.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        return eager, [t.clone() for t in (y, h, z)]

    base_eager, base_graph = run(False)
    got_eager, got_graph = run(True)
    for a, b, c, d in zip(base_eager, base_graph, got_eager, got_graph):
        assert not torch.isnan(c).any() and not torch.isnan(d).any()
        assert torch.equal(a, c) and torch.equal(b, d)

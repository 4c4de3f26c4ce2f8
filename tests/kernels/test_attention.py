"""GroupedAttention vs torch.nn.functional.scaled_dot_product_attention (fp32 reference)."""
import pytest
import torch
import torch.nn.functional as F

from graphs import capture_graph

from dualfuse.kernels.attention import AttentionProblem, GroupedAttention, grouped_attention, split_packed_qkv

TOL = {torch.float16: (4e-3, 1e-2), torch.bfloat16: (3e-2, 2e-2), torch.float32: (2e-5, 1e-5)}


def packed_problem(B, S, heads, dh, dtype, device, causal=False, scale=None, batch_pad=0):
    """q/k/v as strided views of one packed QKV buffer (the GEMM output layout)."""
    W = heads * dh
    qkv = (torch.randn(B, S + batch_pad, 3 * W, device=device) * 1.5).to(dtype)[:, :S]
    q, k, v = split_packed_qkv(qkv, W)
    out = torch.full((B, S, W), float("nan"), dtype=dtype, device=device)
    return AttentionProblem(q, k, v, out, heads, causal, scale)


def reference(p):
    B, Sq, W = p.q.shape
    Sk = p.k.shape[1]
    H = p.heads
    Dh = W // H

    def heads_first(x, S):
        return x.float().reshape(B, S, H, Dh).transpose(1, 2)

    o = F.scaled_dot_product_attention(heads_first(p.q, Sq), heads_first(p.k, Sk), heads_first(p.v, Sk),
                                       is_causal=p.causal, scale=p.scale)
    return o.transpose(1, 2).reshape(B, Sq, W)


def check(p):
    assert not p.out.isnan().any(), "output not fully written"
    atol, rtol = TOL[p.q.dtype]
    torch.testing.assert_close(p.out.float(), reference(p), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_single(dtype, causal, kernel_device):
    p = packed_problem(2, 77, 2, 32, dtype, kernel_device, causal=causal)
    GroupedAttention([p])()
    check(p)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_two_towers(dtype, kernel_device):
    # vision-like (50 tokens, non-causal) + text-like (77 tokens, causal), unequal batch/heads/head dim
    vis = packed_problem(3, 50, 4, 16, dtype, kernel_device)
    txt = packed_problem(2, 77, 2, 32, dtype, kernel_device, causal=True)
    op = GroupedAttention([vis, txt])
    op()
    check(vis)
    check(txt)


def test_three_problems_with_broadcast_probe(kernel_device):
    dt = torch.float16
    vis = packed_problem(2, 64, 3, 32, dt, kernel_device)
    txt = packed_problem(3, 33, 2, 32, dt, kernel_device, causal=True, batch_pad=5)
    # SigLIP attention-pooling head: one learned probe broadcast over the batch (batch stride 0)
    W = 96
    probe = torch.randn(1, 1, W, device=kernel_device).to(dt).expand(2, 1, W)
    kv = (torch.randn(2, 64, 2 * W, device=kernel_device)).to(dt)
    pool = AttentionProblem(probe, kv[..., :W], kv[..., W:],
                            torch.full((2, 1, W), float("nan"), dtype=dt, device=kernel_device), heads=3)
    assert probe.stride(0) == 0
    GroupedAttention([vis, txt, pool])()
    for p in (vis, txt, pool):
        check(p)


def test_long_sequence_197(kernel_device):
    p = packed_problem(1, 197, 1, 16, torch.float16, kernel_device)
    GroupedAttention([p])()
    check(p)


@pytest.mark.parametrize("block_m,block_n", [(32, 32), (16, 32), (32, 16), (64, 32)])
def test_head_dim_64_blocks(block_m, block_n, kernel_device):
    # Dh == BLOCK_D (no head-dim mask path); causal with unequal query/key blocks
    a = packed_problem(1, 50, 2, 64, torch.float16, kernel_device, causal=True)
    b = packed_problem(2, 21, 1, 64, torch.float16, kernel_device)
    GroupedAttention([a, b], block_m=block_m, block_n=block_n)()
    check(a)
    check(b)


def test_odd_head_dims_and_scale(kernel_device):
    dt = torch.float16
    a = packed_problem(2, 20, 2, 40, dt, kernel_device, scale=0.05)  # Dh 40 padded to 64
    b = packed_problem(1, 17, 3, 24, dt, kernel_device, causal=True)
    GroupedAttention([a, b])()
    check(a)
    check(b)


def test_cross_lengths(kernel_device):
    # Sq != Sk (non-causal) and causal with Sq > Sk (top-left aligned, as SDPA's is_causal)
    dt = torch.float32
    B, W, H = 2, 64, 2
    q = torch.randn(B, 10, W, device=kernel_device, dtype=dt)
    k = torch.randn(B, 45, W, device=kernel_device, dtype=dt)
    v = torch.randn(B, 45, W, device=kernel_device, dtype=dt)
    p1 = AttentionProblem(q, k, v, torch.full_like(q, float("nan")), H)
    q2 = torch.randn(B, 40, W, device=kernel_device, dtype=dt)
    p2 = AttentionProblem(q2, k[:, :20], v[:, :20], torch.full_like(q2, float("nan")), H, causal=True)
    GroupedAttention([p1, p2])()
    check(p1)
    check(p2)


def test_repeat_and_static_buffers(kernel_device):
    vis = packed_problem(2, 50, 2, 16, torch.float16, kernel_device)
    txt = packed_problem(1, 77, 2, 16, torch.float16, kernel_device, causal=True)
    op = GroupedAttention([vis, txt])
    op()
    first = [vis.out.clone(), txt.out.clone()]
    op()
    assert torch.equal(vis.out, first[0]) and torch.equal(txt.out, first[1])
    for p in (vis, txt):
        p.q.copy_(torch.randn(p.q.shape, device=kernel_device).to(p.q.dtype))
        p.out.fill_(float("nan"))
    op()
    check(vis)
    check(txt)


def test_convenience_lists(kernel_device):
    dt = torch.float16
    qkv1 = torch.randn(2, 50, 3 * 64, device=kernel_device).to(dt)
    qkv2 = torch.randn(1, 77, 3 * 32, device=kernel_device).to(dt)
    q1, k1, v1 = split_packed_qkv(qkv1, 64)
    q2, k2, v2 = split_packed_qkv(qkv2, 32)
    o1, o2 = grouped_attention([q1, q2], [k1, k2], [v1, v2], heads=[4, 2], causal=[False, True])
    check(AttentionProblem(q1, k1, v1, o1, 4))
    check(AttentionProblem(q2, k2, v2, o2, 2, causal=True))


def test_bad_inputs(kernel_device):
    dev = kernel_device
    good = packed_problem(1, 10, 2, 16, torch.float16, dev)
    with pytest.raises(ValueError, match="at least one"):
        GroupedAttention([])
    with pytest.raises(ValueError, match="heads"):
        GroupedAttention([AttentionProblem(good.q, good.k, good.v, good.out, heads=3)])
    with pytest.raises(ValueError, match="k and v"):
        GroupedAttention([AttentionProblem(good.q, good.k[:, :5], good.v, good.out, heads=2)])
    with pytest.raises(ValueError, match="out must be"):
        GroupedAttention([AttentionProblem(good.q, good.k, good.v, good.out[:, :5], heads=2)])
    with pytest.raises(ValueError, match="contiguous last dim"):
        qt = torch.randn(1, 32, 10, device=dev, dtype=torch.float16).transpose(1, 2)
        GroupedAttention([AttentionProblem(qt, good.k, good.v, good.out, heads=2)])
    with pytest.raises(ValueError, match="dtype"):
        other = packed_problem(1, 10, 2, 16, torch.float32, dev)
        GroupedAttention([good, other])
    with pytest.raises(ValueError, match="block_m"):
        GroupedAttention([good], block_m=48)
    with pytest.raises(ValueError, match="3\\*width"):
        split_packed_qkv(torch.randn(1, 4, 10), 4)


SHAPES_REAL = {
    # name: [(B, S, heads, Dh, causal) per tower]
    "vit_b32": [(50, 12, 64, False), (77, 8, 64, True)],
    "vit_b16": [(197, 12, 64, False), (77, 8, 64, True)],
    "vit_l14": [(257, 16, 64, False), (77, 12, 64, True)],
    "siglip_b16": [(196, 12, 64, False), (64, 12, 64, False)],
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("model", sorted(SHAPES_REAL))
@pytest.mark.parametrize("batch", [1, 32])
def test_gpu_real_shapes(dtype, model, batch):
    problems = [packed_problem(batch, S, H, Dh, dtype, "cuda", causal=c) for S, H, Dh, c in SHAPES_REAL[model]]
    op = GroupedAttention(problems)
    op()
    for p in problems:
        check(p)
    g = capture_graph(op)
    for p in problems:
        p.out.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    for p in problems:
        check(p)

"""Pooled row indices on the device vs the HF / open_clip torch expressions."""
import pytest
import torch
import torch.nn.functional as F

from graphs import capture_graph

from dualfuse.kernels.heads import PoolIndices, PoolProblem, pool_indices
from dualfuse.kernels.layernorm import GroupedLayerNorm, LayerNormProblem


def reference(kind, ids, eos, S, B=None):
    if ids is not None:
        B, L = ids.shape
    b = torch.arange(B, device=ids.device if ids is not None else "cpu")
    if kind == "cls":
        pos = torch.zeros_like(b)
    elif kind == "last":
        pos = torch.full_like(b, S - 1)
    elif kind == "first_eos":  # HF CLIP
        pos = (ids == eos).int().argmax(dim=-1)
    else:  # open_clip / legacy HF
        pos = ids.argmax(dim=-1)
    return (b * S + pos.to(b.device)).long()


def random_ids(B, L, eos, device, dtype=torch.int64):
    ids = torch.randint(0, 20, (B, L), device=device, dtype=dtype)
    ids[0, :] = 5                      # no EOS; argmax ties everywhere -> 0
    if B > 1:
        ids[1, L // 2] = eos           # one EOS
        ids[1, L - 1] = eos            # ... and another later: first wins
        ids[1, 3 % L] = 30             # unique max
    if B > 2:
        ids[2, 2 % L] = 31             # tied max: first wins
        ids[2, L - 1] = 31
    return ids


@pytest.mark.parametrize("kind", ["cls", "last", "first_eos", "argmax"])
@pytest.mark.parametrize("ids_dtype,out_dtype", [(torch.int64, torch.int64), (torch.int32, torch.int32),
                                                 (torch.int32, torch.int64)])
def test_kinds(kind, ids_dtype, out_dtype, kernel_device):
    ids = random_ids(5, 77, 7, kernel_device, ids_dtype)
    out = torch.full((5,), -1, dtype=out_dtype, device=kernel_device)
    res = pool_indices(ids, kind, eos_token_id=7, out=out)
    assert res is out
    assert torch.equal(out.long().cpu(), reference(kind, ids, 7, 77).cpu())


def test_grouped_seq_len_and_strides(kernel_device):
    dev = kernel_device
    ids_a = random_ids(4, 64, 3, dev)
    ids_b = random_ids(3, 77 + 5, 3, dev, torch.int32)[:, :77]   # strided rows
    problems = [
        PoolProblem("first_eos", torch.full((4,), -1, device=dev), ids_a, eos_token_id=3),
        PoolProblem("argmax", torch.full((3,), -1, device=dev, dtype=torch.int32), ids_b, seq_len=80),
        PoolProblem("cls", torch.full((2,), -1, device=dev), seq_len=50),
        PoolProblem("last", torch.full((3,), -1, device=dev), seq_len=64),
    ]
    op = PoolIndices(problems)
    op()
    assert torch.equal(problems[0].out.cpu(), reference("first_eos", ids_a, 3, 64).cpu())
    assert torch.equal(problems[1].out.long().cpu(), reference("argmax", ids_b, 3, 80).cpu())
    assert problems[2].out.tolist() == [0, 50]
    assert problems[3].out.tolist() == [63, 127, 191]
    # static buffers: new ids, same op
    ids_a.copy_(random_ids(4, 64, 3, dev).flip(1))
    op()
    assert torch.equal(problems[0].out.cpu(), reference("first_eos", ids_a, 3, 64).cpu())


def test_pool_then_layernorm_composition(kernel_device):
    """Final LN + pooling for both towers = one GroupedLayerNorm launch with row_index."""
    dev, dt = kernel_device, torch.float16
    Bv, Sv, Dv = 3, 50, 96
    Bt, St, Dt = 2, 77, 72
    hv = torch.randn(Bv * Sv, Dv, device=dev).to(dt)
    ht = torch.randn(Bt * St, Dt, device=dev).to(dt)
    ids = random_ids(Bt, St, 9, dev)
    idx_v = torch.empty(Bv, dtype=torch.int64, device=dev)
    idx_t = torch.empty(Bt, dtype=torch.int32, device=dev)
    pool = PoolIndices([PoolProblem("cls", idx_v, seq_len=Sv), PoolProblem("first_eos", idx_t, ids, eos_token_id=9)])
    wv, bv = torch.randn(Dv, device=dev).to(dt), torch.randn(Dv, device=dev).to(dt)
    wt, bt = torch.randn(Dt, device=dev).to(dt), torch.randn(Dt, device=dev).to(dt)
    ov = torch.full((Bv, Dv), float("nan"), dtype=dt, device=dev)
    ot = torch.full((Bt, Dt), float("nan"), dtype=dt, device=dev)
    ln = GroupedLayerNorm([LayerNormProblem(hv, wv, bv, ov, 1e-5, idx_v), LayerNormProblem(ht, wt, bt, ot, 1e-5, idx_t)])
    pool()
    ln()
    ref_v = F.layer_norm(hv.float().view(Bv, Sv, Dv), (Dv,), wv.float(), bv.float(), 1e-5)[:, 0]
    pos = (ids == 9).int().argmax(-1)
    ref_t = F.layer_norm(ht.float().view(Bt, St, Dt), (Dt,), wt.float(), bt.float(), 1e-5)[torch.arange(Bt, device=dev), pos]
    torch.testing.assert_close(ov.float(), ref_v, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(ot.float(), ref_t, atol=2e-2, rtol=1e-2)


def test_bad_inputs(kernel_device):
    dev = kernel_device
    ids = torch.randint(0, 10, (2, 5), device=dev)
    out = torch.empty(2, dtype=torch.int64, device=dev)
    with pytest.raises(ValueError, match="kind"):
        pool_indices(ids, "mean", out=out)
    with pytest.raises(ValueError, match="eos_token_id"):
        pool_indices(ids, "first_eos", out=out)
    with pytest.raises(ValueError, match="needs input_ids"):
        pool_indices(None, "argmax", out=out)
    with pytest.raises(ValueError, match="seq_len"):
        pool_indices(None, "last", out=out)
    with pytest.raises(ValueError, match="out must be"):
        pool_indices(ids, "cls", out=torch.empty(2, device=dev))
    with pytest.raises(ValueError, match="batch"):
        pool_indices(ids, "cls", out=torch.empty(3, dtype=torch.int64, device=dev))
    with pytest.raises(ValueError, match="seq_len >= L"):
        pool_indices(ids, "argmax", seq_len=4, out=out)
    with pytest.raises(ValueError, match="at least one"):
        PoolIndices([])


@pytest.mark.gpu
def test_gpu_graph_capture():
    ids = random_ids(32, 77, 49407, "cuda")
    out = torch.full((32,), -1, dtype=torch.int64, device="cuda")
    op = PoolIndices([PoolProblem("first_eos", out, ids, eos_token_id=49407)])
    op()
    g = capture_graph(op)
    ids.copy_(random_ids(32, 77, 49407, "cuda").flip(0))
    out.fill_(-1)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, reference("first_eos", ids, 49407, 77))

"""Embeddings (patch GEMM + class/pos, token gather + pos) vs conv2d / indexing (fp32 reference)."""
import pytest
import torch
import torch.nn.functional as F

from graphs import capture_graph

from dualfuse.kernels.embed import (Embeddings, PatchEmbed, PatchEmbedProblem, TokenEmbed, TokenEmbedProblem,
                                    patch_embed, token_embed)

TOL = {torch.float16: (1e-2, 1e-2), torch.bfloat16: (6e-2, 2e-2), torch.float32: (1e-4, 1e-5)}


def make_patch(B, C, H, W, P, D, dtype, device, *, cls=True, bias=True, pix_dtype=torch.float32,
               channels_last=False):
    pix = torch.randn(B, C, H, W, device=device).to(pix_dtype)
    if channels_last:
        pix = pix.to(memory_format=torch.channels_last)
    w = (torch.randn(D, C * P * P, device=device) / (C * P * P) ** 0.5).to(dtype)
    T = (H // P) * (W // P) + int(cls)
    return PatchEmbedProblem(
        pixel_values=pix,
        weight=w,
        bias=torch.randn(D, device=device).to(dtype) if bias else None,
        class_embedding=torch.randn(D, device=device).to(dtype) if cls else None,
        pos_embedding=torch.randn(T, D, device=device).to(dtype),
        out=torch.full((B, T, D), float("nan"), dtype=dtype, device=device),
        patch_size=P,
    )


def make_token(B, L, V, D, dtype, device, *, ids_dtype=torch.int64, l_max=None, ids_pad=0):
    ids = torch.randint(0, V, (B, L + ids_pad), device=device, dtype=ids_dtype)[:, :L]
    return TokenEmbedProblem(
        input_ids=ids,
        token_weight=torch.randn(V, D, device=device).to(dtype),
        pos_embedding=torch.randn(l_max or L, D, device=device).to(dtype),
        out=torch.full((B, L, D), float("nan"), dtype=dtype, device=device),
    )


def patch_reference(p):
    D = p.weight.shape[0]
    C = p.pixel_values.shape[1]
    P = p.patch_size
    x = p.pixel_values.to(p.weight.dtype).float()  # the kernel casts pixels to the weight dtype
    w = p.weight.float().reshape(D, C, P, P)
    b = p.bias.float() if p.bias is not None else None
    y = F.conv2d(x, w, b, stride=P).flatten(2).transpose(1, 2)
    if p.class_embedding is not None:
        y = torch.cat([p.class_embedding.float().expand(y.shape[0], 1, D), y], dim=1)
    return y + p.pos_embedding.float()


def token_reference(p):
    L = p.input_ids.shape[1]
    return p.token_weight.float()[p.input_ids.long()] + p.pos_embedding.float()[:L]


def check(p):
    assert not p.out.isnan().any(), "output not fully written"
    ref = patch_reference(p) if isinstance(p, PatchEmbedProblem) else token_reference(p)
    atol, rtol = TOL[p.out.dtype]
    torch.testing.assert_close(p.out.float(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("cls,bias", [(True, False), (False, True)])  # CLIP-like, SigLIP-like
def test_patch(dtype, cls, bias, kernel_device):
    # 12x20 image, p=4 -> 15 patches (+1), K = 48 (not a multiple of BLOCK_K=32), D = 40
    p = make_patch(2, 3, 12, 20, 4, 40, dtype, kernel_device, cls=cls, bias=bias)
    PatchEmbed([p])()
    check(p)


@pytest.mark.parametrize("P,block_k", [(16, 32), (16, 16), (14, 32), (32, 32)])
def test_patch_real_patch_sizes(P, block_k, kernel_device):
    # power-of-two patches take the unmasked K path; 14 (ViT-L/14) the masked one
    p = make_patch(1, 3, 2 * P, 3 * P, P, 40, torch.float16, kernel_device)
    PatchEmbed([p], block_k=block_k)()
    check(p)


def test_patch_pixel_layouts_and_dtypes(kernel_device):
    a = make_patch(3, 3, 14, 7, 7, 72, torch.float16, kernel_device, pix_dtype=torch.float16, channels_last=True)
    b = make_patch(1, 3, 14, 21, 7, 96, torch.float16, kernel_device, pix_dtype=torch.float16, cls=False)
    PatchEmbed([a, b])()
    check(a)
    check(b)


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_token(ids_dtype, kernel_device):
    p = make_token(3, 77, 1000, 72, torch.float16, kernel_device, ids_dtype=ids_dtype, l_max=80, ids_pad=3)
    TokenEmbed([p])()
    check(p)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_both_towers_one_launch(dtype, kernel_device):
    dev = kernel_device
    patches = [make_patch(2, 3, 16, 16, 8, 40, dtype, dev), make_patch(1, 3, 8, 24, 8, 96, dtype, dev, cls=False)]
    tokens = [make_token(2, 13, 50, 40, dtype, dev), make_token(1, 1, 7, 96, dtype, dev, ids_dtype=torch.int32),
              make_token(3, 5, 30, 72, dtype, dev)]
    op = Embeddings(patches, tokens)
    op()
    for p in patches + tokens:
        check(p)
    assert len(op.outputs) == 5


def test_repeat_and_static_buffers(kernel_device):
    dev = kernel_device
    patch = make_patch(2, 3, 16, 16, 8, 40, torch.float16, dev)
    tok = make_token(2, 9, 50, 40, torch.float16, dev)
    op = Embeddings([patch], [tok])
    op()
    first = [patch.out.clone(), tok.out.clone()]
    op()
    assert torch.equal(patch.out, first[0]) and torch.equal(tok.out, first[1])
    patch.pixel_values.copy_(torch.randn_like(patch.pixel_values))
    tok.input_ids.copy_(torch.randint(0, 50, tok.input_ids.shape, device=dev))
    patch.out.fill_(float("nan"))
    tok.out.fill_(float("nan"))
    op()
    check(patch)
    check(tok)


def test_convenience(kernel_device):
    dev = kernel_device
    pix = torch.randn(2, 3, 8, 8, device=dev)
    w = torch.randn(40, 3, 4, 4, device=dev, dtype=torch.float16) * 0.1
    cls = torch.randn(40, device=dev, dtype=torch.float16)
    pos = torch.randn(5, 40, device=dev, dtype=torch.float16)
    out = patch_embed(pix, w, None, cls, pos, 4)
    check(PatchEmbedProblem(pix, w.reshape(40, -1), None, cls, pos, out, 4))
    ids = torch.randint(0, 20, (2, 5), device=dev)
    tw = torch.randn(20, 40, device=dev, dtype=torch.float16)
    out2 = token_embed(ids, tw, pos)
    check(TokenEmbedProblem(ids, tw, pos, out2))


@pytest.mark.parametrize("H,W", [(14, 19), (9, 8)])
def test_patch_not_multiple(H, W, kernel_device):
    # H, W not multiples of the patch: like a stride-p conv, the last H % p rows / W % p columns are not read
    # (SigLIP so400m: 384 px at patch 14 -> 27x27 patches)
    p = make_patch(2, 3, H, W, 4, 40, torch.float16, kernel_device)
    PatchEmbed([p])()
    check(p)


def test_bad_inputs(kernel_device):
    dev = kernel_device
    p = make_patch(1, 3, 8, 8, 4, 40, torch.float16, dev)
    t = make_token(1, 5, 10, 40, torch.float16, dev)
    with pytest.raises(ValueError, match="at least one"):
        Embeddings([], [])
    with pytest.raises(ValueError, match="at least patch_size"):
        PatchEmbed([PatchEmbedProblem(torch.randn(1, 3, 3, 8, device=dev), p.weight, p.bias, p.class_embedding,
                                      p.pos_embedding, p.out, 4)])
    with pytest.raises(ValueError, match="pos_embedding"):
        PatchEmbed([PatchEmbedProblem(p.pixel_values, p.weight, p.bias, p.class_embedding,
                                      p.pos_embedding[:4], p.out, 4)])
    with pytest.raises(ValueError, match="weight"):
        PatchEmbed([PatchEmbedProblem(p.pixel_values, p.weight[:, :47], p.bias, p.class_embedding,
                                      p.pos_embedding, p.out, 4)])
    with pytest.raises(ValueError, match="input_ids"):
        TokenEmbed([TokenEmbedProblem(t.input_ids.float(), t.token_weight, t.pos_embedding, t.out)])
    with pytest.raises(ValueError, match="pos_embedding"):
        TokenEmbed([TokenEmbedProblem(t.input_ids, t.token_weight, t.pos_embedding[:4], t.out)])
    with pytest.raises(ValueError, match="dtype"):
        TokenEmbed([TokenEmbedProblem(t.input_ids, t.token_weight.float(), t.pos_embedding, t.out)])
    with pytest.raises(ValueError, match="PatchEmbedProblem"):
        Embeddings([t], [])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch", [1, 32])
def test_gpu_real_sizes(dtype, batch):
    patches = [make_patch(batch, 3, 224, 224, 32, 768, dtype, "cuda"),
               make_patch(batch, 3, 224, 224, 14, 1024, dtype, "cuda"),
               make_patch(batch, 3, 224, 224, 16, 768, dtype, "cuda", cls=False)]
    tokens = [make_token(batch, 77, 49408, 512, dtype, "cuda"), make_token(batch, 64, 32000, 768, dtype, "cuda")]
    op = Embeddings(patches, tokens)
    op()
    for p in patches + tokens:
        check(p)
    g = capture_graph(op)
    for p in patches + tokens:
        p.out.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    for p in patches + tokens:
        check(p)


@pytest.mark.parametrize("bad_id", [-1, 1000, 10**9])
def test_out_of_vocabulary_ids_are_flagged_not_read(bad_id, kernel_device):
    """An id outside [0, V) sets bad_ids on the device (no host sync in the launch), reads row 0 instead of
    memory outside the table, and raise_on_bad_ids reports it once and resets the flag."""
    good = make_token(2, 9, 1000, 40, torch.float16, kernel_device)
    bad = make_token(3, 7, 1000, 40, torch.float16, kernel_device)
    bad.input_ids[1, 4] = bad_id
    op = TokenEmbed([good, bad])
    op.raise_on_bad_ids()  # nothing run yet: no error
    op()
    assert int(op.bad_ids.item()) == 1
    assert not torch.isnan(bad.out).any()
    torch.testing.assert_close(bad.out[1, 4].float(), (bad.token_weight[0] + bad.pos_embedding[4]).float(),
                               atol=1e-2, rtol=1e-2)
    check(good)  # the other problem is unaffected
    with pytest.raises(ValueError, match=r"out of the vocabulary.*table of 1000"):
        op.raise_on_bad_ids()
    assert int(op.bad_ids.item()) == 0
    bad.input_ids[1, 4] = 5
    op()
    op.raise_on_bad_ids()  # valid again: no error
    check(bad)

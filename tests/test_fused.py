"""The fused executor on CPU (Triton interpreter) against the fp32 reference, every family."""
import copy

import pytest
import torch
import torch.nn.functional as F

import dualfuse
from dualfuse import executors, reference
from dualfuse.adapters import to_spec
from dualfuse.executors.dropin import FusedModel
from dualfuse.executors.fused import FusedExecutor, unsupported_reason

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # as tests/conftest.py: interpreter on CPU

FAMILIES = ["clip-tiny", "siglip-tiny", "open_clip-tiny"]
NO_OPEN_CLIP = "open_clip is not installed here (pip install 'dualfuse[openclip]')"


def _inputs(spec, bi, bt, text_len=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    v, t = spec.vision, spec.text
    L = text_len or t.context_length
    px = torch.randn(bi, v.embed.channels, v.embed.image_size, v.embed.image_size, generator=g)
    ids = torch.randint(2, t.embed.vocab_size - 1, (bt, L), generator=g)
    eos = t.eos_token_id if t.eos_token_id is not None else t.embed.vocab_size - 1
    for i in range(bt):  # EOS at a different position in every text
        pos = (2 + 3 * i) % L
        ids[i, pos] = eos
        ids[i, pos + 1:] = 1
    return px, ids


def _check(out, ref):
    cos = F.cosine_similarity(out.float(), ref.float(), dim=-1)
    assert cos.min().item() >= 0.999, cos
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel <= 1e-2, rel


# the fast tier runs clip-tiny; the other families are slow
@pytest.fixture(scope="module", params=[f if f == "clip-tiny" else pytest.param(f, marks=pytest.mark.slow)
                                        for f in FAMILIES])
def family(request):
    if request.param.startswith("open_clip"):
        pytest.importorskip("open_clip", reason=NO_OPEN_CLIP)
    model = dualfuse.load(request.param)
    return request.param, model, to_spec(model)


def test_fused_matches_reference_odd_batches(family):
    name, model, spec = family
    before = copy.deepcopy(model.state_dict())
    ex = executors.get("fused", model, dtype=torch.float16, device=KERNEL_DEVICE)
    px, ids = _inputs(spec, 3, 7)
    img, txt = ex.encode(px.to(KERNEL_DEVICE), ids.to(KERNEL_DEVICE))
    ref_img, ref_txt = reference.encode(spec, px, ids)
    _check(img.cpu(), ref_img)
    _check(txt.cpu(), ref_txt)
    # same zero-shot argmax where the reference's top-2 margin exceeds the error
    per_image, _ = ex.logits(img, txt)
    ref_per_image, _ = reference.logits(spec, ref_img, ref_txt)
    top2 = ref_per_image.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.05 * ref_per_image.abs().max()
    assert torch.equal(per_image.float().cpu().argmax(-1)[clear], ref_per_image.argmax(-1)[clear])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and next(model.parameters()).dtype == torch.float32


@pytest.mark.slow
def test_fused_one_tower_calls_and_short_texts(family):
    name, model, spec = family
    ex = executors.get("fused", model, dtype=torch.float16, device=KERNEL_DEVICE)
    px, ids = _inputs(spec, 2, 3, text_len=spec.text.context_length - 3, seed=1)
    _check(ex.encode_image(px.to(KERNEL_DEVICE)).cpu(), reference.encode_image(spec, px))
    _check(ex.encode_text(ids.to(KERNEL_DEVICE)).cpu(), reference.encode_text(spec, ids))
    # image-only and text-only calls have plans of their own
    keys = set(ex.runners)
    # a causal text tower runs the short texts at their length bucket (test_buckets.py), SigLIP at the exact length
    assert (2, 0, spec.text.context_length) in keys and (0, 3, ex.text_bucket(spec.text.context_length - 3)) in keys
    assert all(s.towers == ("vision",) for s in ex.runners[(2, 0, spec.text.context_length)].plan.stages)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["clip-tiny", "siglip-tiny"])
def test_fold_ln_on_matches_off_and_drops_unfolded_weights(name):
    """Vertical fusion on and off give the same embeddings to rounding; with it on, the plan has no
    LN launch before a GEMM and the executor keeps no second copy of the QKV / FC1 weights."""
    model = dualfuse.load(name)
    spec = to_spec(model)
    px, ids = _inputs(spec, 2, 3, seed=5)
    px, ids = px.to(KERNEL_DEVICE), ids.to(KERNEL_DEVICE)
    on = FusedExecutor(model, dtype=torch.float16, device=KERNEL_DEVICE, fold_ln=True)
    off = FusedExecutor(model, dtype=torch.float16, device=KERNEL_DEVICE, fold_ln=False)
    (ia, ta), (ib, tb) = on.encode(px, ids), off.encode(px, ids)
    ref_img, ref_txt = reference.encode(spec, px.cpu(), ids.cpu())
    for a, b, ref in ((ia, ib, ref_img), (ta, tb, ref_txt)):
        _check(a.cpu(), ref)
        _check(b.cpu(), ref)
        _check(a.cpu(), b.float().cpu())
    ops_on = [st.op for s in on.runners[(2, 3, ids.shape[1])].plan.stages for st in s.steps]
    ops_off = [st.op for s in off.runners[(2, 3, ids.shape[1])].plan.stages for st in s.steps]
    # layer 0's LN reads the embeddings (no GEMM statistics): it stays a LayerNorm launch; every other folds
    assert ops_on.count("ln1") == 2 and "ln2" not in ops_on and "ln1_qkv" in ops_on and "ln2_fc1" in ops_on
    assert "ln1" in ops_off and "ln1_qkv" not in ops_off
    assert len(ops_off) - len(ops_on) == 2 * (spec.vision.num_layers + spec.text.num_layers) - 2 + (
        2 if spec.vision.pool_head is not None else 0)
    for tower in (on.weights.vision, on.weights.text):
        assert tower.blocks[0].qkv is not None and all(b.qkv is None for b in tower.blocks[1:])
        assert all(b.fc1 is None for b in tower.blocks)
    assert all(b.qkv is not None for b in off.weights.vision.blocks)
    # the folded GEMMs merge statistics that the GEMMs writing the residual stream left (no pass over x)
    r = on.runners[(2, 3, ids.shape[1])]
    folded_ops = [op for op, st in zip(r.ops, r.plan.stages) if any(x.op == "ln2_fc1" for x in st.steps)]
    assert folded_ops and all(p.norm.stats is not None for op in folded_ops for p in op.problems)
    with pytest.raises(ValueError, match="fold_ln must be None"):
        FusedExecutor(model, dtype=torch.float16, device=KERNEL_DEVICE, fold_ln="yes")
    # auto: folded where launches run without PDL (sm_80/87, the interpreter, pdl=False) and the residual
    # stream has the model dtype
    from dualfuse.kernels._utils import pdl_supported

    no_pdl = not pdl_supported(torch.device(KERNEL_DEVICE))
    assert FusedExecutor(model, dtype=torch.float16, device=KERNEL_DEVICE).fold_ln == no_pdl
    assert FusedExecutor(model, dtype=torch.float16, device=KERNEL_DEVICE, pdl=False).fold_ln
    assert not FusedExecutor(model, dtype=torch.bfloat16, device=KERNEL_DEVICE).fold_ln  # fp32 residual stream


@pytest.mark.slow
def test_runner_cache_is_bounded_and_replays_are_stable():
    model = dualfuse.load("clip-tiny")
    spec = to_spec(model)
    ex = FusedExecutor(model, dtype=torch.float16, device=KERNEL_DEVICE, max_graphs=2)
    px, ids = _inputs(spec, 1, 2, seed=2)
    px, ids = px.to(KERNEL_DEVICE), ids.to(KERNEL_DEVICE)
    first = ex.encode(px, ids)
    again = ex.encode(px, ids)  # the residual stream is updated in place: a rerun must not accumulate
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    ex.encode_image(px)
    ex.encode_text(ids)
    assert len(ex.runners) == 2 and (1, 2, spec.text.context_length) not in ex.runners


@pytest.mark.slow
def test_drop_in_hf_calls_match_source_model():
    model = dualfuse.load("siglip-tiny")
    spec = to_spec(model)
    fused = dualfuse.fuse(model, dtype=torch.float16, device=KERNEL_DEVICE)
    assert isinstance(fused, FusedModel)
    px, ids = _inputs(spec, 2, 3, seed=3)
    with torch.no_grad():
        src = model(pixel_values=px, input_ids=ids)
        src_img = model.get_image_features(pixel_values=px).pooler_output
    out = fused(input_ids=ids.to(KERNEL_DEVICE), pixel_values=px.to(KERNEL_DEVICE))
    assert out.logits_per_image.shape == src.logits_per_image.shape
    assert (out.logits_per_image.float().cpu() - src.logits_per_image).abs().max() < 0.05 * src.logits_per_image.abs().max()
    _check(fused.get_image_features(pixel_values=px.to(KERNEL_DEVICE)).pooler_output.cpu(), src_img)
    _check(out.text_embeds.cpu(), F.normalize(src.text_embeds, dim=-1))
    padded = torch.ones_like(ids)
    padded[:, -1] = 0  # SigLIP's text tower would mask that token: refused (an all-ones mask is accepted)
    with pytest.raises(ValueError, match="attention_mask with padding"):
        fused.get_text_features(input_ids=ids.to(KERNEL_DEVICE), attention_mask=padded.to(KERNEL_DEVICE))


@pytest.mark.slow
def test_drop_in_open_clip_call():
    pytest.importorskip("open_clip", reason=NO_OPEN_CLIP)
    model = dualfuse.load("open_clip-tiny")
    spec = to_spec(model)
    fused = dualfuse.fuse(model, dtype=torch.float16, device=KERNEL_DEVICE)
    px, ids = _inputs(spec, 2, 2, seed=4)
    with torch.no_grad():
        img, txt, scale = model(px, ids)
    f_img, f_txt, f_scale = fused(px.to(KERNEL_DEVICE), ids.to(KERNEL_DEVICE))
    _check(f_img.cpu(), img)
    _check(f_txt.cpu(), txt)
    assert abs(f_scale.item() - scale.item()) < 1e-3 * scale.item()
    _check(fused.encode_image(px.to(KERNEL_DEVICE), normalize=True).cpu(), img)


def test_fused_validates_inputs():
    model = dualfuse.load("clip-tiny")
    ex = FusedExecutor(model, dtype=torch.float16, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match="pixel_values"):
        ex.encode_image(torch.randn(1, 3, 31, 31, device=KERNEL_DEVICE))
    with pytest.raises(ValueError, match="input_ids"):
        ex.encode_text(torch.full((1, 5), 100, device=KERNEL_DEVICE))


@pytest.mark.slow
def test_fused_checks_token_ids_in_the_graph_and_recovers():
    """Out-of-vocabulary ids are caught by the embedding kernel's flag (no read-back before the forward), the
    call raises, and the same cached runner then serves valid ids correctly."""
    model = dualfuse.load("clip-tiny")
    spec = to_spec(model)
    ex = FusedExecutor(model, dtype=torch.float16, device=KERNEL_DEVICE)
    px, ids = _inputs(spec, 1, 2, seed=6)
    px, ids = px.to(KERNEL_DEVICE), ids.to(KERNEL_DEVICE)
    vocab = spec.text.embed.vocab_size
    bad = ids.clone()
    bad[1, 0] = vocab + 7
    with pytest.raises(ValueError, match=rf"out of the vocabulary.*\[1, {vocab + 7}\]"):
        ex.encode(px, bad)
    img, txt = ex.encode(px, ids)  # same shape: same runner, flag was reset
    assert len(ex.runners) == 1
    _check(txt.cpu(), reference.encode_text(spec, ids.cpu()))
    _check(img.cpu(), reference.encode_image(spec, px.cpu()))
    unchecked = FusedExecutor(model, dtype=torch.float16, device=KERNEL_DEVICE, check_ids=False)
    unchecked.encode(px, bad)  # the caller opted out: no error (and no out-of-bounds read)


def test_unsupported_config_reason_and_fallback_rules():
    spec = to_spec(dualfuse.load("clip-tiny"))
    spec.vision.heads = 1
    spec.vision.width = 256  # head dim 256 > 128: shape bookkeeping only, no kernel runs
    assert "head dim 256" in unsupported_reason(spec, torch.float16, torch.device(KERNEL_DEVICE))
    if KERNEL_DEVICE == "cpu":
        with pytest.raises(ValueError, match="cannot run this model: vision head dim 256"):
            FusedExecutor(spec, dtype=torch.float16, device="cpu")


def test_bf16_under_the_interpreter_falls_back_with_the_reason(monkeypatch):
    """Triton's CPU interpreter computes bf16 dots wrongly (cosine < 0 against the source model): the fused kernels
    are not used there, with the reason, instead of giving silently wrong embeddings."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = dualfuse.load("clip-tiny")
    spec = to_spec(model)
    assert "interpreter" in unsupported_reason(spec, torch.bfloat16, torch.device("cpu"))
    assert unsupported_reason(spec, torch.float16, torch.device("cpu")) is None
    with pytest.warns(UserWarning, match="computes bf16 dot products wrongly.*falling back to the 'eager'"):
        ex = FusedExecutor(model, dtype=torch.bfloat16, device="cpu")
    assert ex.fallback is not None
    with pytest.raises(ValueError, match=r"cannot run this model \(fallback=False\).*bf16"):
        FusedExecutor(model, dtype=torch.bfloat16, device="cpu", fallback=False)


REAL_PRESETS = ["clip-vit-b-32", "clip-vit-b-16", "clip-vit-l-14", "siglip-base-patch16-224"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", REAL_PRESETS)
def test_fused_real_presets_gpu(name, dtype):
    """Issue #4 on the GPU: every preset, odd batches, one-tower calls, fp16 and bf16."""
    model = dualfuse.load(name)
    spec = to_spec(model)
    ex = executors.get("fused", model, dtype=dtype, device="cuda")
    px, ids = _inputs(spec, 3, 7)
    ref = spec.to("cuda", torch.float32)
    img, txt = ex.encode(px.cuda(), ids.cuda())
    _check(img, reference.encode_image(ref, px.cuda()))
    _check(txt, reference.encode_text(ref, ids.cuda()))
    _check(ex.encode_text(ids[:2].cuda()), reference.encode_text(ref, ids[:2].cuda()))


@pytest.mark.gpu
def test_unsupported_model_falls_back_to_graph_with_a_warning_gpu(monkeypatch):
    import dualfuse.executors.fused.executor as fused_mod  # the module whose coverage check reads it

    model = dualfuse.load("clip-tiny")
    monkeypatch.setattr(fused_mod, "MAX_HEAD_DIM", 8)  # pretend the kernels cover less than head dim 16
    with pytest.warns(UserWarning, match="head dim 16 > 8; falling back to the 'graph' executor"):
        ex = FusedExecutor(model, dtype=torch.float16, device="cuda")
    assert ex.fallback is not None and "FALLBACK" in ex.notes
    spec = to_spec(model)
    px, ids = _inputs(spec, 2, 2)
    img, _ = ex.encode(px.cuda(), ids.cuda())
    _check(img, reference.encode_image(spec.to("cuda", torch.float32), px.cuda()))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["clip-vit-b-32", "siglip-base-patch16-224"])
def test_fused_fold_ln_real_presets_gpu(name):
    """Vertical fusion (LN folded into QKV / FC1, and SigLIP's head) on the GPU's real configs."""
    model = dualfuse.load(name)
    spec = to_spec(model)
    ex = FusedExecutor(model, dtype=torch.float16, device="cuda", fold_ln=True)
    px, ids = _inputs(spec, 3, 7)
    ref = spec.to("cuda", torch.float32)
    img, txt = ex.encode(px.cuda(), ids.cuda())
    _check(img, reference.encode_image(ref, px.cuda()))
    _check(txt, reference.encode_text(ref, ids.cuda()))


@pytest.mark.slow
def test_residual_stream_dtype_options():
    """The residual stream: fp32 by default for bf16 models, the model dtype for fp16 ones, either on request;
    LN folding needs the model dtype there."""
    model = dualfuse.load("clip-tiny")
    spec = to_spec(model)
    px, ids = _inputs(spec, 2, 2, seed=7)
    px, ids = px.to(KERNEL_DEVICE), ids.to(KERNEL_DEVICE)
    ref_img, ref_txt = reference.encode(spec, px.cpu(), ids.cpu())
    default = FusedExecutor(model, dtype=torch.float16, device=KERNEL_DEVICE)
    assert default.residual_dtype == torch.float16
    assert FusedExecutor(model, dtype=torch.bfloat16, device=KERNEL_DEVICE).residual_dtype == torch.float32
    wide = FusedExecutor(model, dtype=torch.float16, device=KERNEL_DEVICE, residual_dtype=torch.float32)
    for ex in (default, wide):
        img, txt = ex.encode(px, ids)
        _check(img.cpu(), ref_img)
        _check(txt.cpu(), ref_txt)
        r = ex.runners[(2, 2, ids.shape[1])]
        assert r.buf["vision"].x.dtype == ex.residual_dtype and r.buf["vision"].h.dtype == torch.float16
    assert FusedExecutor(model, dtype=torch.float16, device=KERNEL_DEVICE, fold_ln=True).residual_dtype == torch.float16
    with pytest.raises(ValueError, match="fold_ln=True needs residual_dtype"):
        FusedExecutor(model, dtype=torch.float16, device=KERNEL_DEVICE, fold_ln=True, residual_dtype=torch.float32)
    with pytest.raises(ValueError, match="residual_dtype must be"):
        FusedExecutor(model, dtype=torch.float16, device=KERNEL_DEVICE, residual_dtype="fp32")


def test_stage_with_mixed_dtypes_runs_as_one_launch_per_dtype_pair():
    from dualfuse.executors.fused.runner import in_dtype_groups
    from dualfuse.kernels.gemm import GroupedLinear, LinearProblem

    dev = KERNEL_DEVICE
    x = torch.randn(5, 32, device=dev, dtype=torch.float16)
    w = torch.randn(16, 32, device=dev, dtype=torch.float16) / 6
    outs = [torch.full((5, 16), float("nan"), device=dev, dtype=dt) for dt in (torch.float32, torch.float16)]
    built = []

    def build(ps):
        built.append(len(ps))
        return GroupedLinear(ps)

    op = in_dtype_groups([LinearProblem(x, w, o) for o in outs], build)
    assert built == [1, 1]
    op()
    ref = x.float() @ w.float().T
    for o in outs:
        torch.testing.assert_close(o.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.slow
def test_executor_plan_is_the_plan_its_calls_run():
    """FusedExecutor.plan(...) gives the stages a call of that shape launches, LayerNorm folding included."""
    model = dualfuse.load("clip-tiny")
    spec = to_spec(model)
    px, ids = (t.to(KERNEL_DEVICE) for t in _inputs(spec, 1, 2, seed=5))
    for fold in (False, True):
        ex = FusedExecutor(model, dtype=torch.float16, device=KERNEL_DEVICE, fold_ln=fold)
        ex.encode(px, ids)
        ran = ex.runners[(1, 2, ids.shape[1])].plan
        assert [s.kind for s in ex.plan(1, 2, ids.shape[1]).stages] == [s.kind for s in ran.stages]
        assert ex.plan(1, 2, ids.shape[1]) == ran


@pytest.mark.slow
@pytest.mark.parametrize("name", ["clip-tiny", "siglip-tiny"])
def test_deferred_split_reduction_matches_in_kernel_reduction(name):
    """An FC2 that splits K leaves its partial sums to the next LayerNorm launch (defer_split_reduce, the
    default): the same sums in the same order, so the embeddings equal those of the in-kernel reduction bit for
    bit. Splits are forced here (tiny models: too few tiles to split otherwise)."""
    from dualfuse.kernels.gemm import GroupedLinear
    from dualfuse.kernels.layernorm import GroupedLayerNorm

    model = dualfuse.load(name)
    spec = to_spec(model)
    px, ids = _inputs(spec, 2, 3, seed=7)
    px, ids = px.to(KERNEL_DEVICE), ids.to(KERNEL_DEVICE)
    kw = dict(dtype=torch.float16, device=KERNEL_DEVICE, fold_ln=False, gemm_config={"num_sms": 128, "min_k_iters": 1})
    on, off = FusedExecutor(model, **kw), FusedExecutor(model, defer_split_reduce=False, **kw)
    (ia, ta), (ib, tb) = on.encode(px, ids), off.encode(px, ids)
    assert torch.equal(ia, ib) and torch.equal(ta, tb)
    ref_img, ref_txt = reference.encode(spec, px.cpu(), ids.cpu())
    _check(ia.cpu(), ref_img)
    _check(ta.cpu(), ref_txt)
    r_on, r_off = on.runners[(2, 3, ids.shape[1])], off.runners[(2, 3, ids.shape[1])]
    partial = [p for op in r_on.ops if isinstance(op, GroupedLinear) for p in op.problems if p.partial_sums]
    adding = [p for op in r_on.ops if isinstance(op, GroupedLayerNorm) for p in op.problems if p.add is not None]
    # every out-proj (-> ln2) and every FC2 but the last layer's (-> the pooled head LN, a row gather; SigLIP's
    # vision head LN is a plain LN, but its launch pairs with the text FC2's fp16 out) of both towers
    layers = spec.vision.num_layers + spec.text.num_layers
    assert len(partial) == len(adding) == layers + (layers - 2)
    assert {p.out.data_ptr() for p in partial} == {p.add.data_ptr() for p in adding}
    assert not any(p.partial_sums for op in r_off.ops if isinstance(op, GroupedLinear) for p in op.problems)
    with pytest.raises(ValueError, match="defer_split_reduce must be True or False"):
        FusedExecutor(model, dtype=torch.float16, device=KERNEL_DEVICE, defer_split_reduce=1)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["clip-vit-b-32", "siglip-base-patch16-224"])
def test_deferred_split_reduction_real_presets_gpu(name):
    """At batch 1 the default tiles split the FC2s' K: the runner defers their reduction to the LayerNorm
    launches where the card runs them (no LN folding) and gives the embeddings of the in-kernel reduction."""
    from dualfuse.kernels.gemm import GroupedLinear

    model = dualfuse.load(name)
    spec = to_spec(model)
    px, ids = _inputs(spec, 1, 1, seed=3)
    px, ids = px.cuda(), ids.cuda()
    on = FusedExecutor(model, dtype=torch.float16, device="cuda", fold_ln=False)
    off = FusedExecutor(model, dtype=torch.float16, device="cuda", fold_ln=False, defer_split_reduce=False)
    (ia, ta), (ib, tb) = on.encode(px, ids), off.encode(px, ids)
    torch.testing.assert_close(ia, ib, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(ta, tb, atol=1e-3, rtol=1e-3)
    ref_img, ref_txt = reference.encode(spec, px.cpu(), ids.cpu())
    _check(ia.cpu(), ref_img)
    _check(ta.cpu(), ref_txt)
    r = on.runners[(1, 1, ids.shape[1])]
    n_partial = sum(p.partial_sums for op in r.ops if isinstance(op, GroupedLinear) for p in op.problems)
    splits_off = [s for op in off.runners[(1, 1, ids.shape[1])].ops if isinstance(op, GroupedLinear)
                  for p, s in zip(op.problems, op.splits) if p.weight.shape[1] == p.x.shape[1] and s > 1]
    print(f"{name}: {n_partial} GEMM problems deferred; split problems without deferral: {len(splits_off)}")
    if name == "clip-vit-b-32":  # its FC2s split at batch 1 (benchmarks/NOTES-gemm.md)
        assert n_partial >= (spec.vision.num_layers - 1) + (spec.text.num_layers - 1)

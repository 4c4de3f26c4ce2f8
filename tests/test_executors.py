"""Stock executors vs reference.py, the registry, and the user's model left untouched.

CPU: eager on every family; compile once per family (full Inductor on clip-tiny; on the other two families the
``aot_eager`` backend — open_clip's in test_compiled_graphs_are_not_shared_across_models, whose first model is
that check — which traces the same source forwards through Dynamo/AOTAutograd but skips Inductor's C++
code generation — cold Inductor builds cost 30-60 s per model on a 2-core machine). CUDA-only executors must refuse
the CPU clearly; on a GPU (@pytest.mark.gpu) every stock executor is checked against the fp32 reference.
"""
import copy

import pytest
import torch

import dualfuse
from dualfuse import executors, reference
from dualfuse.adapters import to_spec
from dualfuse.bench import random_inputs
from dualfuse.executors import ExecutorUnavailable, NeedsCUDA

FAMILIES = ["clip-tiny", "siglip-tiny", "open_clip-tiny"]
HAS_CUDA = torch.cuda.is_available()
_MODELS = {}


def model(name):
    if name.startswith("open_clip"):
        pytest.importorskip("open_clip", reason="open_clip is not installed here (pip install 'dualfuse[openclip]')")
    if name not in _MODELS:
        _MODELS[name] = dualfuse.load(name)
    return _MODELS[name]


def rel_err(a, b):
    return ((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm()).item()


def min_cos(a, b):
    return torch.nn.functional.cosine_similarity(a.double().cpu(), b.double().cpu(), dim=-1).min().item()


def reference_outputs(spec, px, ids):
    ref = spec.to(dtype=torch.float32)
    with torch.no_grad():
        img, txt = reference.encode(ref, px.float().cpu(), ids.cpu())
        return img, txt, reference.logits(ref, img, txt)


def check_matches(ex, bi=2, bt=3, tol=1e-4, seed=0):
    px, ids = random_inputs(ex.spec, bi, bt, sets=1, seed=seed, device=ex.device)[0]
    img_ref, txt_ref, (pi_ref, pt_ref) = reference_outputs(ex.spec, px, ids)
    img, txt = ex.encode(px, ids)
    assert img.shape == (bi, ex.spec.embed_dim) and txt.shape == (bt, ex.spec.embed_dim)
    assert img.dtype == ex.dtype and txt.dtype == ex.dtype and img.device == ex.device
    assert rel_err(img, img_ref) <= tol
    assert rel_err(txt, txt_ref) <= tol
    pi, pt = ex.logits(img, txt)
    assert pi.shape == (bi, bt) and pt.shape == (bt, bi)
    assert rel_err(pi, pi_ref) <= tol and rel_err(pt, pt_ref) <= tol
    return px, ids, img, txt


# --------------------------------------------------------------------------------------------- CPU

@pytest.mark.parametrize("name", FAMILIES)
def test_eager_matches_reference(name):
    ex = executors.get("eager", model(name), dtype="fp32", device="cpu")
    assert (ex.name, ex.needs_cuda, ex.dtype, ex.device) == ("eager", False, torch.float32, torch.device("cpu"))
    assert ex.spec.family == ex.family
    px, ids, img, txt = check_matches(ex)
    # the single-tower calls give the same as encode
    assert torch.allclose(ex.encode_image(px), img, rtol=1e-5, atol=1e-6)
    assert torch.allclose(ex.encode_text(ids), txt, rtol=1e-5, atol=1e-6)


def test_eager_logits_match_the_source_model():
    m = model("siglip-tiny")  # logit_bias and a non-trivial logit scale
    ex = executors.get("eager", m, dtype="fp32", device="cpu")
    px, ids = random_inputs(ex.spec, 2, 4, sets=1)[0]
    with torch.no_grad():
        want = m(pixel_values=px, input_ids=ids).logits_per_image
    per_image, per_text = ex.logits(*ex.encode(px, ids))
    assert rel_err(per_image, want) <= 1e-5
    assert torch.equal(per_text, per_image.T)


@pytest.mark.slow
@pytest.mark.parametrize("name,backend", [("clip-tiny", "inductor"), ("siglip-tiny", "aot_eager")])
def test_compile_matches_reference(name, backend):
    ex = executors.get("compile", model(name), dtype="fp32", device="cpu", backend=backend)
    assert ex.mode == "default" and "reduce-overhead needs CUDA" in ex.notes
    check_matches(ex, tol=1e-4)  # compiled kernels may reorder reductions


def test_compiled_graphs_are_not_shared_across_models():
    """Dynamo caches compiled code per function; a second executor must still run its own model's weights. The
    first (seed 0) is also open_clip's compile-vs-reference check."""
    pytest.importorskip("open_clip", reason="open_clip is not installed here (pip install 'dualfuse[openclip]')")
    for seed in (0, 1):
        ex = executors.get("compile", dualfuse.load("open_clip-tiny", seed=seed), dtype="fp32", device="cpu",
                           backend="aot_eager")
        assert ex.mode == "default" and "reduce-overhead needs CUDA" in ex.notes
        check_matches(ex, seed=seed)


def test_user_model_is_untouched():
    m = model("open_clip-tiny")
    before = copy.deepcopy(m.state_dict())
    dtypes = {p.dtype for p in m.parameters()}
    training = m.training
    grads = [p.requires_grad for p in m.parameters()]
    ex = executors.get("eager", m, dtype="fp16", device="cpu")
    executors.get("compile", m, dtype="bf16", device="cpu")
    assert ex.model is not m and ex.dtype == torch.float16
    assert all(p.dtype == torch.float16 for p in ex.model.parameters())
    px, ids = random_inputs(ex.spec, 1, 1, sets=1)[0]
    ex.encode(px, ids)
    after = m.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    assert {p.dtype for p in m.parameters()} == dtypes
    assert m.training == training and [p.requires_grad for p in m.parameters()] == grads
    # no storage shared between the executor's copy and the user's model
    theirs = {p.data_ptr() for p in m.parameters()}
    assert not theirs & {p.data_ptr() for p in ex.model.parameters()}


def test_preset_name_and_defaults():
    ex = executors.get("eager", "clip-tiny")
    assert ex.device == (torch.device("cuda", torch.cuda.current_device()) if HAS_CUDA else torch.device("cpu"))
    assert ex.dtype == (torch.float16 if HAS_CUDA else torch.float32)
    assert "eager" in repr(ex)


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("name", ["streams", "graph"])
def test_cuda_only_executors_refuse_the_cpu(name):
    assert executors.executor_class(name).needs_cuda
    with pytest.raises(NeedsCUDA, match=f"executor '{name}' needs a CUDA device.*eager, compile"):
        executors.get(name, model("clip-tiny"))
    with pytest.raises(NeedsCUDA, match="needs a CUDA device"):
        executors.get(name, model("clip-tiny"), device="cpu")


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without CUDA")
def test_cuda_device_without_cuda_is_clear():
    with pytest.raises(NeedsCUDA, match="CUDA is not available"):
        executors.get("eager", model("clip-tiny"), device="cuda")


def test_bad_dtype_and_device():
    with pytest.raises(ValueError, match="unsupported dtype 'int8'.*fp16, bf16, fp32"):
        executors.get("eager", model("clip-tiny"), dtype="int8", device="cpu")
    with pytest.raises(ValueError, match="invalid device 'gpu0'"):
        executors.get("eager", model("clip-tiny"), device="gpu0")


def test_spec_is_refused_by_source_executors():
    with pytest.raises(ValueError, match="runs the source model"):
        executors.get("eager", to_spec(model("clip-tiny")), device="cpu")


# --------------------------------------------------------------------------------------------- registry

def test_registry_lists_the_stock_executors_first():
    names = executors.names()
    assert names[:4] == ["eager", "streams", "graph", "compile"]
    assert executors.executor_class("compile").name == "compile"


def test_unknown_executor_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown executor 'nope'; known executors: eager, streams, graph, compile"):
        executors.get("nope", model("clip-tiny"))


def test_register_adds_an_executor(monkeypatch):
    monkeypatch.setattr(executors, "_REGISTRY", dict(executors._REGISTRY))

    @executors.register("twice")
    class Twice(executors.Executor):
        uses_source_model = False

        def _encode_image(self, px):
            return 2 * reference.encode_image(self.spec, px)

        def _encode_text(self, ids):
            return 2 * reference.encode_text(self.spec, ids)

    assert "twice" in executors.names()
    ex = executors.get("twice", to_spec(model("clip-tiny")), device="cpu")
    px, ids = random_inputs(ex.spec, 1, 1, sets=1)[0]
    img, _ = ex.encode(px, ids)
    assert torch.allclose(img, 2 * reference.encode_image(ex.spec, px))
    with pytest.raises(TypeError, match="Executor subclass"):
        executors.register("bad")(object)


def test_broken_module_is_listed_and_explains(monkeypatch):
    monkeypatch.setattr(executors, "_BROKEN", {"ghost": "cannot import dualfuse.executors.ghost: ImportError: boom"})
    assert "ghost" in executors.names()
    with pytest.raises(ExecutorUnavailable, match="'ghost' is unavailable.*boom"):
        executors.get("ghost", model("clip-tiny"))


# --------------------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("executor", ["eager", "streams", "graph", "compile"])
def test_cuda_executors_match_reference(executor, name):
    ex = executors.get(executor, model(name), dtype="fp16", device="cuda")
    # compile: one shape, both towers only (each new shape / entry point is another compilation)
    shapes = [(2, 3)] if executor == "compile" else [(2, 3), (1, 5)]
    for bi, bt in shapes:
        px, ids = random_inputs(ex.spec, bi, bt, sets=1, device="cuda", dtype=torch.float16)[0]
        img_ref, txt_ref, _ = reference_outputs(ex.spec, px, ids)
        img, txt = ex.encode(px, ids)
        torch.cuda.synchronize()
        assert img.dtype == torch.float16 and img.device.type == "cuda"
        for out, ref in ((img, img_ref), (txt, txt_ref)):
            assert min_cos(out, ref) >= 0.999
            assert rel_err(out, ref) <= 1e-2
        if executor != "compile":
            assert min_cos(ex.encode_image(px), img_ref) >= 0.999
            assert min_cos(ex.encode_text(ids), txt_ref) >= 0.999


@pytest.mark.gpu
def test_graph_cache_is_bounded_and_recaptures():
    ex = executors.get("graph", model("clip-tiny"), dtype="fp16", device="cuda", max_graphs=2)
    sets = {b: random_inputs(ex.spec, b, b + 1, sets=2, seed=b, device="cuda", dtype=torch.float16) for b in (1, 2, 3)}

    def check(b, k):
        px, ids = sets[b][k]
        img_ref, txt_ref, _ = reference_outputs(ex.spec, px, ids)
        img, txt = ex.encode(px, ids)
        assert min_cos(img, img_ref) >= 0.999 and min_cos(txt, txt_ref) >= 0.999
        return img

    first = check(1, 0)
    kept = first.clone()
    check(1, 1)  # same shape: replay with new inputs, no new capture
    assert ex.captures == 1
    assert torch.equal(first, kept)  # outputs are copies, not the graph's static buffers
    check(2, 0)  # batch change: a new graph
    assert ex.captures == 2 and len(ex.graphs) == 2
    check(3, 0)  # a third shape evicts the least recently used (batch 1)
    assert ex.captures == 3 and len(ex.graphs) == 2 and (1, 2, ex.spec.text.context_length) not in ex.graphs
    check(1, 1)  # re-captured after eviction, still right
    assert ex.captures == 4 and len(ex.graphs) == 2


@pytest.mark.gpu
def test_graph_executor_siglip2_naflex_mixed_grids():
    """Patch sequences (mixed grids, right padding) through the graph executor match the fp32 source model; a graph
    per (batch, patches, grids): new pixels on the same grids replay, other grids capture anew."""
    pytest.importorskip("transformers.models.siglip2")
    import warnings

    from dualfuse.spec import PatchSequence

    src = dualfuse.presets.load("siglip2-tiny", seed=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ex = executors.get("graph", src, dtype="fp16", device="cuda")
        io = ex.io
        dim, n = io.channels * io.patch_size ** 2, 20
        g = torch.Generator().manual_seed(12)

        def seq(grids):
            shapes = torch.tensor(grids)
            mask = (torch.arange(n)[None] < shapes.prod(-1)[:, None]).int()
            px = torch.randn(len(grids), n, dim, generator=g) * mask[..., None]
            return PatchSequence(px, shapes, mask)

        ids = torch.randint(0, io.vocab_size, (2, 7), generator=g)
        image_fn, text_fn = dualfuse.executors.base.source_forward(src.eval(), "hf_siglip2")
        calls = [seq([(4, 4), (2, 6), (5, 3)]), seq([(4, 4), (2, 6), (5, 3)]), seq([(3, 3)])]
        for k, s in enumerate(calls):
            with torch.no_grad():
                want_img, want_txt = image_fn(s), text_fn(ids)
            cuda = PatchSequence(*(t.cuda() for t in (s.pixel_values.half(), s.spatial_shapes, s.pixel_attention_mask)))
            img, txt = ex.encode(cuda, ids.cuda())
            assert min_cos(img, want_img.cuda()) >= 0.999 and rel_err(img, want_img.cuda()) <= 1e-2
            assert min_cos(txt, want_txt.cuda()) >= 0.999
            assert min_cos(ex.encode_image(cuda), want_img.cuda()) >= 0.999
    assert ex.naflex_mode in ("device", "host", "eager")
    if ex.naflex_mode == "eager":  # never silent: the image tower outside the graph is announced
        assert any("cannot capture" in str(w.message) for w in caught)
    else:
        # encode: grids A (twice: one capture), grids B; encode_image: grids A, grids B
        assert ex.captures == 4 and len(ex.graphs) == 4


@pytest.mark.gpu
def test_streams_outputs_usable_on_the_callers_stream():
    ex = executors.get("streams", model("open_clip-tiny"), dtype="fp16", device="cuda")
    px, ids = random_inputs(ex.spec, 4, 4, sets=1, device="cuda", dtype=torch.float16)[0]
    a = [ex.encode(px, ids) for _ in range(3)]
    torch.cuda.synchronize()
    assert all(torch.equal(a[0][0], x[0]) and torch.equal(a[0][1], x[1]) for x in a)

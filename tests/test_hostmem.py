"""Weight placement (dualfuse.hostmem) on the CPU path: the "copy" placement moves every weight a fused or stock
executor reads into separately allocated buffers, and the outputs through the Triton interpreter stay bit-identical.
On CUDA the "host" placement (pinned host memory mapped into the GPU) is checked the same way."""
import pytest
import torch

import dualfuse
from dualfuse import executors, hostmem
from dualfuse.adapters import to_spec
from dualfuse.spec import named_tensors

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(spec, bi=1, bt=1, seed=3):
    from dualfuse.bench import random_inputs
    return random_inputs(spec, bi, bt, sets=1, seed=seed, device=DEVICE,
                         dtype=torch.float16 if DEVICE == "cuda" else torch.float32)[0]


def _weights(ex):
    """Every tensor the fused GEMMs read, int8 / fp8 scales included (kept alive by the caller, so no address is
    reused meanwhile)."""
    out = []
    ex.weights.map_tensors(lambda t: out.append(t) or t)
    out += [t for lin, norm in ex.folded.values() for t in (lin.weight, lin.bias, lin.scale) if t is not None]
    return out


def _scales(ex):
    return [t for name, t in named_tensors(ex.weights) if name.endswith(".scale")]


def _ptrs(ts):
    return {t.data_ptr() for t in ts if t.numel()}


@pytest.fixture(scope="module")
def tiny():
    model = dualfuse.load("clip-tiny")
    return model, to_spec(model)


@pytest.mark.parametrize("weights", [None, pytest.param("int8", marks=pytest.mark.slow)])
def test_fused_copy_placement_bit_identical(tiny, weights):
    model, spec = tiny
    px, ids = _inputs(spec)
    kw = {"weights": weights} if weights else {}
    ex = executors.get("fused", model, device=DEVICE, spec=spec, use_graph=False, **kw)
    ref = ex.encode(px, ids)
    before = _weights(ex)
    moved = hostmem.place_executor(ex, "copy")
    assert moved > 0
    assert not (_ptrs(before) & _ptrs(_weights(ex))), "every fused weight now lives in a new buffer"
    if weights:  # the scales are the spec's (Linear.scale): placed with their weights
        assert _scales(ex) and not _ptrs(_scales(ex)) & _ptrs(before)
    assert ex.gemm_config.get("tma") is False and ex.config.gemm.tma is False
    out = ex.encode(px, ids)
    for a, b in zip(ref, out):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_fused_copy_placement_with_folded_layernorms(tiny):
    model, spec = tiny
    px, ids = _inputs(spec, bi=2, bt=1, seed=5)
    ex = executors.get("fused", model, device=DEVICE, spec=spec, use_graph=False, fold_ln=True, pdl=False)
    assert ex.folded
    ref = ex.encode(px, ids)
    old = {k: v[0] for k, v in ex.folded.items()}
    hostmem.place_executor(ex, "copy")
    assert all(ex.folded[k][0].weight.data_ptr() != w.weight.data_ptr() for k, w in old.items())
    out = ex.encode(px, ids)
    assert all(torch.equal(a, b) for a, b in zip(ref, out))


def test_eager_copy_placement_bit_identical(tiny):
    model, spec = tiny
    px, ids = _inputs(spec)
    ex = executors.get("eager", model, device=DEVICE, spec=spec)
    ref = ex.encode(px, ids)
    old = [p.data for p in ex.model.parameters()]
    ptrs = _ptrs(old)
    moved = hostmem.place_executor(ex, "copy")
    assert moved >= sum(p.numel() * p.element_size() for p in ex.model.parameters()) // 2
    assert not ptrs & {p.data_ptr() for p in ex.model.parameters()}
    out = ex.encode(px, ids)
    assert all(torch.equal(a, b) for a, b in zip(ref, out))


def test_subclass_weights_of_one_shape_stay_distinct():
    """Wrapper tensor subclasses (torchao's int8 weights) have no storage of their own: data_ptr() is 0 for every
    one, so placing them must not share one copy between weights of the same shape (it once did: torchao's row
    then computed with one layer's weights everywhere)."""
    from torch.testing._internal.two_tensor import TwoTensor

    a = TwoTensor(torch.randn(8, 8), torch.randn(8, 8))
    b = TwoTensor(torch.randn(8, 8), torch.randn(8, 8))
    assert a.data_ptr() == b.data_ptr()  # the trap
    p = hostmem.get_placement("copy")
    pa, pb = p.place(a), p.place(b)
    assert type(pa) is TwoTensor and pa is not pb
    for placed, src in ((pa, a), (pb, b)):
        assert torch.equal(placed.a, src.a) and torch.equal(placed.b, src.b)
        assert placed.a.data_ptr() != src.a.data_ptr()


def test_torchao_int8_model_copy_placement_exact():
    """torchao's int8 weight-only linears, placed: every layer keeps its own weights (outputs bit-identical)."""
    pytest.importorskip("torchao", reason="the torchao extra")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, 32))
    quantize_(model, Int8WeightOnlyConfig())
    x = torch.randn(3, 32)
    with torch.no_grad():
        ref = model(x)
        hostmem.place_module_params(model, "copy")
        out = model(x)
    assert torch.equal(ref, out)


def test_place_spec_leaves_source_and_copies_values(tiny):
    _, spec = tiny
    placed = hostmem.place_spec(spec, "copy")
    a, b = spec.vision.blocks[0].qkv.weight, placed.vision.blocks[0].qkv.weight
    assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    assert spec.vision.blocks[0].qkv.weight is a


def test_placement_errors():
    with pytest.raises(ValueError, match="unknown placement"):
        hostmem.get_placement("flash")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA device"):
            hostmem.get_placement("host")
        with pytest.raises(ValueError, match="needs a CUDA device"):
            hostmem.measure_weight_bandwidth(1 << 20)


def test_device_placement_moves_nothing(tiny):
    _, spec = tiny
    p = hostmem.get_placement("device")
    t = spec.vision.blocks[0].fc1.weight
    assert p.place(t) is t and p.placed_bytes == 0


@pytest.mark.gpu
def test_host_mapped_tensor_is_zero_copy_and_exact_gpu():
    w = torch.randn(512, 384, dtype=torch.float16)
    h = hostmem.host_mapped_like(w)
    assert h.device.type == "cuda" and hostmem.is_host_mapped(h)
    x = torch.randn(16, 512, device="cuda", dtype=torch.float16)
    assert torch.equal(x @ h, x @ w.cuda())


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["fused", "eager", "graph"])
def test_host_placement_bit_identical_gpu(tiny, name):
    model, spec = tiny
    px, ids = _inputs(spec)
    ex = executors.get(name, model, device="cuda", spec=spec)
    ref = ex.encode(px, ids)
    ex2 = executors.get(name, model, device="cuda", spec=spec)
    hostmem.place_executor(ex2, "host")
    out = ex2.encode(px, ids)
    assert all(torch.equal(a, b) for a, b in zip(ref, out))

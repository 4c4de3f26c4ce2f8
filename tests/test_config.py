"""FusedConfig / GemmConfig: validated once, keyword overrides over a config, JSON and one-line forms."""
import dataclasses

import pytest
import torch

import dualfuse
from dualfuse import FusedConfig, GemmConfig
from dualfuse.adapters import to_spec
from dualfuse.executors.fused import FusedExecutor

DEV = "cpu"


@pytest.mark.parametrize("kw, match", [
    (dict(max_graphs=0), "max_graphs must be >= 1"),
    (dict(fold_ln="yes"), "fold_ln must be None"),
    (dict(pdl=1), "pdl must be True or False"),
    (dict(defer_split_reduce=None), "defer_split_reduce must be True or False"),
    (dict(residual_dtype=torch.int8), "residual_dtype must be"),
    (dict(text_buckets="many"), "text_buckets must be 'auto'"),
    (dict(text_buckets=(0, 8)), "text_buckets: expected positive int"),
    (dict(weights="int4"), "weights must be None or one of"),
    (dict(gemm={"BLOCK_Q": 3}), "gemm_config must be a dict of GroupedLinear config keys"),
    (dict(gemm={"widen": "cast"}), "config widen must be"),
    (dict(gemm="fast"), "gemm must be a GemmConfig"),
    (dict(warmup=5), "warmup: expected a list of"),
    (dict(gemm_impl="cublas"), "gemm_impl must be 'auto', 'triton' or 'library'"),
    (dict(calibration=3), "calibration must be None, a path or a dualfuse.calibration.Calibration"),
    (dict(gemm_impl="triton", calibration="cal.json"), "calibration is read only with gemm_impl='auto'"),
    (dict(gemm={"regime": "slow"}), "config regime must be a Regime"),
    (dict(hidden_states="last"), "hidden_states: expected a tuple of layer indices"),
    (dict(hidden_states=(1.5,)), "hidden_states: expected a tuple of layer indices"),
    (dict(pooled="yes"), "pooled must be None"),
])
def test_bad_options_raise_at_construction(kw, match):
    with pytest.raises(ValueError, match=match):
        FusedConfig(**kw)


def test_gemm_config_checks_its_values():
    with pytest.raises(ValueError, match="BLOCK_N must be a power of two"):
        GemmConfig(BLOCK_N=48)
    with pytest.raises(ValueError, match="prefetch must be False or an int"):
        GemmConfig(prefetch=-1)
    g = GemmConfig(BLOCK_M=32, tma=False, prefetch=False)
    assert g.to_dict() == {"BLOCK_M": 32, "tma": False, "prefetch": False}
    assert GemmConfig.from_dict(g.to_dict()) == g


def test_normalized_values_and_forms():
    c = FusedConfig(weights=None, text_buckets=[8, 4], warmup=(1, 1, 8), image_mean=torch.tensor([0.25, 0.5, 0.75]),
                    gemm={"num_sms": 64}, residual_dtype=torch.float32)
    assert c.weights == "fp16" and c.text_buckets == (8, 4) and c.warmup == ((1, 1, 8),)
    assert c.image_mean == (0.25, 0.5, 0.75) and c.gemm == GemmConfig(num_sms=64)
    for off in (None, False, ()):
        assert FusedConfig(text_buckets=off).text_buckets is None
    d = c.to_dict()
    assert d["residual_dtype"] == "fp32" and d["gemm"] == {"num_sms": 64} and d["warmup"] == [[1, 1, 8]]
    assert set(d) == {f.name for f in dataclasses.fields(FusedConfig)}
    assert FusedConfig().describe() == "defaults"
    line = FusedConfig(weights="int8", pdl=False, gemm=GemmConfig(tma=False)).describe()
    assert line == "pdl=False weights=int8 gemm={tma=False}"
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.max_graphs = 2


def test_library_choice_calibration_and_regime_fields(tmp_path):
    from dualfuse.calibration import Calibration, identity
    from dualfuse.kernels.gemm.regime import Regime

    path = tmp_path / "cal.json"
    assert FusedConfig(calibration=path).calibration == str(path)  # a PathLike: its path
    cal = Calibration(ident=identity(DEV), path=str(path))
    d = FusedConfig(gemm_impl="auto", calibration=cal, gemm=GemmConfig(regime=Regime("byte-bound", 50e9, 2.0)))
    j = d.to_dict()  # JSON-ready: the calibration by its file, the regime by its fields
    assert j["calibration"] == str(path) and j["gemm_impl"] == "auto"
    assert j["gemm"]["regime"] == {"name": "byte-bound", "bandwidth": 50e9, "latency_us": 2.0}
    assert FusedConfig(gemm_impl="library").describe() == "gemm_impl=library"
    # the executor reads them: a copy of the calibration object (made for this card), gemm_impl as set
    spec = to_spec(dualfuse.load("clip-tiny"))
    ex = FusedExecutor(spec, device=DEV, use_graph=False, gemm_impl="auto", calibration=cal)
    assert ex.calibration.to_dict() == cal.to_dict() and ex.gemm_impl == "auto" and ex.config.calibration is cal
    assert FusedExecutor(spec, device=DEV, use_graph=False, gemm_impl="triton").calibration is None


def test_overrides_apply_over_the_config_and_are_validated():
    base = FusedConfig(max_graphs=3, pdl=False, gemm=GemmConfig(tma=False))
    assert base.with_overrides() is base
    c = base.with_overrides(max_graphs=5, gemm_config={"num_sms": 8})
    assert (c.max_graphs, c.pdl, c.gemm) == (5, False, GemmConfig(num_sms=8))  # the keyword wins, the rest stays
    assert base.max_graphs == 3  # frozen: a new config
    with pytest.raises(ValueError, match="max_graphs must be >= 1"):
        base.with_overrides(max_graphs=0)
    with pytest.raises(TypeError, match="unknown fused executor option"):
        base.with_overrides(graphs=2)
    with pytest.raises(ValueError, match="not both"):
        base.with_overrides(gemm=GemmConfig(), gemm_config={})


def test_executor_and_fuse_take_a_config_and_keyword_overrides():
    spec = to_spec(dualfuse.load("clip-tiny"))
    cfg = FusedConfig(max_graphs=3, text_buckets=(4, 8), fold_ln=False)
    ex = FusedExecutor(spec, dtype=torch.float32, device=DEV, config=cfg, max_graphs=2)
    assert ex.config == dataclasses.replace(cfg, max_graphs=2)
    assert ex.max_graphs == 2 and ex.text_buckets == (4, 8, 16) and ex.fold_ln is False
    old = FusedExecutor(spec, dtype=torch.float32, device=DEV, max_graphs=2, text_buckets=(4, 8), fold_ln=False,
                        gemm_config={"min_k_iters": 1})  # the keywords alone, as before
    assert old.config == dataclasses.replace(ex.config, gemm=GemmConfig(min_k_iters=1))
    assert old.gemm_config == {"min_k_iters": 1}
    with pytest.raises(ValueError, match="config must be a dualfuse.FusedConfig"):
        FusedExecutor(spec, dtype=torch.float32, device=DEV, config={"max_graphs": 2})
    fused = dualfuse.fuse(spec, dtype=torch.float32, device=DEV, config=cfg, max_graphs=4)
    assert fused.executor.config == dataclasses.replace(cfg, max_graphs=4)


def test_single_tower_fields_normalized_and_checked_against_the_model():
    assert FusedConfig(hidden_states=-2).hidden_states == (-2,)
    assert FusedConfig(hidden_states=[1, -1]).hidden_states == (1, -1)
    assert FusedConfig(hidden_states=(0,), pooled=False).to_dict()["hidden_states"] == [0]
    spec = to_spec(dualfuse.load("clip-tiny"))
    with pytest.raises(ValueError, match="apply to a single tower"):
        FusedExecutor(spec, dtype=torch.float32, device=DEV, hidden_states=(-2,))
    vision = dataclasses.replace(spec, text=None)
    layers = vision.vision.num_layers
    with pytest.raises(ValueError, match="out of range"):
        FusedExecutor(vision, dtype=torch.float32, device=DEV, hidden_states=(layers + 1,))
    ex = FusedExecutor(vision, dtype=torch.float32, device=DEV, config=FusedConfig(hidden_states=-2))
    assert ex.config.hidden_states == (-2,) and ex.hidden_states == (layers - 1,) and ex.pooled is False

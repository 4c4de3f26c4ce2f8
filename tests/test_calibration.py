"""Library kernels in the fused runner, the calibrated cost model, its cache, and executor 'auto' (CPU: the
Triton steps through the interpreter, the library steps as torch ops on the CPU)."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import dualfuse
from dualfuse import calibration as C
from dualfuse import executors, reference
from dualfuse.adapters import to_spec
from dualfuse.bench import random_inputs

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IDENT = dict(card="Test Card 80GB", torch="2.11.0", triton="3.6.0", dualfuse="0.1.0")
A = "linear:50x2304x768:bias:float16->float16"
B = "linear:77x1536x512:bias:float16->float16"


def _cal(steps=None, stages=None, calls=None):
    return C.Calibration(dict(IDENT), steps or {}, stages or {}, calls or {})


# --------------------------------------------------------------------------------------------- cost model

def test_choice_without_timings_is_triton():
    impls, why = _cal().choose_stage([A, B])
    assert impls == ("triton", "triton") and "no calibration" in why


def test_choice_from_given_timings():
    steps = {A: {"triton": 10.0, "library": 4.0}, B: {"triton": 6.0, "library": 7.0}}
    # grouped launch 12 us; A on cuBLAS + B alone on Triton = 4 + 6 = 10 us: the split wins
    impls, why = _cal(steps, {C.stage_key([A, B]): {"triton": 12.0}}).choose_stage([A, B])
    assert impls == ("library", "triton") and "10.0 us" in why
    # grouped launch 9 us beats every split (10, 13, 11)
    assert _cal(steps, {C.stage_key([A, B]): {"triton": 9.0}}).choose_stage([A, B])[0] == ("triton", "triton")
    # a library step that is not allowed (quantized weights, folded LN) is never chosen
    impls, _ = _cal(steps, {C.stage_key([A, B]): {"triton": 12.0}}).choose_stage([A, B], allowed=[False, True])
    assert impls == ("triton", "triton")
    # one step: library only when it beats Triton by the margin
    assert _cal({A: {"triton": 10.0, "library": 9.7}}).choose_stage([A])[0] == ("triton",)
    assert _cal({A: {"triton": 10.0, "library": 9.0}}).choose_stage([A])[0] == ("library",)
    # a missing library timing keeps Triton
    assert _cal({A: {"triton": 10.0}}).choose_stage([A])[0] == ("triton",)


def test_executor_choice_per_family():
    cal = _cal(calls={"m": {"image+text b<=1": {"fused": 0.4, "graph": 1.0},
                            "image b>128": {"fused": 9.0, "graph": 7.5}}})
    assert cal.choose_executor("m", "image+text b<=1")[0] == "fused"
    choice, why = cal.choose_executor("m", "image b>128")
    assert choice == "graph" and "7.500 ms < fused 9.000 ms" in why
    assert cal.choose_executor("m", "text b<=8") == ("fused", "text b<=8: no calibration, fused by default")
    assert C.call_family(1, 1) == "image+text b<=1" and C.call_family(256, 0) == "image b>128"
    assert C.call_family(0, 32) == "text b<=32" and C.call_family(32, 33) == "image+text b<=128"


# --------------------------------------------------------------------------------------------- the cache

def test_cache_round_trip_and_path(tmp_path, monkeypatch):
    monkeypatch.setenv("DUALFUSE_CACHE", str(tmp_path))
    path = C.default_path(IDENT)
    assert path == str(tmp_path / "calibration-Test_Card_80GB-2.11.0-3.6.0-0.1.0.json")
    cal = _cal({A: {"triton": 3.0, "library": 2.0}}, {C.stage_key([A, B]): {"triton": 5.0}},
               {"m": {"image b<=1": {"fused": 0.5, "graph": 0.9, "shape": [1, 0, 77]}}})
    assert cal.save() == path
    back = C.load(ident=IDENT)
    assert back.steps == cal.steps and back.stages == cal.stages and back.calls == cal.calls


@pytest.mark.parametrize("content,why", [
    ("{not json", "unreadable"),
    (json.dumps({"schema": "something/else"}), "not a dualfuse.calibration/1"),
    (json.dumps(dict(schema=C.SCHEMA, **dict(IDENT, card="Other Card"))), "another card or versions"),
    (json.dumps(dict(schema=C.SCHEMA, **dict(IDENT, torch="2.12.0"))), "another card or versions"),
    (json.dumps(dict(schema=C.SCHEMA, **IDENT, steps={A: {"triton": -1.0}})), "not a positive time"),
    (json.dumps(dict(schema=C.SCHEMA, **IDENT, steps={A: {"triton": "fast"}})), "not a positive time"),
    (json.dumps(dict(schema=C.SCHEMA, **IDENT, steps=[1, 2])), "steps is not an object"),
    (json.dumps(dict(schema=C.SCHEMA, **IDENT, steps={A: {"cublas": 1.0}})), "unknown entry 'cublas'"),
    (json.dumps(dict(schema=C.SCHEMA, **IDENT, calls={"m": {"image b<=1": {"fused": 1.0, "grpah": 2.0}}})),
     "unknown entry 'grpah'"),
])
def test_corrupt_or_foreign_cache_is_ignored_with_a_warning(tmp_path, content, why):
    path = tmp_path / "cal.json"
    path.write_text(content)
    with pytest.warns(UserWarning, match=f"ignoring the calibration cache.*{why}"):
        assert C.load(path=str(path), ident=IDENT) is None


def test_a_cache_from_changed_kernels_is_ignored(tmp_path, monkeypatch):
    """The identity holds a digest of the kernels' and the fused executor's source: timings made by another
    checkout of the same version are not trusted, and the warning names what differs."""
    ident = C.identity("cpu")
    assert ident["kernels"] == C.kernels_digest() and len(ident["kernels"]) == 12
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(C.Calibration(dict(ident, kernels="0123456789ab")).to_dict()))
    with pytest.warns(UserWarning, match="kernels '0123456789ab' .*dualfuse calibrate"):
        assert C.load(path=str(path), ident=ident) is None
    path.write_text(json.dumps(C.Calibration(dict(ident)).to_dict()))
    assert C.load(path=str(path), ident=ident).ident == ident


@pytest.mark.slow
def test_a_fused_executor_ignores_a_foreign_cache(tmp_path, monkeypatch):
    """The executor's own load (gemm_impl='auto', the default): a file of another card is not trusted."""
    monkeypatch.setenv("DUALFUSE_CACHE", str(tmp_path))
    ident = C.identity(KERNEL_DEVICE)
    foreign = dict(C.Calibration(dict(ident, card="Other Card")).to_dict())
    with open(C.default_path(ident), "w") as f:
        json.dump(foreign, f)
    with pytest.warns(UserWarning, match="another card"):
        ex = executors.get("fused", "clip-tiny", dtype="fp16", device=KERNEL_DEVICE)
    assert ex.calibration is None and "library" not in ex.notes


def test_a_calibration_given_to_an_executor_is_checked_and_copied(tmp_path, monkeypatch):
    """What fuse() is given is read once, at construction: a missing file and another card's Calibration object
    are ignored with a warning (never trusted); this card's object is copied, so changing it afterwards does not
    change the stage choices of runners built later; a bad type is a ValueError, for 'auto' too."""
    from dualfuse.executors.fused.library import signature

    monkeypatch.setenv("DUALFUSE_CACHE", str(tmp_path))
    kw = dict(dtype="fp16", device=KERNEL_DEVICE, fold_ln=False)
    with pytest.warns(UserWarning, match="calibration file .*nope.json not found"):
        assert executors.get("fused", "clip-tiny", calibration=str(tmp_path / "nope.json"), **kw).calibration is None
    foreign = C.Calibration(dict(C.identity(KERNEL_DEVICE), card="Other Card 80GB"))
    with pytest.warns(UserWarning, match="another card or versions: card 'Other Card 80GB'"):
        assert executors.get("fused", "clip-tiny", calibration=foreign, **kw).calibration is None
    with pytest.warns(UserWarning, match="another card"):
        auto = executors.get("auto", "clip-tiny", gemm_impl="triton", calibration=foreign, verbose=False, **kw)
    assert auto.decisions == {} and "no calibration" in auto.notes
    with pytest.raises(ValueError, match="calibration must be None, a path or a dualfuse.calibration.Calibration"):
        executors.get("auto", "clip-tiny", gemm_impl="triton", calibration=3, verbose=False, **kw)

    mine = C.Calibration(C.identity(KERNEL_DEVICE))
    ex = executors.get("fused", "clip-tiny", calibration=mine, **kw)
    assert ex.calibration is not mine and ex.calibration.ident == mine.ident
    r = executors.get("fused", "clip-tiny", gemm_impl="triton", **kw).runner(0, 1, 16, capture=False)
    for stage, problems in zip(r.plan.stages, r.stage_problems):  # after fuse(): every step "faster" on the library
        if stage.kind not in ("linear", "attention"):
            continue
        for p in problems:
            mine.steps[signature(p)] = {"triton": 9.0, "library": 1.0}
        if len(problems) > 1:
            mine.stages[C.stage_key([signature(p) for p in problems])] = {"triton": 9.0}
    assert all(set(c["impls"]) == {"triton"} for c in ex.library_choices(0, 1, 16))
    fresh = executors.get("fused", "clip-tiny", calibration=mine, **kw)  # a fuse() after the change sees it
    assert any("library" in c["impls"] for c in fresh.library_choices(0, 1, 16))


def test_auto_with_quantized_weights_does_not_use_the_16_bit_call_timings(tmp_path, monkeypatch):
    """Call timings are per weight format: those of the 16-bit fused executor do not decide for an int8 one."""
    monkeypatch.setenv("DUALFUSE_CACHE", str(tmp_path))
    spec = to_spec(dualfuse.load("clip-tiny"))
    key16 = C.model_key(spec, torch.float16)
    assert C.model_key(spec, torch.float16, "int8") == key16 + "|int8"
    cal = C.Calibration(C.identity(KERNEL_DEVICE), calls={key16: {"image b>128": {"fused": 9.0, "graph": 7.5}}})
    kw = dict(dtype="fp16", device=KERNEL_DEVICE, calibration=cal, verbose=False)
    assert "image b>128" in executors.get("auto", "clip-tiny", **kw).decisions
    assert executors.get("auto", "clip-tiny", weights="int8", **kw).decisions == {}


@pytest.mark.slow
def test_auto_says_why_a_graph_choice_is_not_taken_when_the_model_falls_back(tmp_path, monkeypatch, capsys):
    """A model the kernels do not cover (head dim 136 > 128) runs on the fallback executor: a calibrated 'graph'
    choice is reported as not taken, with the reason, instead of printing '-> graph' under 'fused everywhere'."""
    import copy

    from transformers import CLIPModel

    monkeypatch.setenv("DUALFUSE_CACHE", str(tmp_path))
    cfg = copy.deepcopy(dualfuse.load("clip-tiny").config)
    cfg.vision_config.hidden_size, cfg.vision_config.num_attention_heads = 272, 2
    model = CLIPModel(cfg).eval()
    key = C.model_key(to_spec(model), torch.float32)
    cal = C.Calibration(C.identity(KERNEL_DEVICE), calls={key: {"image b>128": {"fused": 9.0, "graph": 7.5}}})
    with pytest.warns(UserWarning, match="falling back"):
        ex = executors.get("auto", model, dtype="fp32", device=KERNEL_DEVICE, calibration=cal)
    assert ex.fallback is not None and ex.graph is None
    choice, why = ex.decisions["image b>128"]
    assert choice == "fused" and "graph wanted; the fused kernels do not cover this model here" in why
    assert "-> graph" not in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- mixed plans

def _parity(ex, spec, bi=2, bt=3):
    px, ids = random_inputs(spec, bi, bt, sets=1)[0]
    img, txt = ex.encode(px.to(KERNEL_DEVICE, ex.dtype), ids.to(KERNEL_DEVICE))
    ri, rt = reference.encode(spec, px, ids)
    for out, ref in ((img, ri), (txt, rt)):
        assert F.cosine_similarity(out.float().cpu(), ref, dim=-1).min().item() >= 0.999


@pytest.mark.parametrize("name", ["clip-tiny", pytest.param("siglip-tiny", marks=pytest.mark.slow)])
def test_mixed_plan_from_a_calibration_matches_reference(name):
    """Timings that make some steps cheaper on the library (the vision tower's attention, the text tower's FC1;
    the layers of a tower share their shapes, so their signatures) give a plan mixing Triton launches and torch ops; its output matches the reference."""
    from dualfuse.executors.fused.library import signature

    model = dualfuse.load(name)
    spec = to_spec(model)
    plain = executors.get("fused", model, dtype="fp16", device=KERNEL_DEVICE, gemm_impl="triton", fold_ln=False)
    r = plain.runner(2, 3, spec.text.context_length, capture=False)
    steps, stages = {}, {}
    for stage, problems in zip(r.plan.stages, r.stage_problems):
        if stage.kind not in ("linear", "attention"):
            continue
        sigs = [signature(p) for p in problems]
        for st, sig in zip(stage.steps, sigs):
            cheap = (st.op == "attn" and st.tower == "vision") or (st.op == "fc1" and st.tower == "text")
            steps[sig] = {"triton": 5.0, "library": 1.0 if cheap else 9.0}
        if len(sigs) > 1:
            stages[C.stage_key(sigs)] = {"triton": 7.0}
    cal = C.Calibration(C.identity(KERNEL_DEVICE), steps, stages)
    ex = executors.get("fused", model, dtype="fp16", device=KERNEL_DEVICE, fold_ln=False, calibration=cal)
    chosen = {(lbl, impl) for c in ex.library_choices(2, 3) for lbl, impl in zip(c["steps"], c["impls"])}
    assert {("v0.attn", "library"), ("v1.attn", "library"), ("t0.fc1", "library")} <= chosen
    assert {("t0.attn", "triton"), ("v0.fc1", "triton"), ("v0.qkv", "triton")} <= chosen
    assert "library:" in ex.notes and "(calibrated)" in ex.notes
    _parity(ex, spec)


@pytest.mark.parametrize("name", ["clip-tiny", "siglip-tiny"])
def test_library_everywhere_matches_reference(name):
    """gemm_impl='library': every plain GEMM on cuBLAS-through-torch (bias, residual, each activation) and every
    self-attention through SDPA; SigLIP's pooling-probe attention keeps Triton."""
    model = dualfuse.load(name)
    spec = to_spec(model)
    ex = executors.get("fused", model, dtype="fp16", device=KERNEL_DEVICE, gemm_impl="library", fold_ln=False)
    impls = {lbl: impl for c in ex.library_choices(2, 3) for lbl, impl in zip(c["steps"], c["impls"])}
    assert impls["v0.fc2"] == impls["t0.qkv"] == impls["v1.attn"] == "library"
    if name == "siglip-tiny":
        assert impls["v.map_attn"] == "triton"
    _parity(ex, spec)


def test_quantized_and_folded_steps_keep_triton():
    from dualfuse.executors.fused.library import library_ok

    ex = executors.get("fused", "clip-tiny", dtype="fp16", device=KERNEL_DEVICE, gemm_impl="library",
                       fold_ln=True, weights="int8")
    choices = ex.library_choices(1, 1)
    r = ex.runner(1, 1, 16, capture=False)
    for c, problems in zip(choices, r.stage_problems):
        if c["kind"] == "linear":
            assert c["impls"] == ["triton"] * len(c["impls"])
            assert not any(library_ok(p) for p in problems)


def test_gemm_impl_is_validated():
    with pytest.raises(ValueError, match="gemm_impl must be 'auto', 'triton' or 'library'"):
        executors.get("fused", "clip-tiny", dtype="fp16", device=KERNEL_DEVICE, gemm_impl="cublas")
    with pytest.raises(ValueError, match="calibration is read only with gemm_impl='auto'"):
        executors.get("fused", "clip-tiny", dtype="fp16", device=KERNEL_DEVICE, gemm_impl="triton",
                      calibration="x.json")


# --------------------------------------------------------------------------------------------- calibrate + auto

@pytest.mark.slow
def test_calibrate_with_given_timings_then_auto(tmp_path, monkeypatch, capsys):
    """calibrate() with a fixed timer (SDPA 'faster') writes the card's cache; a fused executor built afterwards
    runs attention through SDPA; executor 'auto' reads the call timings and says why it chose what it chose."""
    from dualfuse.executors.fused.calibrate import calibrate
    from dualfuse.executors.fused.library import LibraryAttention, LibraryLinear

    monkeypatch.setenv("DUALFUSE_CACHE", str(tmp_path))

    def timer(op):
        return 0.5 if isinstance(op, LibraryAttention) else 3.0 if isinstance(op, LibraryLinear) else 2.0

    res = calibrate("clip-tiny", [(1, 2, 16)], dtype="fp16", device=KERNEL_DEVICE, timer=timer, iters=1, warmup=0,
                    calls=True)
    assert os.path.isfile(res.path) and res.stages_timed > 0
    assert all(set(impls) <= {"triton", "library"} for _, impls, _ in res.choices["1x2x16"])
    assert any("library" in impls for steps, impls, _ in res.choices["1x2x16"] if "v0.attn" in steps)
    assert set(res.calls["image+text b<=8"]) == {"fused", "graph", "shape"}
    ex = executors.get("auto", "clip-tiny", dtype="fp16", device=KERNEL_DEVICE)
    err = capsys.readouterr().err
    assert "dualfuse auto:" in err and "image+text b<=8" in err
    assert "image+text b<=8" in ex.decisions and ex.notes.startswith("auto:")
    _parity(ex, to_spec(dualfuse.load("clip-tiny")), 1, 2)


@pytest.mark.slow
def test_calibrate_a_single_tower_and_bad_shapes(tmp_path, monkeypatch):
    """A single tower (what a FusedTower's gemm_impl='auto' reads) calibrates its stages; call timings, which only
    executor 'auto' (dual encoders) reads, are skipped and the log says so; shapes the model cannot run are a
    ValueError naming the shape, not a failure inside."""
    from transformers import CLIPVisionModel

    from dualfuse.executors.fused.calibrate import calibrate

    monkeypatch.setenv("DUALFUSE_CACHE", str(tmp_path))
    tower = CLIPVisionModel(dualfuse.load("clip-tiny").config.vision_config)
    logs = []
    res = calibrate(tower, [(2, 0, 1)], dtype="fp16", device=KERNEL_DEVICE, timer=lambda op: 1.0, log=logs.append)
    assert os.path.isfile(res.path) and res.stages_timed > 0 and res.calls == {}
    assert any("single tower: stages only" in m for m in logs)
    assert C.model_key(to_spec(tower), torch.float16).split("|")[2] == "t-"
    # a second run keeps the timings in the file; fresh=True takes them again
    again = calibrate(tower, [(2, 0, 1)], dtype="fp16", device=KERNEL_DEVICE, timer=lambda op: 2.0, calls=False)
    times = lambda: {t for e in C.load(KERNEL_DEVICE, path=res.path).steps.values() for t in e.values()}  # noqa: E731
    assert again.stages_timed == 0 and times() == {1.0}
    again = calibrate(tower, [(2, 0, 1)], dtype="fp16", device=KERNEL_DEVICE, timer=lambda op: 2.0, calls=False,
                      fresh=True)
    assert again.stages_timed == res.stages_timed
    assert times() == {2.0}
    with pytest.raises(ValueError, match=r"asks for texts, but this model has no text tower"):
        calibrate(tower, [(1, 1, 1)], device=KERNEL_DEVICE, timer=lambda op: 1.0)
    with pytest.raises(ValueError, match=r"text length must be in \[1, 16\]"):
        calibrate("clip-tiny", [(1, 1, 0)], device=KERNEL_DEVICE, timer=lambda op: 1.0)
    with pytest.raises(ValueError, match="ints >= 0"):
        calibrate("clip-tiny", [(1, 1.5, 16)], device=KERNEL_DEVICE, timer=lambda op: 1.0)


def test_fuse_accepts_executor_auto(tmp_path, monkeypatch):
    monkeypatch.setenv("DUALFUSE_CACHE", str(tmp_path))  # empty: no calibration, fused everywhere
    fused = dualfuse.fuse("clip-tiny", dtype=torch.float16, device=KERNEL_DEVICE, executor="auto", verbose=False)
    assert type(fused.executor).__name__ == "AutoExecutor" and fused.executor.route(256, 0) == "fused"
    assert "no calibration" in fused.executor.notes
    with pytest.raises(ValueError, match="executor must be 'fused' or 'auto'"):
        dualfuse.fuse("clip-tiny", executor="graph")


def test_auto_rebuilt_by_half_says_why_its_graph_choices_are_not_taken(tmp_path, monkeypatch):
    """.half() rebuilds from the kept spec, which has no source model for the graph executor: the rebuilt auto
    runs fused and its reasons say so (docs/executors.md)."""
    monkeypatch.setenv("DUALFUSE_CACHE", str(tmp_path))
    spec = to_spec(dualfuse.load("clip-tiny"))
    graph_wins = {"image b>128": {"fused": 9.0, "graph": 7.5}}
    cal = C.Calibration(C.identity(KERNEL_DEVICE), calls={C.model_key(spec, dt): graph_wins
                                                           for dt in (torch.float32, torch.float16)})
    fused = dualfuse.fuse("clip-tiny", dtype=torch.float32, device=KERNEL_DEVICE, executor="auto",
                          calibration=cal, verbose=False)
    fused.half()
    assert type(fused.executor).__name__ == "AutoExecutor" and fused.executor.dtype == torch.float16
    choice, why = fused.executor.decisions["image b>128"]
    assert choice == "fused" and "no source model for the graph executor" in why
    assert fused.executor.route(256, 0) == "fused"


@pytest.mark.slow
def test_bench_auto_row_says_why_and_where_the_shape_ran(tmp_path, monkeypatch, capsys):
    """`dualfuse bench --executors auto`: the decisions are printed (stderr), the row's notes name the summary and
    where this run's call shape went."""
    from dualfuse.bench import run_bench

    monkeypatch.setenv("DUALFUSE_CACHE", str(tmp_path))  # no calibration: fused everywhere, and it says so
    res = run_bench("clip-tiny", executors=["auto"], image_batch=1, text_batch=0, dtype="fp16",
                    device=KERNEL_DEVICE, iters=1, warmup=0, input_sets=1)
    (row,) = res.rows
    assert row.status == "ok" and row.cosine_ok and not row.stock
    assert "auto: no calibration for this card, fused everywhere" in row.notes
    assert row.notes.endswith("this shape ran fused")
    assert "dualfuse auto: auto: no calibration" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["clip-vit-b-32", "siglip-base-patch16-224"])
def test_library_steps_inside_the_cuda_graph_gpu(name, tmp_path, monkeypatch):
    """On CUDA: every plain step on cuBLAS / SDPA inside the captured graph matches the reference, replays stay
    stable (fp16, and bf16 with its fp32 residual stream, where a library GEMM's bf16 output is added into the
    fp32 stream); a real calibration of one shape is saved and read back by a fused executor."""
    from dualfuse.executors.fused.calibrate import calibrate

    monkeypatch.setenv("DUALFUSE_CACHE", str(tmp_path))
    model = dualfuse.load(name)
    spec = to_spec(model)
    for dtype in ("fp16", "bf16"):
        ex = executors.get("fused", model, dtype=dtype, device="cuda", gemm_impl="library")
        _parity(ex, spec, 4, 3)
        _parity(ex, spec, 4, 3)  # a replay of the captured graph
    res = calibrate(model, [(4, 3, spec.text.context_length)], dtype="fp16", device="cuda", iters=3, warmup=1)
    assert os.path.isfile(res.path) and res.stages_timed > 0 and res.calls
    ex = executors.get("fused", model, dtype="fp16", device="cuda")
    assert ex.calibration is not None and ex.calibration.steps
    _parity(ex, spec, 4, 3)


def test_calibrate_cli_shapes_and_errors(capsys):
    from dualfuse import cli
    from dualfuse.cli.calibrate import parse_shapes

    assert parse_shapes("1x1, 256x0,0x1024x16", 77) == [(1, 1, 77), (256, 0, 77), (0, 1024, 16)]
    for bad in ("1y1", "0x0", "1x-1", ""):
        with pytest.raises(ValueError, match="--shapes"):
            parse_shapes(bad, 77)
    assert cli.main(["calibrate", "--model", "clip-tiny", "--shapes", "1x2x3x4"]) == 2
    assert "IMAGESxTEXTS[xTEXT_LEN]" in capsys.readouterr().err


def test_calibrate_cli_default_shapes_fit_a_single_tower():
    """Without --shapes, a single tower calibrates the default items it can run (the others would be refused)."""
    import dataclasses

    from dualfuse.cli.calibrate import DEFAULT_SHAPES, default_shapes

    spec = to_spec(dualfuse.load("clip-tiny"))
    assert default_shapes(spec) == DEFAULT_SHAPES
    assert default_shapes(dataclasses.replace(spec, text=None)) == "1x0,256x0"
    assert default_shapes(dataclasses.replace(spec, vision=None)) == "0x1024"

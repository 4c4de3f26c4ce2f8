"""dualfuse.profile: interval arithmetic on synthetic events with known answers, attribution of synthetic
CUDA traces (correlation ids, CUDA graph replays), and the whole pipeline on CPU with tiny models (report,
PNGs, trace, JSON; every op attributed; --compare). GPU-only behaviour is in the tests marked gpu."""
import json
import os

import pytest
import torch

import dualfuse
from dualfuse import executors
from dualfuse.cli import main
from dualfuse.profile import analyze as A
from dualfuse.profile import attribution, ceilings, labels, matching, ncu, trace
from dualfuse.profile import profile, report, write_compare
from dualfuse.profile.analyze import Event


PNG = b"\x89PNG\r\n\x1a\n"
# the fused executor on CPU runs through the Triton interpreter (conftest sets it where there is no GPU)
interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="fused on CPU needs TRITON_INTERPRET=1 (set by conftest without a GPU)")


def ev(name, start, dur, tower="vision", layer=None, op=None, cls="gemm", it=0, **kw):
    return Event(name=name, start_us=start, dur_us=dur, tower=tower, layer=layer, op=op, op_class=cls, iteration=it,
                 **kw)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DUALFUSE_CACHE_DIR", str(tmp_path / "cache"))


# ============================================================================================ interval arithmetic

def test_union_busy_gaps_exact():
    evs = [ev("a", 0, 10), ev("b", 5, 10), ev("c", 20, 10), ev("d", 30, 0.5), ev("e", 40, 2)]
    assert A.union(A.spans(evs)) == [(0, 15), (20, 30.5), (40, 42)]
    assert A.busy_us(evs) == 15 + 10.5 + 2
    g = A.gaps(evs, window=(-5, 50))
    assert (g["count"], g["total_us"], g["largest_us"]) == (2, 5 + 9.5, 9.5)
    assert g["intervals"] == [(15, 20), (30.5, 40)]
    assert (g["lead_us"], g["tail_us"]) == (5, 8)
    assert A.gaps([], window=(0, 10))["lead_us"] == 10


def test_window_stats_overlap_and_fused_time():
    evs = [ev("v1", 0, 10, "vision"), ev("v2", 20, 10, "vision"), ev("t1", 5, 20, "text"),
           ev("f", 40, 10, "both"), ev("h", 52, 3, "host", cls="elementwise")]
    s = A.window_stats(evs, (0, 60))
    # vision ∪ both = [0,10] [20,30] [40,50]; text ∪ both = [5,25] [40,50] -> overlap 5 + 5 + 10
    assert s["overlap_us"] == 20 and s["overlap_frac"] == pytest.approx(20 / 60)
    assert s["concurrent_us"] == 10  # separate kernels only
    assert s["fused_us"] == 10
    assert s["busy_us"] == 30 + 10 + 3 and s["idle_us"] == 60 - 43
    assert (s["gaps"], s["gap_total_us"], s["gap_largest_us"]) == (2, 10 + 2, 10)
    assert (s["lead_us"], s["tail_us"]) == (0, 5)
    assert s["kernels"] == 5 and s["kernel_sum_us"] == 10 + 10 + 20 + 10 + 3
    assert s["busy_frac"] + s["idle_frac"] == pytest.approx(1.0)


def test_sequential_towers_do_not_overlap():
    evs = [ev("v", 0, 10, "vision"), ev("t", 10, 10, "text")]  # touching, not overlapping
    assert A.overlap_us(evs) == 0
    assert A.window_stats(evs, (0, 20))["gaps"] == 0


def test_tables_are_per_forward():
    evs = []
    for it in range(2):
        evs += [ev("gemm_k", 100 * it, 10, "vision", 0, "qkv", it=it, flops=2e6, bytes=1e3),
                ev("gemm_k", 100 * it + 10, 30, "text", 0, "qkv", it=it),
                ev("ln_k", 100 * it + 40, 5, "text", 1, "ln1", "norm", it=it),
                ev("copy", 100 * it + 50, 1, "host", None, "copy_", "elementwise", it=it)]
    towers = {r["tower"]: r for r in A.by_tower(evs, iters=2)}
    assert towers["vision"]["kernels"] == 1 and towers["vision"]["time_us"] == 10
    assert towers["text"]["time_us"] == 35 and towers["text"]["share"] == pytest.approx(35 / 46)
    assert towers["vision"]["gflops"] == pytest.approx(2e-3)
    layers = A.by_layer(evs, iters=2)
    assert [(r["tower"], r["layer"]) for r in layers] == [("vision", "0"), ("text", "0"), ("text", "1"), ("host", "-")]
    top = A.top_kernels(evs, k=2, iters=2)
    assert [r["name"] for r in top] == ["gemm_k", "ln_k"]
    assert top[0]["calls"] == 2 and top[0]["time_us"] == 40 and top[0]["mean_us"] == 20
    assert top[0]["towers"] == ["text", "vision"]


def test_fused_layer_label():
    e = ev("k", 0, 1, "both", 3, "qkv", parts=[dict(tower="vision", layer=3), dict(tower="text", layer=1)])
    assert A.layer_label(e) == "v3/t1"
    e.parts = [dict(tower="vision", layer=2), dict(tower="text", layer=2)]
    e.layer = 2
    assert A.layer_label(e) == "2"


def test_op_classes_roofline():
    ceil = dict(peak_flops=1e14, peak_bw=1e12)  # ridge 100 FLOP/B
    evs = [ev("g", 0, 1000, cls="gemm", flops=2e9, bytes=1e6),
           ev("e", 0, 10, cls="elementwise", flops=0.0, bytes=1e6),
           ev("n", 0, 5, cls="norm")]  # cost unknown
    rows = {r["op_class"]: r for r in A.op_classes(evs, ceil)}
    g = rows["gemm"]
    assert g["flops_per_s"] == pytest.approx(2e12) and g["bytes_per_s"] == pytest.approx(1e9)
    assert g["intensity"] == pytest.approx(2000) and g["bound"] == "compute-bound"
    assert g["roof_frac"] == pytest.approx(0.02) and g["flops_frac"] == pytest.approx(0.02)
    e = rows["elementwise"]
    assert e["bound"] == "memory-bound" and e["bytes_per_s"] == pytest.approx(1e11)
    assert e["roof_frac"] == pytest.approx(0.1)
    assert rows["norm"]["bound"] == "unknown" and rows["norm"]["coverage"] == 0
    assert A.roofline_tag(50, 1, 1e14, 1e12) == "memory-bound"
    assert A.roofline_tag(100, 1, 1e14, 1e12) == "compute-bound"
    assert A.roofline_tag(1, 1, None, 1e12) == "unknown"


def test_underfilled():
    evs = [ev("small", 0, 5, blocks=8), ev("small", 10, 5, blocks=8), ev("big", 20, 5, blocks=1000),
           ev("nogrid", 30, 1)]
    rows = A.underfilled(evs, sm_count=132)
    assert len(rows) == 1 and rows[0]["name"] == "small" and rows[0]["calls"] == 2
    assert rows[0]["sm_fill"] == pytest.approx(8 / 132)
    assert A.underfilled(evs, sm_count=None) == []


def test_verdicts():
    classes = [dict(op_class="gemm", time_us=10, share=0.7, bound="memory-bound", roof_frac=0.2),
               dict(op_class="norm", time_us=4, share=0.3, bound="memory-bound", roof_frac=0.1)]
    s = dict(kernels=383, idle_frac=0.86, overlap_frac=0.0, gaps=382, gap_largest_us=40.0, wall_us=9900)
    v = A.verdict(s, classes)
    assert v.startswith("launch-bound: 383 kernels per forward, GPU idle 86% of the wall time; the towers overlap 0%")
    s.update(idle_frac=0.2, overlap_frac=0.55)
    v = A.verdict(s, classes)
    assert v.startswith("memory-bound: 383 kernels") and "overlap 55%" in v and "gemm takes 70%" in v
    assert A.verdict(dict(s, idle_frac=0.9), classes, device_type="cpu").startswith("dispatch-bound: 383 ops")
    cpu = A.verdict(s, classes, device_type="cpu")  # no GPU: no roofline verdict
    assert cpu.startswith("busy (no GPU: roofline not applicable): 383 ops") and "memory-bound" not in cpu


@pytest.mark.parametrize("name,cls", [
    ("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off", "gemm"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false>>(Flash_fwd_params)",
     "attention"),
    ("fmha_cutlassF_f16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>::Params)", "attention"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::Half, float>(int, float)", "norm"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::Half>>(int)", "elementwise"),
    ("triton_per_fused_add_native_layer_norm_5", "norm"),
    ("graph_0_cpp_fused_convolution_0", "elementwise"),
    ("grouped_linear_kernel", "gemm"), ("_attention_kernel", "attention"), ("_layer_norm_kernel", "norm"),
    ("_embed_kernel", "embed"), ("void at::native::indexSelectLargeIndex<float, long>(...)", "embed"),
    ("aten::addmm", "gemm"), ("aten::native_layer_norm", "norm"), ("nvjet_sm90_hsh_64x8_64x16_2x4_h_bz_bias_TNT", "gemm"), ("Memcpy DtoD (Device -> Device)", "elementwise"),
])
def test_classify(name, cls):
    assert A.classify(name) == cls


# ============================================================================================ attribution (synthetic)

def _trace(events):
    return {"traceEvents": [dict(ph="X", pid=1, tid=1, **e) if e["cat"] not in trace.DEVICE_CATS else dict(ph="X", **e)
                            for e in events]}


def _ann(name, ts, dur):
    return dict(cat="user_annotation", name=name, ts=ts, dur=dur)


def _launch(corr, ts, name="cudaLaunchKernel", cat="cuda_runtime"):
    return dict(cat=cat, name=name, ts=ts, dur=1.0, args=dict(correlation=corr))


def _kernel(name, corr, ts, dur, grid=(4, 1, 1), stream=7):
    return dict(cat="kernel", name=name, pid=0, tid=stream, ts=ts, dur=dur,
                args=dict(correlation=corr, grid=list(grid), block=[128, 1, 1], stream=stream))


def test_cuda_trace_attribution_by_correlation():
    tr = _trace([
        _ann("df:forward:0", 0, 100),
        dict(cat="cpu_op", name="aten::copy_", ts=1, dur=3, args={"Input Dims": [[4, 4], [4, 4]],
                                                                     "Input type": ["float", "float"]}),
        _launch(1, 2),
        _ann("df:vision", 10, 40), _ann("df:vision:L0", 11, 30), _ann("df:vision:L0:qkv", 12, 10),
        dict(cat="cpu_op", name="aten::addmm", ts=13, dur=5), _launch(2, 14),
        _ann("df:vision:L0:attn", 25, 10), _launch(3, 26, "cuLaunchKernel", "cuda_driver"),
        _ann("df:text", 55, 30), _launch(4, 56),
        _kernel("copy_kernel", 1, 5, 2), _kernel("gemm_kernel", 2, 20, 10, grid=(200, 1, 1)),
        _kernel("flash_fwd_kernel", 3, 40, 20), _kernel("elementwise_add", 4, 90, 20),
        _kernel("outside", 99, 300, 1),  # launched outside any profiled forward: dropped
    ])
    ext = attribution.extract(tr, attribution.AttributionInfo(mode="full", device_type="cuda"))
    by = {e.name: e for e in ext.events}
    assert set(by) == {"copy_kernel", "gemm_kernel", "flash_fwd_kernel", "elementwise_add"}
    assert by["copy_kernel"].tower == "host" and by["copy_kernel"].cpu_op == "aten::copy_"
    assert by["copy_kernel"].shapes == [[4, 4], [4, 4]]
    g = by["gemm_kernel"]
    assert (g.tower, g.layer, g.op, g.op_class, g.blocks, g.cpu_op) == ("vision", 0, "qkv", "gemm", 200, "aten::addmm")
    assert (by["flash_fwd_kernel"].op, by["flash_fwd_kernel"].op_class) == ("attn", "attention")
    assert (by["elementwise_add"].tower, by["elementwise_add"].op) == ("text", "misc")
    # window: forward start to the end of its last kernel (which outlives the host range)
    assert ext.windows == [(0, 110)]


def test_cuda_graph_replay_matched_in_order():
    def ref(name, tower, layer, op, dur):
        return ev(name, 0, dur, tower, layer, op, it=-1, flops=1.0, bytes=1.0)

    vision = [ref("gemm", "vision", 0, "qkv", 10), ref("attn", "vision", 0, "attn", 5), ref("gemm", "vision", 0, "fc1", 20)]
    text = [ref("gemm", "text", 0, "qkv", 3), ref("ln", "text", 0, "ln2", 1)]
    # the replay interleaves the two branches; names alone are ambiguous for 'gemm', durations decide
    replay = [ev("gemm", 0, 10.2, "unattributed"), ev("gemm", 1, 3.1, "unattributed"),
              ev("attn", 11, 5, "unattributed"), ev("ln", 12, 1, "unattributed"), ev("gemm", 16, 19, "unattributed")]
    k, note = matching.match_order(replay, [vision, text])
    assert k == 5 and note is None
    assert [(e.tower, e.op) for e in replay] == [("vision", "qkv"), ("text", "qkv"), ("vision", "attn"),
                                                 ("text", "ln2"), ("vision", "fc1")]
    # one kernel more than the labelled run: matched prefix labelled, the rest left unattributed and reported
    replay = [ev(n, i, 1, "unattributed") for i, n in enumerate(["gemm", "attn", "gemm", "gemm", "ln", "extra"])]
    k, note = matching.match_order(replay, [vision, text])
    assert k == 5 and "6 kernels" in note and "1 left unattributed" in note
    assert replay[-1].tower == "unattributed"
    # fused: one sequence, k-th kernel = k-th stage
    seq = [ref("k1", "both", 0, "qkv", 1), ref("k2", "both", 0, "attn", 1)]
    replay = [ev("k1", 0, 1, "unattributed"), ev("k2", 2, 1, "unattributed")]
    assert matching.match_order(replay, [seq]) == (2, None) and replay[1].op == "attn"


def test_cuda_graph_replay_aligned_per_stream_when_names_differ():
    def ref(name, tower, layer, op):
        return ev(name, 0, 1, tower, layer, op, it=-1)

    vision = [ref("gemmA", "vision", 0, "qkv"), ref("attn", "vision", 0, "attn"), ref("gemmB", "vision", 0, "fc1")]
    text = [ref("gemmA", "text", 0, "qkv"), ref("ln", "text", 0, "ln2")]
    # inside the graph the vision fc1 GEMM became a split-K GEMM + a reduction kernel
    replay = [ev("gemmA", 0, 1, "unattributed", stream=13), ev("gemmA", 0.5, 1, "unattributed", stream=7),
              ev("attn", 2, 1, "unattributed", stream=7), ev("ln", 2.5, 1, "unattributed", stream=13),
              ev("gemmX", 4, 1, "unattributed", stream=7), ev("reduce", 5, 1, "unattributed", stream=7)]
    k, note = matching.match_order(replay, [vision, text])
    assert k == 6 and "3 matched" not in note and "1 in the place" in note and "1 extra" in note
    got = [(e.name, e.tower, e.op) for e in replay]
    assert got == [("gemmA", "text", "qkv"), ("gemmA", "vision", "qkv"), ("attn", "vision", "attn"),
                   ("ln", "text", "ln2"), ("gemmX", "vision", "fc1"), ("reduce", "vision", "fc1")]


def test_short_names():
    assert report.short_name("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::Half, "
                             "float>(int, float, c10::Half const*)") == "at::native::vectorized_layer_norm_kernel<…>"
    assert report.short_name("nvjet_sm90_hsh_64x8_64x16_2x4_h_bz_bias_TNT") == "nvjet_sm90_hsh_64x8_64x16_2x4_h_bz_bias_TNT"
    assert len(report.short_name("x" * 200)) == 70


def test_graph_launch_kernels_wait_for_order_attribution():
    tr = _trace([_ann("df:forward:0", 0, 50), _launch(1, 5, "cudaGraphLaunch_v10000"),
                 _kernel("gemm", 1, 10, 5), _kernel("ln", 1, 16, 2)])
    ext = attribution.extract(tr, attribution.AttributionInfo(mode="full", device_type="cuda"))
    assert ext.events == [] and [e.name for e in ext.replay[0]] == ["gemm", "ln"]


def test_labels_roundtrip():
    assert labels.parse_label(labels.label("vision", 3, "qkv")) == dict(kind="op", tower="vision", layer=3, op="qkv")
    assert labels.parse_label(labels.label("text", None, "proj")) == dict(kind="op", tower="text", layer=None, op="proj")
    assert labels.parse_label(labels.label("text")) == dict(kind="tower", tower="text", layer=None, op=None)
    assert labels.parse_label("df:stage:12") == dict(kind="stage", stage=12)
    assert labels.parse_label("df:forward:2") == dict(kind="forward", iteration=2)
    assert labels.parse_label("aten::mm") is None


def test_ncu_csv_and_missing(monkeypatch):
    text = ('==PROF== Connected\n"ID","Kernel Name","sm__warps_active.avg.pct_of_peak_sustained_active",'
            '"sm__throughput.avg.pct_of_peak_sustained_elapsed","dram__throughput.avg.pct_of_peak_sustained_elapsed"\n'
            '"","","%","%","%"\n"0","gemm_kernel","45.5","60.25","12"\n')
    rows = ncu.parse_ncu_csv(text)
    assert rows == [dict(name="gemm_kernel", achieved_occupancy_pct=45.5, sm_throughput_pct=60.25,
                         dram_throughput_pct=12.0)]
    monkeypatch.setattr(ncu.shutil, "which", lambda name: None)
    r = ncu.run_ncu(["--model", "clip-tiny"], ["gemm_kernel"])
    assert r["status"] == "missing" and "not installed" in r["message"]
    assert ncu.base_name("void at::native::vectorized_elementwise_kernel<4, F>(int, F)") == "vectorized_elementwise_kernel"


def test_ceilings_cached(tmp_path):
    c1 = ceilings.ceilings("cpu", torch.float32, directory=str(tmp_path))
    assert c1["source"] == "measured" and c1["peak_bw"] > 0 and c1["peak_flops"] > 0
    c2 = ceilings.ceilings("cpu", torch.float32, directory=str(tmp_path))
    assert c2["source"] == "cache" and c2["peak_bw"] == c1["peak_bw"] and c2["peak_flops"] == c1["peak_flops"]
    c3 = ceilings.ceilings("cpu", torch.float32, directory=str(tmp_path / "empty"), measure=False)
    assert c3["source"] == "unknown" and c3["peak_bw"] is None


# ============================================================================================ CPU end to end

@pytest.fixture(scope="module")
def eager_clip(tmp_path_factory):
    model = dualfuse.load("clip-tiny")
    ex = executors.get("eager", model, device="cpu")
    with pytest.MonkeyPatch.context() as mp:  # ceilings measured into a scratch cache
        mp.setenv("DUALFUSE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        r = profile(ex, iters=2, warmup=1, latency_runs=1, model_name="clip-tiny")
    assert r.data["ceilings"]["source"] == "measured"
    return model, ex, r


def _check_attributed(r, layers=2):
    evs = r.events
    assert evs, "no events"
    assert {e.tower for e in evs} <= {"vision", "text", "host", "both"}, {e.tower for e in evs}
    assert all(e.op_class in A.OP_CLASSES for e in evs)
    for tower in ("vision", "text"):
        got = {e.layer for e in evs if e.tower in (tower, "both") and e.layer is not None}
        assert got == set(range(layers)), (tower, got)
    assert r.analysis["attribution"].get("unattributed", 0) == 0


@pytest.mark.slow
def test_eager_cpu_profile_attributes_everything(eager_clip):
    model, ex, r = eager_clip
    _check_attributed(r)
    ops = {(e.tower, e.op) for e in r.events}
    for tower in ("vision", "text"):
        for op in ("ln1", "qkv", "attn", "out", "ln2", "fc1", "fc2", "proj"):
            assert (tower, op) in ops, (tower, op)
    assert ("vision", "patch_embed") in ops and ("text", "token_embed") in ops
    # per iteration the same ops; the windows are the profiled forwards
    assert len(r.data["windows"]) == 2
    per = r.analysis["per_iteration"]
    assert per[0]["kernels"] == per[1]["kernels"] == r.summary["kernels"]
    # plan costs land on the GEMMs: their FLOPs add up to the plan's linear steps
    from dualfuse.plan import make_plan

    plan = make_plan(ex.spec, 1, 1, elt=4)
    plan_gemm = sum(s.flops for st in plan.stages for s in st.steps if s.kind == "linear")
    got = sum(e.flops or 0 for e in r.events if e.op_class == "gemm" and e.cost_source == "plan") / 2
    assert got == pytest.approx(plan_gemm, rel=1e-6)
    # labels are gone afterwards and the user's model was never touched
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in ex.model.modules())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    assert not hasattr(ex.image_fn, "__wrapped__")


def test_eager_cpu_files(eager_clip, tmp_path):
    _, _, r = eager_clip
    files = r.write(str(tmp_path / "out"))
    for k in ("report", "timeline", "roofline", "trace", "profile"):
        assert os.path.getsize(files[k]) > 0, k
    for k in ("timeline", "roofline"):
        with open(files[k], "rb") as f:
            assert f.read(8) == PNG
    with open(files["trace"]) as f:
        assert json.load(f)["traceEvents"]
    with open(files["profile"]) as f:
        data = json.load(f)
    assert data["schema"] == "dualfuse.profile/1" and data["executor"] == "eager"
    assert data["analysis"]["summary"]["kernels"] == r.summary["kernels"]
    assert len(data["events"]) == len(r.events)
    text = open(files["report"]).read()
    first = text.split("**Verdict.** ", 1)[1].splitlines()[0]
    # a CPU run has no roofline verdict
    assert first.startswith(("dispatch-bound", "busy (no GPU: roofline not applicable)")) and "ops per forward" in first
    assert "compute-bound" not in first and "memory-bound" not in first
    assert "No GPU: roofline not applicable" in text
    for heading in ("## Per tower", "## Per layer", "## Top kernels", "## Op classes against the roofline",
                    "## Under-filled launches", "## Attribution"):
        assert heading in text
    # re-rendering from profile.json gives the same report
    os.remove(files["report"])
    assert report.rerender(str(tmp_path / "out"), plots=False) == files["report"]
    assert open(files["report"]).read() == text


@pytest.mark.parametrize("name", ["siglip-tiny", "open_clip-tiny"])
def test_eager_cpu_other_families(name):
    if name.startswith("open_clip"):
        pytest.importorskip("open_clip", reason="open_clip is not installed here (pip install 'dualfuse[openclip]')")
    r = profile("eager", name, device="cpu", iters=1, warmup=1, latency_runs=0, measure_ceilings=False)
    _check_attributed(r)
    ops = {(e.tower, e.op) for e in r.events}
    assert ("vision", "attn") in ops and ("text", "fc2") in ops
    if name == "siglip-tiny":
        assert ("vision", "map_attn") in ops


@pytest.mark.slow
@interpreter
def test_fused_cpu_stages_are_the_kernels():
    r = profile("fused", "clip-tiny", device="cpu", iters=1, warmup=0, latency_runs=0, measure_ceilings=False)
    _check_attributed(r)
    ex = executors.get("fused", dualfuse.load("clip-tiny"), device="cpu")
    plan = ex.runner(1, 1, ex.spec.text.context_length).plan
    stages = [e for e in r.events if e.tower != "host"]
    assert len(stages) == plan.num_launches
    assert sum(e.tower == "both" for e in stages) == plan.fused_stages
    assert sum(e.flops for e in stages) == pytest.approx(sum(s.flops for s in plan.stages))
    assert all(e.blocks for e in stages)
    assert r.summary["fused_us"] > 0 and r.summary["overlap_frac"] > 0


@pytest.mark.slow
@interpreter
def test_cli_compare_eager_fused(tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(["profile", "--model", "clip-tiny", "--compare", "eager,fused", "--device", "cpu", "--iters", "1",
               "--warmup", "0", "--latency-runs", "0", "--no-ceilings", "--out", str(out)])
    assert rc == 0
    text = (out / "report.md").read_text()
    assert "## Side by side" in text and "| eager | fused |" in text.replace("|  | eager | fused |", "| eager | fused |")
    for row in ("kernels / ops per forward", "busy", "gaps: count", "towers overlap", "latency"):
        assert row in text
    data = json.loads((out / "profile.json").read_text())
    assert data["schema"] == "dualfuse.profile.compare/1" and data["executors"] == ["eager", "fused"]
    k = {r["metric"]: r for r in data["comparison"]}["kernels / ops per forward"]
    assert int(k["fused"]) < int(k["eager"])
    for f in ("trace-eager.json", "trace-fused.json", "timeline.png", "roofline.png"):
        assert (out / f).exists(), f
    assert (out / "timeline.png").read_bytes()[:8] == PNG


def test_cli_errors(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["profile", "--model", "clip-tiny", "--executor", "fused", "--device", "cpu",
                 "--out", str(tmp_path)]) == 2
    assert "TRITON_INTERPRET=1" in capsys.readouterr().err
    assert main(["profile", "--model", "clip-tiny", "--executor", "nope", "--device", "cpu"]) == 2
    assert "unknown executor" in capsys.readouterr().err
    assert main(["profile", "--model", "clip-tiny", "--compare", "eager", "--device", "cpu"]) == 2


# ============================================================================================ GPU

gpu = pytest.mark.gpu


def _gpu_profile(name, model="clip-tiny", **kw):
    kw.setdefault("iters", 2)
    return profile(name, model, device="cuda", dtype="fp16", **kw)


@gpu
def test_gpu_eager_kernels_attributed_with_grids():
    r = _gpu_profile("eager")
    _check_attributed(r)
    assert all(e.blocks for e in r.events if e.op_class in ("gemm", "attention", "norm"))
    assert r.data["sm_count"] and r.data["ceilings"]["peak_bw"] > 1e11 and r.data["ceilings"]["peak_flops"] > 1e13
    assert r.summary["kernels"] > 30 and r.summary["overlap_frac"] == 0
    assert r.data["latency"]["median_ms"] > 0


@gpu
@pytest.mark.parametrize("model", ["clip-tiny", "siglip-tiny", "open_clip-tiny"])
def test_gpu_graph_replay_attributed_in_order(model):
    if model.startswith("open_clip"):
        pytest.importorskip("open_clip", reason="open_clip is not installed here (pip install 'dualfuse[openclip]')")
    eager = _gpu_profile("eager", model, iters=1)
    r = _gpu_profile("graph", model)
    _check_attributed(r)
    notes = r.data["attribution"]["notes"]
    assert not [n for n in notes if "left unattributed" in n]
    tower_kernels = lambda p: sum(1 for e in p.events if e.tower in ("vision", "text") and e.iteration == 0)  # noqa
    # the replay holds at least the labelled run's kernels (more where code takes other paths under capture)
    assert tower_kernels(r) >= tower_kernels(eager)
    if tower_kernels(r) != tower_kernels(eager):
        assert any("aligned per stream" in n for n in notes)
    # the two branches of the graph run concurrently at least a little
    assert r.summary["concurrent_us"] > 0


@gpu
def test_gpu_fused_graph_stage_per_kernel():
    r = _gpu_profile("fused")
    _check_attributed(r)
    ex = executors.get("fused", dualfuse.load("clip-tiny"), device="cuda", dtype="fp16")
    plan = ex.runner(1, 1, ex.spec.text.context_length).plan
    it0 = [e for e in r.events if e.iteration == 0 and e.tower != "host"]
    assert len(it0) == plan.num_launches
    assert sum(e.tower == "both" for e in it0) == plan.fused_stages
    assert all(e.blocks for e in it0)


@gpu
def test_gpu_streams_compile_nvtx_and_compare(tmp_path):
    s = _gpu_profile("streams", nvtx=True)
    _check_attributed(s)
    c = _gpu_profile("compile", iters=1)
    assert {e.tower for e in c.events} <= {"vision", "text", "host"}
    files = write_compare([s, c], str(tmp_path / "cmp"))
    assert "Side by side" in open(files["report"]).read()


@gpu
def test_gpu_ncu_reports_status(tmp_path):
    out = tmp_path / "ncu"
    rc = main(["profile", "--model", "clip-tiny", "--executor", "eager", "--iters", "1", "--ncu", "--ncu-kernels", "2",
               "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "profile.json").read_text())
    assert data["ncu"]["status"] in ("ok", "missing", "denied", "failed")
    assert data["ncu"]["message"]
    if data["ncu"]["status"] == "ok":
        assert "occupancy" in (out / "report.md").read_text()

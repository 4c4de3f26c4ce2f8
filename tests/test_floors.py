"""Device floors (dualfuse.floors) and the targets table (dualfuse.targets): numbers checked against sums written
out by hand from clip-tiny's config dims, the target error, the JSON schema."""
import json
import math

import pytest
import torch

from dualfuse import cli
from dualfuse.adapters import to_spec
from dualfuse.floors import card_floor, floor_share, floors, share_line
from dualfuse.presets import PRESETS, build_hf
from dualfuse.targets import TARGETS, get_target, target_for_card


@pytest.fixture(scope="module")
def tiny():
    return to_spec(build_hf("clip-tiny", meta=True))


def _tiny_dims():
    v, t, top = PRESETS["clip-tiny"].vision, PRESETS["clip-tiny"].text, PRESETS["clip-tiny"].top
    return (v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"], v["num_attention_heads"],
            v["image_size"], v["patch_size"], t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"],
            t["num_attention_heads"], t["max_position_embeddings"], t["vocab_size"], top["projection_dim"])


def _expected(image_batch, text_batch, L, fold_ln=False):
    """Weight elements, activation bytes and FLOPs of clip-tiny, by hand from the config (HF CLIP: biased q/k/v/out/
    fc1/fc2, no patch or projection bias, a class token, pre-LN on the vision tower, causal text pooled at EOS).
    fold_ln: the LayerNorms before FC1 (every layer) and before QKV (layers >= 1) become part of the GEMM: their
    launches, which read and wrote rows x width, are gone."""
    dv, fv, nv, hv, img, p, dt, ft, nt, ht, ctx, vocab, e = _tiny_dims()
    patches = (img // p) ** 2
    sv = patches + 1
    lin = bias = chans = norm = emb = 0
    act = flops = 0.0
    if image_batch:
        B, rows = image_batch, image_batch * sv
        lin += nv * (3 * dv * dv + dv * dv + fv * dv + dv * fv) + e * dv
        bias += nv * (3 * dv + dv + fv + dv)
        chans += nv * (3 * dv + dv + fv + dv) + e
        norm += (2 * nv + 2) * 2 * dv  # ln1, ln2 per block, pre-LN, post-LN
        emb += dv * 3 * p * p + sv * dv + dv  # patch weight, positions, class token
        act += 2 * (B * patches * 3 * p * p + rows * dv)  # pixels read, embeddings written
        act += 2 * 2 * rows * dv  # pre-LN
        per_layer = (2 * rows * dv + (rows * dv + rows * 3 * dv) + B * hv * (dv // hv) * 4 * sv
                     + 3 * rows * dv + 2 * rows * dv + (rows * dv + rows * fv) + (rows * fv + 2 * rows * dv))
        act += 2 * nv * per_layer + 2 * 2 * B * dv + 2 * (B * dv + B * e)  # layers, pooled LN, projection
        act -= fold_ln * (2 * nv - 1) * 2 * 2 * rows * dv
        flops += 2 * B * patches * dv * 3 * p * p + 8 * rows * dv  # patch GEMM, pre-LN
        flops += nv * (2 * rows * dv * (3 * dv + dv + fv) + 2 * rows * fv * dv + 4 * B * sv * sv * dv
                       + 2 * 8 * rows * dv)
        flops += 8 * B * dv + 2 * B * dv * e
    if text_batch:
        B, rows = text_batch, text_batch * L
        lin += nt * (3 * dt * dt + dt * dt + ft * dt + dt * ft) + e * dt
        bias += nt * (3 * dt + dt + ft + dt)
        chans += nt * (3 * dt + dt + ft + dt) + e
        norm += (2 * nt + 1) * 2 * dt
        emb += min(rows, vocab) * dt + L * dt  # only the gathered token rows; the positions read
        act += 2 * rows * dt + 8 * rows  # embeddings written; EOS index (ids read)
        per_layer = (2 * rows * dt + (rows * dt + rows * 3 * dt) + B * ht * (dt // ht) * 4 * L
                     + 3 * rows * dt + 2 * rows * dt + (rows * dt + rows * ft) + (rows * ft + 2 * rows * dt))
        act += 2 * nt * per_layer + 2 * 2 * B * dt + 2 * (B * dt + B * e)
        act -= fold_ln * (2 * nt - 1) * 2 * 2 * rows * dt
        flops += rows * dt + rows  # embedding adds, EOS index
        flops += nt * (2 * rows * dt * (3 * dt + dt + ft) + 2 * rows * ft * dt + 0.5 * 4 * B * L * L * dt
                       + 2 * 8 * rows * dt)
        flops += 8 * B * dt + 2 * B * dt * e
    return dict(lin=lin, bias=bias, chans=chans, norm=norm, emb=emb, act=act, flops=flops)


@pytest.mark.parametrize("target,bi,bt,L", [("orin-nano", 1, 1, 16), ("agx-orin", 8, 3, 16), ("h200", 2, 0, 16),
                                             ("orin-nx", 0, 4, 9), ("h100", 32, 32, 16)])
def test_floor_matches_hand_computed_bytes_and_flops(tiny, target, bi, bt, L):
    t = get_target(target)
    x = _expected(bi, bt, L, fold_ln=t.capability[0] < 9)
    f = floors(tiny, target, bi, bt, L)
    other = x["bias"] + x["norm"] + x["emb"]
    # int8: one fp32 scale per output channel, the scale dtype the fused executor stores (quantize.SCALE_BYTES)
    want_w = {"fp16": 2 * (x["lin"] + other), "int8": x["lin"] + 4 * x["chans"] + 2 * other}
    assert f.fold_ln == (t.capability[0] < 9)
    for p in f.precisions:
        assert p.weight_bytes == want_w[p.weights]
        assert p.activation_bytes == pytest.approx(x["act"], rel=1e-12)
        assert p.flops == pytest.approx(x["flops"], rel=1e-12)
        mem = (want_w[p.weights] + x["act"]) / t.dram_bandwidth * 1e3
        comp = x["flops"] / t.fp16_dense * 1e3
        assert p.memory_ms == pytest.approx(mem) and p.compute_ms == pytest.approx(comp)
        assert p.floor_ms == pytest.approx(max(mem, comp))
        assert p.bound == ("memory" if mem >= comp else "compute")
    # fp16 int8 scales: 2 bytes fewer per output channel
    f16 = floors(tiny, target, bi, bt, L, scale_bytes=2).get("int8")
    assert f.get("int8").weight_bytes - f16.weight_bytes == 2 * x["chans"]


@pytest.mark.parametrize("name", ["clip-tiny", "siglip-tiny"])
def test_floor_weight_bytes_are_quantize_weight_bytes(name):
    """One count of the weight bytes: an image-only call's floor reads what dualfuse.quantize.weight_bytes says the
    fused executor reads (fp32 scales, SigLIP's head key/value rows only), for both precisions."""
    from dualfuse.quantize import SCALE_BYTES, SCALE_DTYPE, weight_bytes

    assert SCALE_DTYPE == torch.float32 and SCALE_BYTES == 4
    spec = to_spec(build_hf(name, meta=True))
    f = floors(spec, "agx-orin", 4, 0)
    for w in ("fp16", "int8"):
        assert f.get(w).weight_bytes == weight_bytes(spec, w, torch.float16, towers=("vision",))["total"]


def test_launches_follow_the_targets_fold_ln_default(tiny):
    from dualfuse.plan import make_plan

    assert floors(tiny, "orin-nano").launches == make_plan(tiny, 1, 1, fold_ln=True).num_launches
    assert floors(tiny, "h100").launches == make_plan(tiny, 1, 1, fold_ln=False).num_launches
    assert floors(tiny, "h100", fold_ln=True).launches == make_plan(tiny, 1, 1, fold_ln=True).num_launches


def test_siglip_int8_counts_head_kv_rows_only():
    spec = to_spec(build_hf("siglip-tiny", meta=True))
    f = floors(spec, "agx-orin", 1, 1)
    v, t = spec.vision, spec.text
    h = v.pool_head
    d = v.width
    head = 2 * d * d + h.out.out_features * d + h.fc1.out_features * d + d * h.fc1.out_features
    blocks = sum(b.qkv.weight.numel() + b.out.weight.numel() + b.fc1.weight.numel() + b.fc2.weight.numel()
                 for tw in (v, t) for b in tw.blocks)
    proj = t.projection.weight.numel() if t.projection is not None else 0
    assert f.weight_breakdown["linear"] == blocks + head + proj


def test_targets_table_has_a_source_for_every_number():
    numbers = ("num_sms", "capability", "dram_bandwidth", "fp16_dense", "int8_dense", "smem_per_block", "smem_per_sm",
               "l2_bytes", "registers_per_thread", "threads_per_block")
    assert set(TARGETS) == {"orin-nano", "orin-nano-super", "orin-nx", "agx-orin", "h100", "h200"}
    for t in TARGETS.values():
        for k in numbers:
            assert t.sources.get(k), (t.name, k)
        if t.name.startswith("orin") or t.name == "agx-orin":
            assert t.capability == (8, 7) and t.smem_per_block == 166912
            assert "derived" in t.sources["fp16_dense"] and "derived" in t.sources["int8_dense"]
            # dense fp16 = SMs x clock x 2048 FLOP/clk/SM: the derivation is in the note
            assert "x 2048" in t.sources["fp16_dense"]
    assert TARGETS["orin-nano"].dram_bandwidth == 68e9 and TARGETS["orin-nano-super"].dram_bandwidth == 102e9
    assert TARGETS["agx-orin"].num_sms == 16 and TARGETS["orin-nano"].num_sms == 8
    assert math.isclose(TARGETS["orin-nano"].int8_dense, 20e12)  # half of 40 sparse TOPS
    assert math.isclose(TARGETS["agx-orin"].int8_dense, 85e12)  # half of 170 sparse TOPS
    assert TARGETS["h200"].dram_bandwidth == 4.8e12 and TARGETS["h100"].dram_bandwidth == 3.35e12


def test_unknown_target_lists_targets(tiny, capsys):
    with pytest.raises(ValueError, match="orin-nano, orin-nano-super, orin-nx, agx-orin, h100, h200"):
        floors(tiny, "orin-mega")
    rc = cli.main(["plan", "--model", "clip-tiny", "--target", "orin-mega"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("dualfuse: error: unknown target 'orin-mega'") and "agx-orin" in err


def test_share_of_floor(tiny):
    assert floor_share(0.5, 2.0) == 0.25
    with pytest.raises(ValueError):
        floor_share(0.5, 0)
    assert target_for_card("NVIDIA H200") is TARGETS["h200"] and target_for_card("NVIDIA H100 80GB HBM3").name == "h100"
    assert target_for_card("NVIDIA A10") is None
    line = share_line(tiny, "NVIDIA H200", 1.0, 1, 1)
    f = floors(tiny, "h200", 1, 1).get("fp16")
    assert line.startswith(f"this run reached {100 * f.floor_ms:.1f}% of the h200 floor")
    assert share_line(tiny, "NVIDIA A10", 1.0, 1, 1) is None


def test_card_floor_per_weight_format(tiny):
    """card_floor: the floor of a call shape on the card a device name denotes, per weight format."""
    target, f16 = card_floor(tiny, "NVIDIA H100 80GB HBM3", 1, 1)
    _, q8 = card_floor(tiny, "NVIDIA H100 80GB HBM3", 1, 1, weights="int8")
    assert target.name == "h100"
    assert f16 == floors(tiny, "h100", 1, 1).get("fp16") and q8 == floors(tiny, "h100", 1, 1).get("int8")
    assert q8.weight_bytes < f16.weight_bytes
    _, img = card_floor(tiny, "NVIDIA H200", 2, 0)
    assert img == floors(tiny, "h200", 2, 0).get("fp16")
    assert card_floor(tiny, "NVIDIA A10", 1, 1) is None


def test_int8_benchmark_floor_columns(tiny):
    """benchmarks/int8.py puts the card's floor and the share reached beside each end-to-end median (full card of a
    known target only; a green context or an unknown card gets a note instead)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "int8.py"
    spec_ = importlib.util.spec_from_file_location("int8_bench", path)
    mod = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(mod)

    def row():
        return dict(executors={"fused fp16": dict(weights="fp16", median_ms=0.5),
                               "fused int8": dict(weights="int8", median_ms=0.8)})

    r = row()
    mod._floor_shares(r, tiny, 1, 1, "NVIDIA H100 80GB HBM3", None)
    for e in r["executors"].values():
        f = floors(tiny, "h100", 1, 1).get(e["weights"])
        assert e["floor_target"] == "h100" and e["floor_ms"] == f.floor_ms and e["floor_bound"] == f.bound
        assert e["floor_share"] == pytest.approx(f.floor_ms / e["median_ms"])
    assert "floor_note" not in r
    r = row()
    mod._floor_shares(r, tiny, 1, 1, "NVIDIA H100 80GB HBM3", 8)
    assert "8-SM green context" in r["floor_note"] and all("floor_share" not in e for e in r["executors"].values())
    r = row()
    mod._floor_shares(r, tiny, 1, 1, "NVIDIA A10", None)
    assert "not a known target" in r["floor_note"] and all("floor_share" not in e for e in r["executors"].values())


def test_plan_target_json_schema(tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = cli.main(["plan", "--model", "clip-tiny", "--batch", "2", "--text-length", "9", "--target", "orin-nano",
                   "--target", "h200", "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0 and "orin-nano" in printed and "floor" in printed and "memory" in printed
    doc = json.loads(out.read_text())
    assert {"stages", "totals", "floors"} <= set(doc)
    assert [f["target"]["name"] for f in doc["floors"]] == ["orin-nano", "h200"]
    f = doc["floors"][0]
    assert f["schema"] == "dualfuse.floor/1"
    assert (f["image_batch"], f["text_batch"], f["text_len"]) == (2, 2, 9)
    assert {"launches", "fold_ln", "weight_breakdown", "notes", "target", "precisions"} <= set(f)
    assert set(f["target"]["sources"]) >= {"dram_bandwidth", "fp16_dense", "int8_dense", "smem_per_block"}
    assert [p["weights"] for p in f["precisions"]] == ["fp16", "int8"]
    for p in f["precisions"]:
        assert set(p) >= {"weight_bytes", "activation_bytes", "bytes", "flops", "memory_ms", "compute_ms",
                          "int8_peak_ms", "floor_ms", "bound"}
        assert p["floor_ms"] == max(p["memory_ms"], p["compute_ms"])
        # the prediction: the floor plus one measured launch gap per launch, and said to be one
        assert p["predicted_ms"] == pytest.approx(p["floor_ms"] + f["launches"] * f["launch_gap_us"] / 1e3)
    assert f["launch_gap_us"] == 1.19 and "prediction, not a measurement" in printed


def test_profile_floor_entry():
    from dualfuse.floors import profile_floor

    p = dict(model="clip-tiny", card="NVIDIA H100 80GB HBM3", image_batch=1, text_batch=1, text_len=16,
             latency=dict(median_ms=0.5))
    e = profile_floor(p)
    f = floors(to_spec(build_hf("clip-tiny", meta=True)), "h100", 1, 1, 16).get("fp16")
    assert e["target"] == "h100" and e["share"] == pytest.approx(f.floor_ms / 0.5)
    assert e["line"].startswith("this run reached ") and "of the h100 floor" in e["line"]
    assert profile_floor(dict(p, card="cpu")) is None and profile_floor(dict(p, latency={})) is None


def test_profile_report_prints_the_floor_line():
    from dualfuse.profile.report import _timeline_rows

    p = dict(device_type="cuda", analysis=dict(summary={}), latency={},
             floor=dict(line="this run reached 12.0% of the h200 floor (0.063 ms, memory-bound, fp16 weights)"))
    rows = _timeline_rows(p)
    assert rows[-1] == ["device floor", p["floor"]["line"]]
    assert all(r[0] != "device floor" for r in _timeline_rows(dict(p, floor=None)))

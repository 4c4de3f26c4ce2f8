"""Measured shares of bandwidth per step kind (dualfuse.shares) and `plan --target --shares`: predictions from a given
JSON, against hand-computed figures."""
import json

import pytest

from dualfuse import shares as S
from dualfuse.adapters import to_spec
from dualfuse.cli import main
from dualfuse.presets import build_hf


@pytest.fixture(scope="module")
def spec():
    return to_spec(build_hf("clip-vit-b-32", meta=True))


def test_every_stage_has_a_kind(spec):
    from dualfuse.plan import make_plan

    plan = make_plan(spec, 1, 1, fold_ln=True)
    kinds = [S.stage_kind(s) for s in plan.stages]
    assert set(kinds) <= set(S.KINDS)
    assert {"gemm", "attention", "embed", "head"} <= set(kinds)


def test_all_shares_one_is_bytes_over_bandwidth(spec):
    # shares of 1.0: the prediction is the plan's bytes at the target's bandwidth plus the launch gaps
    by_kind, launches = S.kind_bytes(spec, 1, 0, weights="fp16", fold_ln=True)
    p = S.predict(spec, "orin-nano", 1, 0, shares=S.BandwidthShares({}), weights="fp16", launch_gap_us=2.0)
    assert p["predicted_ms"] == pytest.approx(sum(by_kind.values()) / 68e9 * 1e3 + launches * 2.0 / 1e3)


def test_half_share_doubles_that_kind(spec):
    full = S.predict(spec, "orin-nano", 1, 1, shares=S.BandwidthShares({}), launch_gap_us=0.0)
    half = S.predict(spec, "orin-nano", 1, 1, shares=S.BandwidthShares({"gemm": 0.5}), launch_gap_us=0.0)
    assert half["ms_by_kind"]["gemm"] == pytest.approx(2 * full["ms_by_kind"]["gemm"])
    assert half["ms_by_kind"]["attention"] == pytest.approx(full["ms_by_kind"]["attention"])
    assert half["predicted_ms"] - full["predicted_ms"] == pytest.approx(full["ms_by_kind"]["gemm"])


def test_int8_gemm_bytes_about_half(spec):
    fp16, _ = S.kind_bytes(spec, 1, 1, weights="fp16")
    int8, _ = S.kind_bytes(spec, 1, 1, weights="int8")
    assert 0.5 < int8["gemm"] / fp16["gemm"] < 0.6  # weights halve; activations (~12% at 50 + 77 rows) stay
    assert int8["attention"] == fp16["attention"]


def test_bad_shares():
    with pytest.raises(ValueError, match="shares > 0"):
        S.BandwidthShares({"gemm": 0})
    with pytest.raises(ValueError, match="shares > 0"):
        S.BandwidthShares({"conv": 0.5})
    with pytest.raises(ValueError, match="expected a JSON object"):
        S.BandwidthShares.from_dict({"gemm": 0.5})


def test_scale_multiplies_the_prediction_and_round_trips(spec):
    base = S.predict(spec, "orin-nano", 1, 1, shares=S.BandwidthShares({"gemm": 0.6}), launch_gap_us=2.0)
    scaled_shares = S.BandwidthShares.from_dict(S.BandwidthShares({"gemm": 0.6}, scale=0.8).to_dict())
    assert scaled_shares.scale == 0.8
    scaled = S.predict(spec, "orin-nano", 1, 1, shares=scaled_shares, launch_gap_us=2.0)
    assert scaled["predicted_ms"] == pytest.approx(0.8 * base["predicted_ms"]) and scaled["scale"] == 0.8
    assert scaled["ms_by_kind"]["gemm"] == pytest.approx(0.8 * base["ms_by_kind"]["gemm"])
    assert S.BandwidthShares.from_dict({"shares": {}}).scale == 1.0  # files written before the scale existed
    for bad in (0, -1.0, 11.0, "1"):
        with pytest.raises(ValueError, match="forward scale"):
            S.BandwidthShares({}, scale=bad)


def test_forward_scale_is_the_median_of_measured_over_predicted(spec):
    shares = S.BandwidthShares({"gemm": 0.5})
    by_kind, launches = S.kind_bytes(spec, 1, 1, fold_ln=False)
    bw = 50e9
    pred = S.predicted_ms(by_kind, launches, bw, shares, 2.0)
    # by hand: gemm bytes at half the bandwidth, the other kinds at the full bandwidth, plus the launch gaps
    by_hand = sum(b / (bw * (0.5 if k == "gemm" else 1.0)) * 1e3 for k, b in by_kind.items()) + launches * 2e-3
    assert pred == pytest.approx(by_hand)
    fwd = [dict(ms=r * pred, bytes_by_kind=by_kind, launches=launches) for r in (0.6, 1.0, 0.7)]
    assert S.forward_scale(fwd, bw, shares, gap_us=2.0) == pytest.approx(0.7)
    assert S.forward_scale(fwd[:2], bw, shares, gap_us=2.0) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="at least one"):
        S.forward_scale([], bw, shares)


def test_plan_cli_prints_and_writes_predictions(tmp_path, capsys):
    path = tmp_path / "shares.json"
    path.write_text(json.dumps(S.BandwidthShares({"gemm": 0.8, "attention": 0.5, "layernorm": 0.5, "embed": 0.6,
                                                  "head": 0.4}, {"card": "NVIDIA H100", "sms": 8}).to_dict()))
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", "clip-vit-b-32", "--target", "orin-nano", "--shares", str(path),
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "predicted ms from measured shares" in text and "predictions, not measurements" in text
    doc = json.loads(out.read_text())
    preds = doc["predictions_measured_shares"]
    assert [p["weights"] for p in preds] == ["fp16", "int8"]
    assert preds[1]["predicted_ms"] < preds[0]["predicted_ms"]
    assert preds[0]["shares"]["gemm"] == 0.8 and preds[0]["source"]["card"] == "NVIDIA H100"
    # the prediction at measured shares is slower than the floor, which assumes 100%
    floor = doc["floors"][0]["precisions"][0]["floor_ms"]
    assert preds[0]["predicted_ms"] > floor

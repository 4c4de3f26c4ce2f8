"""The stand-in scripts' logic that runs without a GPU (the runs themselves are GPU runs): benchmarks/standin.py's
--rows filter and its errors, --merge joining the tagged runs of the fewest SMs into one shares file, and
benchmarks/towers.py's --stand-in errors."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("standin_script", ROOT / "benchmarks" / "standin.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_rows_filter(script):
    assert script.parse_rows(None) is None
    assert script.parse_rows("targets") == script.TARGET_ROWS
    assert script.parse_rows(" graph , fused int8 ") == ("graph", "fused int8")
    with pytest.raises(ValueError, match=r"unknown row\(s\) \['grph'\]; expected 'targets'"):
        script.parse_rows("graph,grph")


def _stage(gemm_bytes, gemm_ms, forward_ms):
    return dict(kinds={"gemm": dict(bytes=gemm_bytes, ms=gemm_ms, share=0.0)},
                forward=dict(ms=forward_ms, bytes_by_kind={"gemm": gemm_bytes}, launches=10))


def _doc(sms, stage, gbps=50.0, card="card", date="2026-12-08 01:00:00 UTC", commit="abc"):
    rows = [dict(case=c, row="fused fp16", fold_ln=True) for c in stage]
    return dict(sms=sms, bandwidth_gbps=gbps, stage_shares=stage, rows=rows,
                env=dict(card=card, date=date, commit=commit), shares=dict(source=dict(sms=sms or 132)))


def test_merge_joins_tagged_runs_of_the_fewest_sms(script, tmp_path):
    out, pkg = tmp_path / "runs", tmp_path / "pkg"
    out.mkdir()
    # two 8-SM runs of different cases (tags), one 16-SM run that must not count; 50 GB/s: 1e8 bytes take 2 ms
    (out / "standin-sms8-b32.json").write_text(json.dumps(_doc(8, {"b32": _stage(1e8, 4.0, 5.0)})))
    (out / "standin-sms8-siglip.json").write_text(json.dumps(_doc(8, {"siglip": _stage(3e8, 8.0, 9.0)})))
    (out / "standin-sms16.json").write_text(json.dumps(_doc(16, {"b32": _stage(1e8, 2.0, 2.5)})))
    assert script.merge(str(out), pkg) == 0
    got = json.loads((pkg / "standin_shares.json").read_text())
    # sum of floors / sum of times over both 8-SM cases: (2 + 6) ms / (4 + 8) ms
    assert got["shares"]["gemm"] == pytest.approx(8 / 12)
    assert got["source"]["sms"] == 8 and sorted(got["source"]["cases"]) == ["b32", "siglip"]
    assert {c["case"] for c in got["source"]["scale_from"]} == {"b32", "siglip"}
    assert got["source"]["per_case"]["b32"]["fold_ln"] is True


def test_merge_later_run_wins_old_and_broken_files_skipped(script, tmp_path, capsys):
    out, pkg = tmp_path / "runs", tmp_path / "pkg"
    out.mkdir()
    old = _doc(8, {"b32": _stage(1e8, 8.0, 9.0)}, date="2026-12-07 22:00:00 UTC", commit="old")
    new = _doc(8, {"b32": _stage(1e8, 4.0, 5.0)}, date="2026-12-08 01:00:00 UTC", commit="new")
    (out / "standin-sms8-z.json").write_text(json.dumps(old))  # sorts after the newer run's file
    (out / "standin-sms8-a.json").write_text(json.dumps(new))
    (out / "standin-sms8-cut.json").write_text('{"sms": 8, "rows": [')  # a write cut off
    legacy = _doc(8, {"b32": dict(gemm=dict(bytes=1, ms=1))})  # stage shares before the per-kind format
    (out / "standin-sms8-legacy.json").write_text(json.dumps(legacy))
    assert script.merge(str(out), pkg) == 0
    said = capsys.readouterr().out
    assert "skipped" in said and "cut.json: unreadable" in said and "legacy.json" in said
    got = json.loads((pkg / "standin_shares.json").read_text())
    assert got["shares"]["gemm"] == pytest.approx(2 / 4)  # the 2026-12-08 run's timing
    assert got["source"]["commit"] == "new" and got["source"]["per_case"]["b32"]["commit"] == "new"


def test_merge_refuses_two_cards_and_says_when_nothing_to_merge(script, tmp_path, capsys):
    out, pkg = tmp_path / "runs", tmp_path / "pkg"
    out.mkdir()
    assert script.merge(str(out), pkg) == 0 and not (pkg / "standin_shares.json").exists()
    assert "no stand-in run with stage shares" in capsys.readouterr().out
    (out / "standin-sms8-a.json").write_text(json.dumps(_doc(8, {"b32": _stage(1e8, 4.0, 5.0)}, card="H100")))
    (out / "standin-sms8-b.json").write_text(json.dumps(_doc(8, {"siglip": _stage(1e8, 4.0, 5.0)}, card="H200")))
    assert script.merge(str(out), pkg) == 2
    assert "different cards" in capsys.readouterr().out and not (pkg / "standin_shares.json").exists()


def test_every_row_name_is_known(script):
    """The --rows vocabulary (ALL_ROWS) covers every row a case can have, and nothing else."""
    import argparse

    import torch

    args = argparse.Namespace(no_compile=False, rows=None)
    built = {r[0] for r in script._row_specs(args, torch, script.HOST_INPUTS_CASE)}
    if not torch.cuda.is_available():  # rows that need a GPU (graph, fp8, inputs in host memory) are added there
        built |= {"graph", "fused fp8", "fused fp16 [inputs host]", "graph [inputs host]"}
    assert built == set(script.ALL_ROWS)


def test_towers_stand_in_errors(capsys):
    """benchmarks/towers.py --stand-in: an unknown target, and --sms beside it, exit 2 with a message."""
    spec = importlib.util.spec_from_file_location("towers_script", ROOT / "benchmarks" / "towers.py")
    towers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(towers)
    assert towers.main(["--stand-in", "tx2"]) == 2
    assert "unknown target 'tx2'" in capsys.readouterr().err
    assert towers.main(["--stand-in", "orin-nano", "--sms", "8"]) == 2
    assert "drop --sms" in capsys.readouterr().err

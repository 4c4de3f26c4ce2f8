"""`dualfuse report` from fixture JSON (bench at two batches with energy, an SM sweep, an eval run)."""
import os
import shutil

import pytest

from dualfuse import report

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "report")
FILES = ["bench_b1.json", "bench_b32.json", "bench_sms.json", "eval.json"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    bad = out / "garbage.json"
    bad.write_text("{ not json")
    other = out / "other.json"
    other.write_text('{"schema": "something/else"}')
    paths = [os.path.join(FIX, f) for f in FILES] + [str(bad), str(other), str(out / "missing.json")]
    md = report.build_report(paths, str(out / "site"))
    return out / "site", open(md).read()


def test_sections_and_plots(built):
    site, md = built
    for heading in ("## Runs", "## Latency per executor per batch", "## Energy", "## SM-limited runs",
                    "## Accuracy parity"):
        assert heading in md, heading
    pngs = sorted(f for f in os.listdir(site) if f.endswith(".png"))
    assert any(p.startswith("latency-") for p in pngs) and any(p.startswith("speedup-") for p in pngs)
    assert {"energy.png", "efficiency.png", "accuracy.png"} <= set(pngs)
    assert any(p.startswith("sms-") for p in pngs)
    for p in pngs:  # every referenced image exists and is a real PNG
        assert f"]({p})" in md
        with open(site / p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_content(built):
    _, md = built
    # latency table: both batches, the unavailable row kept as its status
    assert "| B=1 | B=32 |" in md
    assert "| tensorrt | unavailable | unavailable |" in md
    assert "| fused † |" in md
    # speedup vs best stock of the same run: B=1 best stock is graph 1.1475 ms; fused 0.425 -> 2.70x
    assert "| fused | 2.70×" in md
    # energy table carries the measured numbers and the source
    assert "NVML total energy counter" in md and "| eager | 2.97 |" in md
    # SM sweep: columns in SM order, and what is not emulated
    assert "| executor | 8 SMs | 16 SMs | full |" in md
    assert "memory bandwidth" in md and "Orin Nano" in md
    # accuracy: pass/fail verdicts, unavailable executor, true accuracy next to the reference's
    assert "| PASS |" in md and "FAIL: image min cosine" in md
    assert "unavailable: not installed" in md
    assert "top-1 0.610 vs reference 0.610" in md


def test_bad_files_listed_not_fatal(built):
    _, md = built
    assert "**Skipped:**" in md
    assert "garbage.json: cannot read" in md
    assert "other.json: not a dualfuse bench/eval result" in md
    assert "missing.json: cannot read" in md


def test_cli(tmp_path, capsys):
    from dualfuse import cli

    for f in FILES[:2]:
        shutil.copy(os.path.join(FIX, f), tmp_path / f)
    rc = cli.main(["report", "--json", str(tmp_path / FILES[0]), str(tmp_path / FILES[1]), "--out",
                   str(tmp_path / "out")])
    assert rc == 0 and (tmp_path / "out" / "report.md").is_file()
    assert "report written" in capsys.readouterr().out
    assert cli.main(["report", "--json", str(tmp_path / "nope.json"), "--out", str(tmp_path / "o2")]) == 2

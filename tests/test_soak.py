"""The soak (dualfuse/soak.py, benchmarks/soak.py): a short CPU run under the interpreter checks what a CPU run can
check — bad calls raise, the good call after each is exact, every checked call equals its shape's reference, the
runner cache stays within max_graphs and nothing is rebuilt after the warm-up; the JSON and PNG are written. Memory
flatness and p99/p50 are checked by the full run on a GPU (benchmarks/soak.py)."""
import json

import pytest
import torch

from dualfuse.cli.soak import main
from dualfuse.soak import BAD_KINDS, Shape, shape_cycle


def test_shape_cycle_covers_batches_buckets_and_one_tower_calls():
    shapes = shape_cycle(77, (16, 32, 48, 64, 77))
    both = [s for s in shapes if s.kind == "both"]
    assert {s.images for s in both} == {1, 2, 4, 8} and {s.texts for s in both} == {1, 8, 64}
    # every bucket, at its length and just under it (padded up to it)
    assert {s.text_len for s in both} == {16, 13, 32, 29, 48, 45, 64, 61, 77, 74}
    assert [s.images for s in shapes if s.kind == "image"] == [1, 2, 4, 8]
    assert [s.texts for s in shapes if s.kind == "text"] == [1, 8, 64]
    assert Shape("both", 2, 8, 13).label == "img2+txt8x13" and Shape("text", 0, 8, 16).label == "txt8x16"
    # bucketing off: the context length only
    assert {s.text_len for s in shape_cycle(64, None) if s.kind != "image"} <= {64, 61}


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU version; the GPU runs benchmarks/soak.py in full")
def test_soak_on_cpu(tmp_path):
    rc = main(["--device", "cpu", "--model", "clip-tiny", "--calls", "16", "--bad-every", "5", "--out",
               str(tmp_path)])
    result = json.loads((tmp_path / "soak.json").read_text())
    checks = result["checks"]
    assert rc == 0, checks
    assert result["calls"] == 16 and (tmp_path / "soak.png").stat().st_size > 0
    # calls 4, 9, 14 were bad, one of each kind, each a ValueError naming the input
    assert [(b["call"], b["kind"]) for b in result["bad_calls"]] == list(zip((4, 9, 14), BAD_KINDS))
    assert all(b["raised"] and b["ok"] for b in result["bad_calls"]) and checks["bad_calls_raised"]["ok"]
    assert checks["good_after_bad_exact"]["ok"] and checks["good_after_bad_exact"]["detail"] == "3/3"
    assert checks["outputs_exact"]["ok"] and checks["outputs_exact"]["detail"] == "13/13 checked calls"
    bounded = checks["runners_bounded"]
    assert bounded["ok"] and bounded["detail"]["built_after_warmup"] == 0
    assert bounded["detail"]["max_runners"] <= bounded["detail"]["max_graphs"]
    # every shape of the cycle was measured; memory was sampled from the first call to the last
    assert set(result["per_shape"]) == {s["label"] for s in result["shapes"]}
    assert sum(v["calls"] for v in result["per_shape"].values()) == 13
    assert result["samples"][0]["call"] == 0 and result["samples"][-1]["call"] == 15
    assert all(m["rss"] > 0 for m in result["samples"])

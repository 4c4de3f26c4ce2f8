"""`dualfuse bench` end to end through the CLI entry point, on a tiny preset, plus the timing helpers."""
import json
import sys

import pytest
import torch

from dualfuse import cli, executors, reference
from dualfuse.bench import random_inputs
from dualfuse.timing import stats, time_calls

HAS_CUDA = torch.cuda.is_available()
FAST = ["--model", "clip-tiny", "--iters", "3", "--warmup", "1", "--no-progress"]


@pytest.mark.slow
def test_bench_runs_and_writes_json(tmp_path, capsys):
    path = tmp_path / "out" / "bench.json"
    rc = cli.main(["bench", *FAST, "--executors", "eager,streams,graph", "--batch", "2", "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "median ms" in out and "eager" in out
    data = json.loads(path.read_text())
    for key in ("card", "torch", "triton", "date", "args", "resolved", "environment", "model", "results",
                "best_stock", "eager_median_ms"):
        assert key in data, key
    assert data["args"]["model"] == "clip-tiny" and data["args"]["executors"] == "eager,streams,graph"
    assert data["resolved"]["image_batch"] == 2 and data["resolved"]["text_length"] == 16
    assert data["resolved"]["dtype"] == ("fp16" if HAS_CUDA else "fp32")
    rows = {r["executor"]: r for r in data["results"]}
    assert list(rows) == ["eager", "streams", "graph"]
    eager = rows["eager"]
    assert eager["status"] == "ok" and eager["runs"] == 3 and len(eager["samples_ms"]) == 3
    for k in ("median_ms", "p90_ms", "mean_ms", "min_ms"):
        assert eager[k] > 0
    assert eager["min_cosine"] > 0.9999 and eager["cosine_ok"] is True
    assert eager["speedup_vs_eager"] == pytest.approx(1.0)
    assert "time_vs_best_stock" not in eager  # the ratio is a speedup now: best stock median / this median
    best = rows[data["best_stock"]]
    assert eager["speedup_vs_best_stock"] == pytest.approx(best["median_ms"] / eager["median_ms"])
    assert "speedup vs eager ×" in out and "bigger is better" in out
    assert data["command"] == "dualfuse bench " + " ".join(
        [*FAST, "--executors", "eager,streams,graph", "--batch", "2", "--json", str(path)])
    if not HAS_CUDA:
        assert rows["graph"]["status"] == rows["streams"]["status"] == "needs CUDA"
        assert "needs CUDA" in out
        assert data["best_stock"] == "eager" and data["card"].startswith("CPU")


def test_unknown_executor_is_a_clear_error(capsys):
    rc = cli.main(["bench", *FAST, "--executors", "eager,warp"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "unknown executor(s): warp; known executors: eager, streams, graph, compile" in err


def test_unknown_model_is_a_clear_error(capsys):
    assert cli.main(["bench", "--model", "nope", "--no-progress"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err


class _Broken(executors.Executor):
    uses_source_model = False

    def _encode_image(self, px):
        raise RuntimeError("kernel exploded")

    _encode_text = _encode_image


class _Wrong(executors.Executor):
    uses_source_model = False

    def _encode_image(self, px):
        return torch.randn(px.shape[0], self.spec.embed_dim)

    def _encode_text(self, ids):
        return torch.randn(ids.shape[0], self.spec.embed_dim)


def test_failing_and_wrong_executors_get_rows_and_others_still_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(executors, "_REGISTRY", dict(executors._REGISTRY))
    executors.register("broken")(_Broken)
    executors.register("wrong")(_Wrong)
    path = tmp_path / "b.json"
    rc = cli.main(["bench", *FAST, "--executors", "broken,wrong,eager", "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 1  # something failed: the exit code says so
    rows = {r["executor"]: r for r in json.loads(path.read_text())["results"]}
    assert rows["broken"]["status"] == "error" and "kernel exploded" in rows["broken"]["message"]
    assert rows["wrong"]["status"] == "ok" and rows["wrong"]["cosine_ok"] is False
    assert rows["eager"]["status"] == "ok" and rows["eager"]["cosine_ok"] is True
    assert "kernel exploded" in out and "WRONG" in out


def test_single_tower_and_separate_batches(tmp_path):
    path = tmp_path / "b.json"
    assert cli.main(["bench", *FAST, "--executors", "eager", "--image-batch", "1", "--text-batch", "0",
                     "--json", str(path)]) == 0
    row = json.loads(path.read_text())["results"][0]
    assert row["status"] == "ok" and row["cosine_ok"]
    assert cli.main(["bench", *FAST, "--model", "siglip-tiny", "--executors", "eager", "--image-batch", "1",
                     "--text-batch", "5", "--text-length", "7", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert data["resolved"]["text_batch"] == 5 and data["resolved"]["text_length"] == 7


def test_cli_without_a_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "bench" in capsys.readouterr().out


def test_cli_offers_listed_subcommands_and_reports_broken_imports(tmp_path, capsys, monkeypatch):
    (tmp_path / "df_broken_cmd.py").write_text("raise ImportError('boom')\n")
    (tmp_path / "df_hello_cmd.py").write_text(
        '"""Say hello."""\ndef add_arguments(p):\n    p.add_argument("--who", default="world")\n'
        'def run(args):\n    print("hello", args.who)\n    return 0\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "SUBCOMMANDS", {"bench": "dualfuse.cli.bench", "hello": "df_hello_cmd",
                                             "broken": "df_broken_cmd"})
    helptext = cli.build_parser().format_help()
    assert "bench" in helptext and "hello" in helptext and "Say hello." in helptext
    assert "broken" in helptext and "(unavailable: ImportError)" in helptext
    assert cli.main(["hello", "--who", "you"]) == 0
    assert "hello you" in capsys.readouterr().out
    assert cli.main(["broken"]) == 1
    assert "cannot import df_broken_cmd: ImportError: boom" in capsys.readouterr().err
    sys.modules.pop("df_hello_cmd", None)


def test_stats_and_cpu_timer():
    s = stats([float(x) for x in range(10, 0, -1)])
    assert s["median_ms"] == pytest.approx(5.5) and s["p90_ms"] == pytest.approx(9.1)
    assert s["min_ms"] == 1 and s["mean_ms"] == pytest.approx(5.5) and s["runs"] == 10
    calls = []
    samples = time_calls(calls.append, 4, "cpu")
    assert calls == [0, 1, 2, 3] and len(samples) == 4 and all(x >= 0 for x in samples)


def test_random_inputs_are_deterministic_and_pool_where_expected():
    import dualfuse
    from dualfuse.adapters import to_spec

    spec = to_spec(dualfuse.load("clip-tiny"))  # first-EOS pooling, eos id 99
    a = random_inputs(spec, 2, 4, 10, sets=3, seed=1)
    b = random_inputs(spec, 2, 4, 10, sets=3, seed=1)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    assert not torch.equal(a[0][1], a[1][1])
    px, ids = a[0]
    assert px.shape == (2, 3, 32, 32) and ids.shape == (4, 10)
    pos = reference.pool_positions(spec.text, ids, 4, 10)
    assert (ids[torch.arange(4), pos] == 99).all() and (pos >= 1).all()
    assert random_inputs(spec, 0, 3, sets=1)[0][0] is None


@pytest.mark.slow
@pytest.mark.skipif(HAS_CUDA, reason="the CPU pass (interpreter); on a GPU benchmarks/gpu_figures.sh P runs it")
def test_fused_variants_against_another_commit(tmp_path):
    """fused_variants.py --base: another commit's executors (here a copy of this src/) beside this one's, one process."""
    import os
    import shutil
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    shutil.copytree(root / "src" / "dualfuse", tmp_path / "base" / "src" / "dualfuse",
                    ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "ab.json"
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(root / "src"), os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, str(root / "benchmarks" / "fused_variants.py"), "--model", "clip-tiny", "--device", "cpu",
           "--variants", "fused,base-fused", "--base", str(tmp_path / "base"), "--iters", "1", "--rounds", "1",
           "--warmup", "0", "--json", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["fused", "base-fused"]
    assert all(r["min_cosine"] >= 0.999 and len(r["samples"]) == 1 for r in rows.values())
    bad = subprocess.run(cmd[:-2] + ["--base", str(tmp_path / "missing")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert bad.returncode != 0 and "expected" in bad.stderr


@pytest.mark.slow
def test_compile_max_is_opt_in_and_reports_its_compile_time(tmp_path):
    """compile-max (torch.compile mode='max-autotune') is listed but not in the default set; its row records the
    first call's seconds as compile_s (aot_eager backend here: a CPU pipeline check, no autotuning)."""
    from dualfuse.bench import run_bench

    assert "compile-max" in executors.names() and "compile-max" not in executors.default_names()
    assert executors.executor_class("compile-max").compiles_on_first_call
    r = run_bench("clip-tiny", executors=["compile"], batch=1, iters=2, warmup=0, device="cpu")
    row = r.rows[0]
    assert row.status == "ok", row.message
    assert row.compile_s == row.first_call_s and row.compile_s > 0 and "compile" in row.notes
    assert r.to_dict()["results"][0]["compile_s"] == row.compile_s

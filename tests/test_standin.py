"""The stand-in option (dualfuse.standin; --stand-in on bench, stream, profile): parsing and its errors, each a
clear message and exit status 2 — no CUDA, an unknown target, a target whose SM count the card cannot give (a
pretend card) — and the share-of-floor arithmetic."""
import pytest
import torch

import dualfuse

from dualfuse import FusedConfig, GemmConfig, standin
from dualfuse.cli import main

NO_CUDA = not torch.cuda.is_available()


def test_config_validates_once():
    c = standin.StandInConfig("Orin-Nano")
    assert c.target == "orin-nano" and c.sms == 8 and c.activations == "device"
    assert standin.StandInConfig("agx-orin", activations="host").sms == 16
    with pytest.raises(standin.StandInError, match="unknown target 'tx2'.*orin-nano, orin-nano-super"):
        standin.StandInConfig("tx2")
    with pytest.raises(standin.StandInError, match="not a Jetson target"):
        standin.StandInConfig("h100")
    with pytest.raises(standin.StandInError, match="--stand-in-activations"):
        standin.StandInConfig("orin-nx", activations="l2")
    assert standin.resolve(None) is None and standin.resolve("orin-nx").sms == 8


def test_card_checks(monkeypatch):
    monkeypatch.setenv(standin.FAKE_CARD_ENV, "132,9")
    standin.check(standin.StandInConfig("orin-nano"))
    standin.check(standin.StandInConfig("agx-orin"))
    monkeypatch.setenv(standin.FAKE_CARD_ENV, "12,8")  # a 12-SM Ampere card cannot give AGX Orin's 16
    with pytest.raises(standin.StandInError, match="needs a green context of 16 SMs.*only 12 SMs"):
        standin.check(standin.StandInConfig("agx-orin"))


@pytest.mark.skipif(not NO_CUDA, reason="checks the no-CUDA error")
@pytest.mark.parametrize("command", [
    ["bench", "--model", "clip-tiny", "--stand-in", "orin-nano"],
    ["stream", "--synthetic", "2", "--prompts", "a,b", "--model", "clip-tiny", "--stand-in", "orin-nano"],
    ["profile", "--model", "clip-tiny", "--stand-in", "orin-nano"],
])
def test_no_cuda_exit_2(command, capsys):
    assert main(command) == 2
    err = capsys.readouterr().err
    assert "error: --stand-in needs a CUDA GPU" in err


@pytest.mark.parametrize("command", ["bench", "stream", "profile"])
def test_unknown_target_exit_2(command, capsys):
    extra = ["--synthetic", "2", "--prompts", "a,b"] if command == "stream" else []
    assert main([command, *extra, "--model", "clip-tiny", "--stand-in", "orin-tx9"]) == 2
    assert "unknown target 'orin-tx9'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["bench", "stream", "profile"])
def test_sm_count_the_card_cannot_give_exit_2(command, capsys, monkeypatch):
    monkeypatch.setenv(standin.FAKE_CARD_ENV, "10,9")  # 10 SMs, Hopper groups of 8: 16 is out of reach
    extra = ["--synthetic", "2", "--prompts", "a,b"] if command == "stream" else []
    assert main([command, *extra, "--model", "clip-tiny", "--stand-in", "agx-orin"]) == 2
    err = capsys.readouterr().err
    assert "--stand-in agx-orin needs a green context of 16 SMs" in err and "only 10 SMs" in err


def test_stand_in_and_sms_together_exit_2(capsys, monkeypatch):
    monkeypatch.setenv(standin.FAKE_CARD_ENV, "132,9")
    assert main(["bench", "--model", "clip-tiny", "--stand-in", "orin-nano", "--sms", "8"]) == 2
    assert "drop --sms" in capsys.readouterr().err


def test_share_of_floor_and_lines():
    info = standin.StandInInfo(standin.StandInConfig("orin-nano"), 50e9,
                               [dict(reader="triton", memory="host", gbps=50.0, identical=True)])
    # 0.30 GB at 50 GB/s = 6.0 ms; a row at 7.5 ms reaches 80% of it
    assert info.floor_ms(0.30e9) == pytest.approx(6.0)
    assert info.share(0.30e9, 7.5) == pytest.approx(0.8)
    text = " ".join(info.lines())
    assert "50.0 GB/s" in text and "PCIe latency is higher than LPDDR5's" in text and "green context" in text
    d = info.to_dict()
    assert d["measured_bandwidth_gbps"] == 50.0 and d["sms"] == 8 and d["target"] == "orin-nano"


def test_executor_kwargs_turn_tma_off_and_pick_the_byte_bound_regime():
    info = standin.StandInInfo(standin.StandInConfig("orin-nano"), 49e9)
    gemm = standin.executor_kwargs("fused", info.config, info)["config"].gemm
    assert gemm.tma is False and gemm.num_sms == 8 and gemm.regime.byte_bound
    assert gemm.regime.bandwidth == 49e9
    assert standin.executor_kwargs("graph", info.config, info) == {}
    # over a given config: its own fields and GEMM overrides kept, the stand-in's added
    base = FusedConfig(weights="int8", gemm=GemmConfig(BLOCK_K=64, tma=True))
    cfg = standin.executor_kwargs("fused", info.config, info, base)["config"]
    assert cfg.weights == "int8" and cfg.gemm.BLOCK_K == 64 and cfg.gemm.tma is False and cfg.gemm.num_sms == 8
    d = cfg.to_dict()["gemm"]  # JSON-ready: the regime as its fields
    assert d["regime"] == {"name": "byte-bound", "bandwidth": 49e9, "latency_us": gemm.regime.latency_us}


def test_stand_in_runs_without_pdl_so_layernorms_fold(monkeypatch):
    """Every Orin is sm_87: no PDL. The stand-in turns PDL off even on a card that has it (here a pretend one), so the
    fused executor takes its no-PDL default (LayerNorms folded into the GEMMs they feed), the path the target runs;
    the same config without the stand-in keeps PDL and does not fold."""
    from dualfuse.executors.fused import executor as fused_executor

    monkeypatch.setattr(fused_executor, "pdl_supported", lambda device: True)
    info = standin.StandInInfo(standin.StandInConfig("agx-orin"), 50e9)
    cfg = standin.fused_config(info.config, info, FusedConfig(pdl=True))
    assert cfg.pdl is False and cfg.fold_ln is None  # fold_ln left to the executor's auto choice
    model = dualfuse.load("clip-tiny")
    ex = dualfuse.executors.get("fused", model, dtype=torch.float32, device="cpu", config=cfg)
    assert ex.pdl is False and ex.fold_ln is True
    plain = dualfuse.executors.get("fused", model, dtype=torch.float32, device="cpu", config=FusedConfig(pdl=True))
    assert plain.pdl is True and plain.fold_ln is False


def test_row_weight_bytes_int8_about_half():
    import dualfuse
    from dualfuse.adapters import to_spec

    spec = to_spec(dualfuse.load("clip-tiny"))
    fp16 = standin.row_weight_bytes(spec, "graph", "int8", torch.float16, ("vision", "text"))
    int8 = standin.row_weight_bytes(spec, "fused", "int8", torch.float16, ("vision", "text"))
    assert 0.4 * fp16 < int8 < 0.8 * fp16
    assert standin.row_weight_bytes(spec, "fused", None, torch.float16, ("vision",)) < fp16


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA GPU")
def test_bench_stand_in_end_to_end_gpu(tmp_path):
    """`dualfuse bench --stand-in orin-nano` in a process of its own (a green context lasts the process): every row
    host-mapped, correct, with its share of the stand-in floor and the measured bandwidth in the JSON."""
    import json
    import subprocess
    import sys

    out = tmp_path / "b.json"
    proc = subprocess.run([sys.executable, "-m", "dualfuse.cli", "bench", "--model", "clip-tiny", "--stand-in",
                           "orin-nano", "--executors", "fused,graph,eager", "--iters", "5", "--warmup", "1",
                           "--no-progress", "--json", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "measured weight bandwidth" in proc.stdout and "PCIe latency" in proc.stdout
    doc = json.loads(out.read_text())
    assert doc["stand_in"]["sms"] == 8 and doc["stand_in"]["measured_bandwidth_gbps"] > 1
    for r in doc["results"]:
        assert r["status"] == "ok" and r["cosine_ok"] and r["standin_share"] > 0 and r["weight_bytes"] > 0


def test_placeable_executors():
    from dualfuse import executors

    assert all(standin.placeable(executors.executor_class(n)) for n in ("eager", "streams", "graph", "compile",
                                                                        "fused"))
    for n in ("onnxruntime", "tensorrt"):
        try:
            cls = executors.executor_class(n)
        except Exception:  # noqa: BLE001 - its optional package is missing here
            continue
        assert not standin.placeable(cls)

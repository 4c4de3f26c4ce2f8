"""Energy meters (NVML absent / faked, Jetson rails in a fake sysfs) and green-context SM sweeps (validation,
subprocess orchestration with a fake bench). Real green contexts and NVML are GPU tests."""
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from dualfuse import energy, green


# ----------------------------------------------------------------------------------------- energy

class FakeNVML:
    class NVMLError(Exception):
        pass

    class NVMLError_LibraryNotFound(NVMLError):
        pass

    def __init__(self, init_error=None, counter=True, watts=250.0):
        self.init_error, self.counter, self.watts = init_error, counter, watts
        self.t0 = time.perf_counter()

    def nvmlInit(self):
        if self.init_error:
            raise self.init_error

    def nvmlDeviceGetHandleByPciBusId_v2(self, bus):
        return "h"

    def nvmlDeviceGetHandleByIndex(self, i):
        return "h"

    def nvmlDeviceGetName(self, h):
        return b"Fake GPU"

    def nvmlDeviceGetPowerUsage(self, h):
        return int(self.watts * 1000)

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        if not self.counter:
            raise self.NVMLError("Not Supported")
        return int((time.perf_counter() - self.t0) * self.watts * 1000)  # mJ at constant power


def test_nvml_absent_is_a_clear_message():
    fake = FakeNVML(init_error=FakeNVML.NVMLError_LibraryNotFound("libnvidia-ml.so not found"))
    with pytest.raises(energy.EnergyUnavailable, match="NVML not available: .*no NVIDIA driver"):
        energy.nvml_meter(0, nvml=fake)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_real_nvml_without_driver():
    pytest.importorskip("pynvml")
    with pytest.raises(energy.EnergyUnavailable, match="NVML"):
        energy.open_meter(0, root="/nonexistent-root")


def test_nvml_counter_preferred_and_measure_calls():
    meter = energy.nvml_meter(0, nvml=FakeNVML(watts=200.0))
    assert isinstance(meter, energy.CounterMeter) and "energy counter" in meter.source
    assert meter.power_now() == pytest.approx(200.0)
    calls, r = energy.measure_calls(lambda i: time.sleep(0.002), meter, min_seconds=0.1, min_calls=5)
    assert calls >= 5 and r.seconds >= 0.1
    assert r.watts == pytest.approx(200.0, rel=0.1)
    d = energy.per_inference(calls, r, images_per_call=4)
    assert d["joules_per_inference"] == pytest.approx(r.joules / calls)
    assert d["images_per_s_per_w"] == pytest.approx(4 * calls / r.joules)


def test_nvml_power_sampling_fallback():
    meter = energy.nvml_meter(0, nvml=FakeNVML(counter=False, watts=100.0), interval_s=0.005)
    assert isinstance(meter, energy.SampledMeter) and "power samples" in meter.source
    with meter:
        time.sleep(0.1)
    assert meter.reading.samples >= 3
    assert meter.reading.watts == pytest.approx(100.0, rel=1e-6)


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def test_jetson_rails_jetpack5(tmp_path):
    root = str(tmp_path)
    _write(f"{root}/etc/nv_tegra_release", "# R35")
    d = f"{root}/sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"
    for n, label, mv, ma in ((1, "VDD_IN", 5000, 1200), (2, "VDD_CPU_GPU_CV", 5000, 400), (3, "VDD_SOC", 5000, 300)):
        _write(f"{d}/in{n}_label", label)
        _write(f"{d}/in{n}_input", str(mv))
        _write(f"{d}/curr{n}_input", str(ma))
    assert energy.is_jetson(root)
    rails = energy.find_rails(root)
    assert set(rails) == {"VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"}
    assert rails["VDD_IN"]() == pytest.approx(6.0)  # 5 V x 1.2 A
    meter = energy.open_meter(0, root=root)
    assert "VDD_IN" in meter.source and meter.power_now() == pytest.approx(6.0)


def test_jetson_rails_jetpack4_summed(tmp_path):
    root = str(tmp_path)
    d = f"{root}/sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0"
    _write(f"{d}/rail_name_0", "GPU")
    _write(f"{d}/in_power0_input", "1500")
    _write(f"{d}/rail_name_1", "CPU")
    _write(f"{d}/in_power1_input", "500")
    meter = energy.jetson_meter(root)
    assert "summed" in meter.source and meter.power_now() == pytest.approx(2.0)


def test_jetson_without_rails(tmp_path):
    with pytest.raises(energy.EnergyUnavailable, match="rails not readable"):
        energy.jetson_meter(str(tmp_path))


# ----------------------------------------------------------------------------------------- green contexts

def test_check_sms():
    assert green.check_sms(8, 132, 9) == 8
    assert green.check_sms(16, 132, 9) == 16
    with pytest.raises(ValueError, match="multiples of 8.*use 8 or 16"):
        green.check_sms(12, 132, 9)
    with pytest.raises(ValueError, match="Hopper"):
        green.check_sms(4, 132, 9)
    with pytest.raises(ValueError, match="at least 1 SM"):
        green.check_sms(0, 132, 9)
    with pytest.raises(ValueError, match="only 132 SMs"):
        green.check_sms(136, 132, 9)
    assert green.check_sms(6, 16, 8) == 6  # Ampere / Orin: multiples of 2, at least 4
    with pytest.raises(ValueError, match="multiples of 2"):
        green.check_sms(5, 16, 8)


def test_parse_sms_and_child_argv():
    assert green.parse_sms("8, 16,full,8") == [8, 16, None]
    with pytest.raises(ValueError):
        green.parse_sms("eight")
    with pytest.raises(ValueError):
        green.parse_sms("-8")
    argv = ["--model", "clip-tiny", "--sms", "8,16", "--json=out.json", "--energy"]
    assert green.child_argv(argv, 8, "/t/8.json") == ["--model", "clip-tiny", "--energy", "--json", "/t/8.json",
                                                      "--_in-green-context", "8"]
    assert green.child_argv(argv, None, "/t/f.json")[-2:] == ["--json", "/t/f.json"]


FAKE_CLI = textwrap.dedent("""
    import json, sys
    argv = sys.argv[1:]
    assert argv[0] == "bench"
    path = argv[argv.index("--json") + 1]
    n = int(argv[argv.index("--_in-green-context") + 1]) if "--_in-green-context" in argv else None
    if n == 24:
        sys.exit(3)  # a child that dies without results
    doc = {"schema": "dualfuse.bench/1", "card": "Fake", "resolved": {"model": "m", "image_batch": 1,
           "text_batch": 1, "dtype": "fp16"}, "green_context": {"sms": n},
           "results": [{"executor": "eager", "status": "ok", "median_ms": 10.0 / (n or 132)}]}
    json.dump(doc, open(path, "w"))
    print("child", n, "args", argv)
""")


def test_run_sweep_orchestration(tmp_path):
    (tmp_path / "fakecli.py").write_text(FAKE_CLI)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    out = tmp_path / "sweep.json"
    lines = []
    rc, merged = green.run_sweep(["--model", "m", "--sms", "8,16,24", "--json", "x.json"], [8, 16, 24, None],
                                 str(out), env=env, module="fakecli", echo=lines.append)
    assert rc == 3  # the worst child's exit code
    assert merged["schema"] == "dualfuse.bench-sweep/1" and "memory bandwidth" in merged["not_emulated"]
    assert [r["sms"] for r in merged["runs"]] == [8, 16, 24, None]
    assert merged["runs"][0]["results"][0]["median_ms"] == pytest.approx(10 / 8)
    assert merged["runs"][2]["status"] == "error" and merged["runs"][2]["results"] == []
    assert json.loads(out.read_text())["runs"][1]["sms"] == 16
    assert any("Jetson Orin Nano" in s for s in lines) and any("full GPU" in s for s in lines)
    table = green.summary_lines(merged)
    assert "8 SMs" in table[0] and "full" in table[0] and "eager" in table[1]


def test_enter_fake_mode(monkeypatch):
    monkeypatch.setenv(green.FAKE_ENV, "1")
    info = green.enter(8)
    assert info["fake"] and info["sms"] == 8 and "Orin Nano" in info["equivalent"]
    green.validate([8, 12, None])  # fake mode: no card to check against


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_validate_without_gpu(monkeypatch):
    monkeypatch.delenv(green.FAKE_ENV, raising=False)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        green.validate([8])


# ----------------------------------------------------------------------------------------- GPU only

@pytest.mark.gpu
def test_real_nvml_energy():
    meter = energy.open_meter(torch.cuda.current_device())
    x = torch.randn(4096, 4096, device="cuda")
    calls, r = energy.measure_calls(lambda i: x @ x, meter, min_seconds=1.0, sync=torch.cuda.synchronize)
    assert r.joules > 0 and 10 < r.watts < 2000


@pytest.mark.gpu
def test_real_green_context_sweep(tmp_path):
    out = tmp_path / "sms.json"
    total, major = green.device_sms(0)
    n = green.sm_granularity(major)[0] * 2
    proc = subprocess.run([sys.executable, "-m", "dualfuse.cli", "bench", "--model", "clip-tiny", "--executors",
                           "eager", "--iters", "5", "--warmup", "2", "--no-progress", "--sms", f"{n},full",
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    assert [r["sms"] for r in doc["runs"]] == [n, None]
    assert doc["runs"][0]["green_context"]["sms"] == n
    assert all(r["results"][0]["status"] == "ok" for r in doc["runs"])


# ----------------------------------------------------------------------------------------- bench integration (CPU)

def test_bench_energy_rows_with_fake_meter(tmp_path, monkeypatch, capsys):
    from dualfuse import cli

    monkeypatch.setattr(energy, "bench_meter", lambda device: (energy.nvml_meter(0, nvml=FakeNVML(watts=50.0)),
                                                               "energy: fake meter"))
    out = tmp_path / "e.json"
    rc = cli.main(["bench", "--model", "clip-tiny", "--device", "cpu", "--executors", "eager", "--iters", "2",
                   "--warmup", "0", "--batch", "2", "--energy", "--energy-seconds", "0.2", "--no-progress",
                   "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "energy: fake meter" in text and "J/inf" in text and "img/s/W" in text
    row = json.loads(out.read_text())["results"][0]
    assert row["joules_per_inference"] > 0 and row["images_per_s_per_w"] > 0
    assert row["energy"]["energy_calls"] >= 10 and row["energy"]["avg_power_w"] == pytest.approx(50, rel=0.2)


def test_bench_energy_not_available_on_cpu(capsys):
    from dualfuse import cli

    rc = cli.main(["bench", "--model", "clip-tiny", "--device", "cpu", "--executors", "eager", "--iters", "1",
                   "--warmup", "0", "--energy", "--no-progress"])
    assert rc == 0
    assert "energy: not available" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_sms_end_to_end_fake_green_context(tmp_path):
    """The real `dualfuse bench --sms` fan-out: a child process per SM count (green context faked: no GPU here;
    one count keeps the test short — test_run_sweep_orchestration covers several, 'full' and a dying child)."""
    out = tmp_path / "sms.json"
    env = dict(os.environ, **{green.FAKE_ENV: "1"})
    proc = subprocess.run([sys.executable, "-m", "dualfuse.cli", "bench", "--model", "clip-tiny", "--device", "cpu",
                           "--executors", "eager", "--iters", "1", "--warmup", "0", "--no-progress",
                           "--sms", "8", "--json", str(out)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "green context: 8 SMs" in proc.stdout and "memory bandwidth" in proc.stdout
    doc = json.loads(out.read_text())
    assert doc["schema"] == "dualfuse.bench-sweep/1" and [r["sms"] for r in doc["runs"]] == [8]
    run = doc["runs"][0]
    assert run["green_context"]["fake"] and run["sms"] == 8 and run["results"][0]["status"] == "ok"
    assert "8 SMs" in proc.stdout.split("median ms per SM count")[1]


def test_bench_sms_rejects_bad_counts(capsys):
    from dualfuse import cli

    rc = cli.main(["bench", "--model", "clip-tiny", "--sms", "eight"])
    assert rc == 2 and "--sms" in capsys.readouterr().err


def test_sm_limit_feeds_the_kernels_grid_heuristics():
    """A green context's SM count (set by green.enter) is what the kernels plan for; reset afterwards."""
    from dualfuse.kernels import _utils
    from dualfuse.kernels.gemm import choose_splits

    full = _utils.num_sms("cpu")
    dims = [(1, 64, 4096)]  # one output tile: split-K fills the SMs the kernels may use
    cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, programs_per_sm=2, min_k_iters=1)
    try:
        _utils.set_sm_limit(2)
        assert _utils.num_sms("cpu") == 2
        small = choose_splits(dims, cfg, torch.device("cpu"), None)
        _utils.set_sm_limit(None)
        assert _utils.num_sms("cpu") == full
        assert choose_splits(dims, cfg, torch.device("cpu"), None)[0] > small[0]
        _utils.set_sm_limit(10_000)  # never more than the device has
        assert _utils.num_sms("cpu") == full
        with pytest.raises(ValueError, match="positive int"):
            _utils.set_sm_limit(0)
    finally:
        _utils.set_sm_limit(None)

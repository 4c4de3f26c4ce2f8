"""Energy of a timed loop: joules per inference and images/s per watt.

Sources, chosen by :func:`open_meter`:

- NVIDIA data-center/desktop GPUs, through NVML (``nvidia-ml-py``): the board's total energy counter
  (``nvmlDeviceGetTotalEnergyConsumption``, mJ, Volta and newer) read before and after the loop — preferred, no
  sampling thread; else ``nvmlDeviceGetPowerUsage`` (mW) sampled by a background thread and integrated
  (trapezoids). Note that on recent drivers the power reading is itself averaged over ~1 s, so short loops are
  smeared; the counter has no such problem.
- Jetson boards (no NVML): the INA3221 power monitors in sysfs, sampled by a thread:
  ``/sys/bus/i2c/drivers/ina3221x/*/iio:device*/in_power*_input`` (mW, JetPack 4) or
  ``/sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*/in*_input`` (mV) x ``curr*_input`` (mA) (JetPack 5/6), or
  ``/sys/class/hwmon/hwmon*/power*_input`` (µW). The module input rail (``VDD_IN`` / ``POM_5V_IN``) is used when
  present (the whole board), else the sum of all rails.

Everything is whole-board energy, idle power included: :class:`Reading` carries the idle power measured just before
the loop so that "above idle" can be shown too. Nothing here ever raises for a missing meter except
:class:`EnergyUnavailable`, whose message says why ("NVML not available: ...").
"""
from __future__ import annotations

import glob
import os
import threading
import time
from dataclasses import asdict, dataclass


class EnergyUnavailable(RuntimeError):
    """No energy/power source is readable here; the message says why."""


@dataclass
class Reading:
    joules: float
    seconds: float
    source: str
    samples: int = 0  # power samples integrated (0 for an energy counter)
    idle_watts: float | None = None

    @property
    def watts(self) -> float:
        return self.joules / self.seconds if self.seconds > 0 else float("nan")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["watts"] = self.watts
        return d


class Meter:
    """start() ... stop() -> Reading. Subclasses read a counter or sample power in a thread."""

    source = "?"

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> Reading:
        raise NotImplementedError

    def power_now(self) -> float | None:
        """Instantaneous (or short-average) power in W, if the source has one."""
        return None

    def close(self) -> None:
        pass

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.reading = self.stop()
        return False


class SampledMeter(Meter):
    """Integrates ``read_watts()`` sampled every ``interval_s`` by a daemon thread (trapezoidal rule)."""

    def __init__(self, read_watts, source: str, interval_s: float = 0.02):
        self.read_watts, self.source, self.interval = read_watts, source, interval_s
        self._thread = None

    def power_now(self):
        return self.read_watts()

    def start(self):
        self._stop = threading.Event()
        self._samples: list[tuple[float, float]] = [(time.perf_counter(), self.read_watts())]

        def loop():
            while not self._stop.wait(self.interval):
                self._samples.append((time.perf_counter(), self.read_watts()))

        self._thread = threading.Thread(target=loop, name="dualfuse-energy", daemon=True)
        self._thread.start()

    def stop(self) -> Reading:
        self._stop.set()
        self._thread.join()
        self._samples.append((time.perf_counter(), self.read_watts()))
        s = self._samples
        joules = sum((t1 - t0) * (w0 + w1) / 2 for (t0, w0), (t1, w1) in zip(s, s[1:]))
        return Reading(joules, s[-1][0] - s[0][0], self.source, len(s))


class CounterMeter(Meter):
    """Difference of a cumulative energy counter (joules) between start and stop."""

    def __init__(self, read_joules, source: str, read_watts=None):
        self.read_joules, self.source, self._watts = read_joules, source, read_watts

    def power_now(self):
        return self._watts() if self._watts else None

    def start(self):
        self._t0, self._e0 = time.perf_counter(), self.read_joules()

    def stop(self) -> Reading:
        e1, t1 = self.read_joules(), time.perf_counter()
        return Reading(e1 - self._e0, t1 - self._t0, self.source)


# --------------------------------------------------------------------------------------------- NVML

def _nvml_error_text(nvml, e: Exception) -> str:
    lib_missing = getattr(nvml, "NVMLError_LibraryNotFound", None)
    if lib_missing is not None and isinstance(e, lib_missing):
        return "the NVIDIA driver library (libnvidia-ml) is not found: no NVIDIA driver on this machine"
    driver = getattr(nvml, "NVMLError_DriverNotLoaded", None)
    if driver is not None and isinstance(e, driver):
        return "the NVIDIA driver is not loaded"
    return f"{type(e).__name__}: {e}"


def nvml_handle(nvml, device_index: int = 0):
    """NVML handle of torch's CUDA device ``device_index``, matched by PCI bus id (CUDA_VISIBLE_DEVICES may
    renumber devices), else by index."""
    try:
        import torch

        props = torch.cuda.get_device_properties(device_index)
        bus = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
        return nvml.nvmlDeviceGetHandleByPciBusId_v2(bus)
    except Exception:  # noqa: BLE001
        return nvml.nvmlDeviceGetHandleByIndex(device_index)


def nvml_meter(device_index: int = 0, *, nvml=None, interval_s: float = 0.02, prefer_counter: bool = True) -> Meter:
    """Meter for GPU ``device_index`` via NVML; raises EnergyUnavailable saying why when NVML can't be used."""
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError as e:
            raise EnergyUnavailable("NVML not available: the nvidia-ml-py package is not installed "
                                    "(pip install nvidia-ml-py)") from e
    try:
        nvml.nvmlInit()
    except Exception as e:  # noqa: BLE001
        raise EnergyUnavailable(f"NVML not available: {_nvml_error_text(nvml, e)}") from e
    try:
        handle = nvml_handle(nvml, device_index)
        name = nvml.nvmlDeviceGetName(handle)
        name = name.decode() if isinstance(name, bytes) else name
    except Exception as e:  # noqa: BLE001
        raise EnergyUnavailable(f"NVML cannot open GPU {device_index}: {_nvml_error_text(nvml, e)}") from e

    def watts():
        return nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0

    try:
        watts()
        has_power = True
    except Exception:  # noqa: BLE001
        has_power = False
    if prefer_counter:
        try:
            nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
            return CounterMeter(lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000.0,
                                f"NVML total energy counter ({name})", watts if has_power else None)
        except Exception:  # noqa: BLE001 - older GPUs: fall back to sampling power
            pass
    if not has_power:
        raise EnergyUnavailable(f"NVML reports neither energy nor power for {name} (not supported on this GPU)")
    return SampledMeter(watts, f"NVML power samples every {interval_s * 1e3:.0f} ms ({name})", interval_s)


# --------------------------------------------------------------------------------------------- Jetson

TOTAL_RAILS = ("VDD_IN", "POM_5V_IN", "VIN_SYS_5V0", "VDD_IN_TOTAL")


def is_jetson(root: str = "/") -> bool:
    if os.path.exists(os.path.join(root, "etc/nv_tegra_release")):
        return True
    try:
        with open(os.path.join(root, "proc/device-tree/compatible"), "rb") as f:
            return b"nvidia,tegra" in f.read()
    except OSError:
        return False


def _read_number(path: str) -> float | None:
    try:
        with open(path) as f:
            return float(f.read().strip())
    except (OSError, ValueError):
        return None


def _read_label(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def find_rails(root: str = "/") -> dict[str, callable]:
    """Jetson power rails under ``root`` (for tests: a fake sysfs tree): label -> function returning watts."""
    sys_ = os.path.join(root, "sys")
    rails: dict[str, callable] = {}
    # JetPack 4: iio in_power{N}_input in mW, rail_name_{N}
    for p in sorted(glob.glob(os.path.join(sys_, "bus/i2c/drivers/ina3221x/*/iio:device*/in_power*_input"))):
        n = os.path.basename(p)[len("in_power"):-len("_input")]
        label = _read_label(os.path.join(os.path.dirname(p), f"rail_name_{n}")) or f"{os.path.dirname(p)}:{n}"
        rails[label] = (lambda p=p: (_read_number(p) or 0.0) / 1e3)
    # JetPack 5/6: hwmon in{N}_input (mV) x curr{N}_input (mA), in{N}_label
    for p in sorted(glob.glob(os.path.join(sys_, "bus/i2c/drivers/ina3221/*/hwmon/hwmon*/in*_input"))):
        d, n = os.path.dirname(p), os.path.basename(p)[len("in"):-len("_input")]
        cur = os.path.join(d, f"curr{n}_input")
        if not os.path.exists(cur):
            continue
        label = _read_label(os.path.join(d, f"in{n}_label")) or f"{d}:{n}"
        if label.lower().startswith("sum of"):
            continue
        rails[label] = (lambda p=p, cur=cur: (_read_number(p) or 0.0) * (_read_number(cur) or 0.0) / 1e6)
    # Generic hwmon power{N}_input in µW
    if not rails:
        for p in sorted(glob.glob(os.path.join(sys_, "class/hwmon/hwmon*/power*_input"))):
            d, n = os.path.dirname(p), os.path.basename(p)[len("power"):-len("_input")]
            label = _read_label(os.path.join(d, f"power{n}_label")) or f"{os.path.basename(d)}:power{n}"
            rails[label] = (lambda p=p: (_read_number(p) or 0.0) / 1e6)
    return rails


def jetson_meter(root: str = "/", interval_s: float = 0.02) -> Meter:
    rails = find_rails(root)
    if not rails:
        raise EnergyUnavailable("Jetson power rails not readable (no INA3221 entries under /sys/bus/i2c/drivers "
                                "or power*_input under /sys/class/hwmon; try running as root)")
    total = next((k for k in rails if k.upper() in TOTAL_RAILS), None)
    if total:
        return SampledMeter(rails[total], f"Jetson rail {total} (module input)", interval_s)
    fns = list(rails.values())
    return SampledMeter(lambda: sum(f() for f in fns), f"Jetson rails summed: {', '.join(rails)}", interval_s)


def open_meter(device_index: int = 0, *, root: str = "/", nvml=None) -> Meter:
    """The best meter here: Jetson rails on a Jetson, else NVML. Raises EnergyUnavailable with the reason."""
    if is_jetson(root):
        return jetson_meter(root)
    return nvml_meter(device_index, nvml=nvml)


def measure_idle(meter: Meter, seconds: float = 0.5) -> float | None:
    """Average power over ``seconds`` of doing nothing (None if the meter can't tell)."""
    try:
        meter.start()
        time.sleep(seconds)
        r = meter.stop()
        return r.watts if r.seconds > 0 and r.joules > 0 else None
    except Exception:  # noqa: BLE001
        return None


def measure_calls(fn, meter: Meter, *, min_seconds: float = 2.0, min_calls: int = 10, sync=None,
                  idle_seconds: float = 0.0) -> tuple[int, Reading]:
    """Call ``fn(i)`` (then ``sync()``) until both ``min_calls`` calls and ``min_seconds`` have passed, under the
    meter. Returns (calls, Reading). Energy counters update every few tens of ms, so loops shorter than a second
    or two are not measured meaningfully — hence the minimum duration."""
    idle = measure_idle(meter, idle_seconds) if idle_seconds > 0 else None
    calls = 0
    meter.start()
    t0 = time.perf_counter()
    try:
        while calls < min_calls or time.perf_counter() - t0 < min_seconds:
            fn(calls)
            if sync is not None:
                sync()
            calls += 1
    finally:
        reading = meter.stop()
    reading.idle_watts = idle
    return calls, reading


def per_inference(calls: int, reading: Reading, images_per_call: int) -> dict:
    """J/inference (one call), images/s per watt (= images per joule), average and idle watts."""
    j = reading.joules / calls if calls else float("nan")
    ips_w = images_per_call * calls / reading.joules if reading.joules > 0 and images_per_call else None
    out = dict(joules_per_inference=j, images_per_s_per_w=ips_w, avg_power_w=reading.watts,
               idle_power_w=reading.idle_watts, energy_calls=calls, energy_seconds=reading.seconds,
               energy_source=reading.source)
    if reading.idle_watts is not None and calls:
        out["joules_per_inference_above_idle"] = max(reading.joules - reading.idle_watts * reading.seconds, 0.0) / calls
    return out


# --------------------------------------------------------------------------------------------- bench glue

def bench_meter(device) -> tuple[Meter | None, str]:
    """(meter or None, a line for the bench output) for ``dualfuse bench --energy`` on ``device``."""
    import torch

    device = torch.device(device)
    if device.type != "cuda" and not is_jetson():
        return None, "energy: not available: the device is the CPU (NVML and Jetson rails measure GPUs)"
    try:
        meter = open_meter(device.index or 0)
    except EnergyUnavailable as e:
        return None, f"energy: not available: {e}"
    return meter, f"energy: {meter.source}"


def bench_energy(call, meter: Meter, device, images_per_call: int, *, seconds: float = 2.0) -> dict:
    """Row fields for one executor: repeat ``call(i)`` (synchronized per call, as timed) for ``seconds`` under
    ``meter``, after 0.5 s of idle power. Returns joules_per_inference, images_per_s_per_w and ``energy`` (all
    details)."""
    import torch

    device = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    try:
        calls, reading = measure_calls(call, meter, min_seconds=seconds, min_calls=10, sync=sync, idle_seconds=0.5)
    except EnergyUnavailable as e:  # a meter that stops answering mid-run: no energy figure, the timing stands
        return dict(energy=dict(error=str(e)))
    d = per_inference(calls, reading, images_per_call)
    return dict(joules_per_inference=d["joules_per_inference"], images_per_s_per_w=d["images_per_s_per_w"],
                energy=d)

"""ONNX export + ONNX Runtime (CPU provider) executor on tiny models; "not installed" rows for missing runtimes."""
import json
import os
import sys

import pytest
import torch

from dualfuse import executors, presets, reference, to_spec
from dualfuse.bench import random_inputs
from dualfuse.executors import ExecutorUnavailable

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


@pytest.mark.parametrize("name", ["clip-tiny", "open_clip-tiny"])
def test_ort_cpu_matches_reference(name):
    if name.startswith("open_clip"):
        pytest.importorskip("open_clip")
    model = presets.load(name)
    spec = to_spec(model)
    ex = executors.get("onnxruntime", model, device="cpu", spec=spec)
    assert ex.stock and "CPU" in ex.notes and ex.active_provider == "CPUExecutionProvider"
    px, ids = random_inputs(spec, 3, 2, sets=1)[0]
    img, txt = ex.encode(px, ids)
    rimg, rtxt = reference.encode(spec, px, ids)
    assert img.shape == rimg.shape and txt.shape == rtxt.shape
    assert ((img - rimg).norm(dim=-1) / rimg.norm(dim=-1)).max() < 1e-5
    assert ((txt - rtxt).norm(dim=-1) / rtxt.norm(dim=-1)).max() < 1e-5
    # a different batch reuses the same (dynamic-batch) session
    assert ex.encode_image(px[:1]).shape == (1, spec.embed_dim)
    if name == "clip-tiny":  # a shorter text length gets its own export
        _, ids7 = random_inputs(spec, 0, 2, 7, sets=1)[0]
        out = ex.encode_text(ids7)
        assert torch.allclose(out, reference.encode_text(spec, ids7), atol=1e-5, rtol=1e-4)
        assert sorted(ex.text_sessions) == [7, spec.text.context_length]


def test_bf16_is_unavailable_not_an_error():
    with pytest.raises(ExecutorUnavailable, match="bf16"):
        executors.get("onnxruntime", "clip-tiny", device="cpu", dtype="bf16")


def test_missing_runtimes_say_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(ExecutorUnavailable, match="not installed: pip install onnxruntime"):
        executors.get("onnxruntime", "clip-tiny", device="cpu")
    with pytest.raises(ExecutorUnavailable, match="not installed: pip install tensorrt"):
        executors.get("tensorrt", "clip-tiny", device="cpu")


def test_provider_choice():
    from dualfuse.executors.onnxruntime import choose_providers

    cpu = torch.device("cpu")
    cuda = torch.device("cuda", 0)
    assert choose_providers(["CUDAExecutionProvider", "CPUExecutionProvider"], cpu, torch.float32, "/tmp") == \
        ["CPUExecutionProvider"]
    got = choose_providers(["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], cuda,
                           torch.float16, "/tmp/cache", stream=1234, tensorrt=True)
    assert [p if isinstance(p, str) else p[0] for p in got] == \
        ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert got[0][1]["trt_fp16_enable"] and got[0][1]["user_compute_stream"] == "1234"
    got = choose_providers(["CUDAExecutionProvider", "CPUExecutionProvider"], cuda, torch.float16, "/tmp")
    assert got[0][0] == "CUDAExecutionProvider" and "enable_cuda_graph" not in got[0][1]
    # the TensorRT EP is listed by every onnxruntime-gpu wheel: skipped where its libraries do not load
    got = choose_providers(["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], cuda,
                           torch.float16, "/tmp", stream=5, tensorrt=False, cuda_graph=True)
    assert got[0] == ("CUDAExecutionProvider", {"device_id": 0, "enable_cuda_graph": "1"})  # no user stream
    with pytest.raises(ExecutorUnavailable, match="CUDA execution provider missing.*onnxruntime-gpu"):
        choose_providers(["CPUExecutionProvider"], cuda, torch.float16, "/tmp")


def test_bench_rows(tmp_path, monkeypatch):
    """`dualfuse bench` times the onnxruntime row on CPU; a missing tensorrt gives a 'not installed' row."""
    from dualfuse import cli

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    out = tmp_path / "b.json"
    rc = cli.main(["bench", "--model", "clip-tiny", "--device", "cpu", "--executors", "eager,onnxruntime,tensorrt",
                   "--iters", "2", "--warmup", "1", "--no-progress", "--json", str(out)])
    assert rc == 0
    rows = {r["executor"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["onnxruntime"]["status"] == "ok" and rows["onnxruntime"]["cosine_ok"]
    assert rows["onnxruntime"]["median_ms"] > 0
    assert rows["tensorrt"]["status"] == "unavailable"
    assert "not installed" in rows["tensorrt"]["message"]


@pytest.mark.gpu
def test_ort_cuda_fp16_matches_reference():
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu not installed")
    model = presets.load("clip-tiny")
    spec = to_spec(model)
    ex = executors.get("onnxruntime", model, device="cuda", dtype="fp16", spec=spec)
    px, ids = random_inputs(spec, 4, 4, sets=1, device="cuda", dtype=torch.float16)[0]
    img, txt = ex.encode(px, ids)
    rimg, rtxt = reference.encode(spec.to("cuda"), px.float(), ids)
    assert torch.nn.functional.cosine_similarity(img.float(), rimg, dim=-1).min() > 0.999
    assert torch.nn.functional.cosine_similarity(txt.float(), rtxt, dim=-1).min() > 0.999


def test_preload_finds_the_nvidia_wheels_libraries():
    """The CUDA EP's libraries come from the nvidia-* wheels' lib folders; loading is best effort (no error on a
    machine without them) and happens once."""
    from dualfuse.executors import onnxruntime as E

    dirs = E.nvidia_library_dirs()
    assert all(d.endswith("lib") for d in dirs)
    first = E.preload_cuda_libraries(__import__("onnxruntime"))
    assert E.preload_cuda_libraries(None) is first  # once per process
    assert all(os.path.basename(p) in E.CUDA_LIBRARIES for p in first)


@pytest.mark.gpu
def test_ort_cuda_ep_fp16_matches_reference():
    """On a CUDA machine with onnxruntime-gpu: the CUDA EP in fp16 (CUDA graph where it works) passes parity."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed")
    from dualfuse.bench import cosine_check

    model = presets.load("clip-tiny")
    spec = to_spec(model)
    ex = executors.get("onnxruntime", model, device="cuda", dtype="fp16", spec=spec)
    assert ex.active_provider == "CUDAExecutionProvider" and "fp16" in ex.notes
    px, ids = random_inputs(spec, 2, 2, sets=1, device="cuda", dtype=torch.float16)[0]
    for _ in range(3):  # ONNX Runtime captures its graph after a first run
        outs = ex.encode(px, ids)
    ref = reference.encode(spec.to(device="cuda", dtype=torch.float32), px.float(), ids)
    assert cosine_check(outs, ref)["cosine_ok"], ex.notes

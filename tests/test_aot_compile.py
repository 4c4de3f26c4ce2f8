"""Every kernel the fused executor launches compiles for sm_80, sm_87 (Jetson Orin) and sm_90 with the installed
Triton, on a machine without a GPU (benchmarks/aot_compile.py: a stub driver, Triton's own compiler and ptxas)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS = {"_embed_kernel", "_layer_norm_kernel", "grouped_linear_kernel", "_attention_kernel"}


@pytest.mark.slow  # compiles every specialization in a subprocess
@pytest.mark.parametrize("model,extra,weights", [("clip-tiny", {"_pool_kernel"}, None), ("siglip-tiny", set(), None),
                                                 ("clip-tiny", {"_pool_kernel"}, "int8")])
def test_fused_kernels_compile_ahead_of_time_for_sm80_sm87_sm90(model, extra, weights, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "aot_compile.py"), "--model", model,
                           "--json", str(out)] + (["--weights", weights] if weights else []),
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["failures"] == []
    compiled = {key.rsplit(" ", 1)[0] for key in result["compiled"]}
    assert compiled >= KERNELS | extra
    for kernel in KERNELS | extra:
        for arch in ("sm_80", "sm_87", "sm_90"):
            assert result["compiled"][f"{kernel} {arch}"] > 0
            # sm_87 (and sm_80) allow at most 163 KiB of shared memory per block
            assert result["max_shared_bytes"][f"{kernel} {arch}"] <= 166912


# ------------------------------------------------------------------------------------------ target configs
SM87_SHARED = 166912  # CUDA programming guide: compute capability 8.7, 163 KB of shared memory per block (opt-in)


@pytest.mark.slow
def test_target_configs_compile_for_orin_within_sm87_limits(tmp_path):
    """The configs the fused executor picks on an Orin Nano (8 SMs) and an AGX Orin (16 SMs), computed without a GPU
    (kernels._utils.target_device), compile for sm_87 and fit its limits: shared memory per block, registers per
    thread, threads per block. The tiny models at batch 1 and 32 (a few minutes on CPU); the presets at batch 1, 8
    and 32, also for sm_80, are `benchmarks/aot_compile.py --target orin-nano --target agx-orin --also-arch 80
    --model clip-vit-b-32 --model siglip-base-patch16-224` (benchmarks/results/cpu-2026-12-05/aot/)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot-orin.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "aot_compile.py"), "--target", "orin-nano",
                           "--target", "agx-orin", "--model", "clip-tiny", "--model",
                           "siglip-tiny", "--batch", "1,32", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(out.read_text())
    assert r["mode"] == "target-configs" and r["failures"] == []
    assert {(x["target"], x["model"]) for x in r["runs"]} == {(t, m) for t in ("orin-nano", "agx-orin")
                                                              for m in ("clip-tiny", "siglip-tiny")}
    for run in r["runs"]:  # sm_87: no PDL, no TMA, LayerNorms folded into the GEMMs (the executor's auto default)
        assert run["arch"] == "sm_87" and run["fold_ln"] is True and run["pdl"] is False and run["tma"] is False
    kernels = {(k["kernel"], k["target"], k["arch"]) for k in r["kernels"]}
    for t in ("orin-nano", "agx-orin"):
        for kernel in KERNELS | {"_pool_kernel"}:
            assert (kernel, t, "sm_87") in kernels
    for k in r["kernels"]:
        assert k["shared"] <= SM87_SHARED and k["threads"] <= 1024
        assert k["regs"] is not None and 0 < k["regs"] <= 255
    # GPU configs, not the interpreter's 32x32x32 tiles
    gemm = [k["config"] for k in r["kernels"] if k["kernel"] == "grouped_linear_kernel"]
    assert any(c["BLOCK_K"] >= 64 for c in gemm) and all(c["USE_TMA"] is False and c["USE_PDL"] is False for c in gemm)


@pytest.mark.slow
def test_target_configs_compile_with_int8_weights(tmp_path):
    """--weights int8 under a target: the model fused with weight-only int8 on an Orin Nano, its quantized GEMM
    configs (1-byte weight tiles, no TMA) compiled for sm_87 within its limits."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot-orin-int8.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "aot_compile.py"), "--target", "orin-nano",
                           "--model", "clip-tiny", "--batch", "1", "--weights", "int8", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(out.read_text())
    assert r["mode"] == "target-configs" and r["weights"] == "int8" and r["failures"] == []
    assert [run["weights"] for run in r["runs"]] == ["int8"]
    gemm = [k for k in r["kernels"] if k["kernel"] == "grouped_linear_kernel"]
    assert gemm and all(k["arch"] == "sm_87" and k["shared"] <= SM87_SHARED for k in gemm)
    assert all(k["config"]["USE_TMA"] is False for k in gemm) and any(k["config"]["ANY_WQ"] for k in gemm)


def test_heuristics_follow_the_target_without_a_gpu():
    """Under target_device the launchers' choices are those of the target (SMs, capability, shared memory)."""
    from types import SimpleNamespace

    import torch

    from dualfuse.kernels import _utils
    from dualfuse.kernels.attention import _default_blocks
    from dualfuse.kernels.gemm.heuristics import default_config
    from dualfuse.targets import TARGETS

    cpu = torch.device("cpu")
    x = torch.empty(50, 768, dtype=torch.float16)
    problems = [SimpleNamespace(x=x, weight=torch.empty(2304, 768, dtype=torch.float16), norm=None)]
    assert default_config(problems, cpu)["BLOCK_M"] == 32 and _utils.device_props(cpu) is None  # interpreter
    seen = {}
    for name in ("orin-nano", "agx-orin", "h100"):
        t = TARGETS[name]
        with _utils.target_device(t.props()):
            assert _utils.num_sms(cpu) == t.num_sms and _utils.device_smem_bytes(cpu) == t.smem_per_block
            assert _utils.pdl_supported(cpu) == (_utils.HAS_PDL and t.capability[0] >= 9)
            cfg = default_config(problems, cpu)
            assert "tma" in cfg and cfg["BLOCK_K"] >= 64  # the skinny cost model ran
            assert _default_blocks(cpu, torch.float16, ()) == (64, 64, 4, 3)
            seen[name] = cfg
        assert _utils.target_props() is None  # restored
    # batch 32 of ViT-B/32's FC1 (1600 x 3072 x 768): 64 x 128 tiles on 8 SMs' shared memory; 128 x 256 on an H100
    big = [SimpleNamespace(x=torch.empty(1600, 768, dtype=torch.float16),
                           weight=torch.empty(3072, 768, dtype=torch.float16), norm=None)]
    with _utils.target_device(TARGETS["orin-nano"].props()):
        nano = default_config(big, cpu)
    assert (nano["BLOCK_M"], nano["BLOCK_N"]) in ((128, 256), (64, 128))
    from dualfuse.kernels.gemm.heuristics import _smem_bytes
    assert _smem_bytes(nano, 2) <= TARGETS["orin-nano"].smem_per_block

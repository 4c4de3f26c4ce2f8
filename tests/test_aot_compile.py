"""Every kernel the fused executor launches compiles for sm_80, sm_87 (Jetson Orin) and sm_90 with the installed
Triton, on a machine without a GPU (benchmarks/aot_compile.py: a stub driver, Triton's own compiler and ptxas)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS = {"_embed_kernel", "_layer_norm_kernel", "_grouped_linear_kernel", "_attention_kernel"}


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

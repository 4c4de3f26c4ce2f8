"""Compile every Triton kernel a fused forward launches for sm_80, sm_87 (Jetson Orin) and sm_90, on a machine
without a GPU, with the installed Triton (its bundled ptxas). Nothing runs: a stub driver reports a CUDA target,
and Triton's jit_cache_hook compiles each launch's specialization for every target and skips the launch.

    python benchmarks/aot_compile.py --model clip-tiny --model siglip-tiny [--json out.json]
    python benchmarks/aot_compile.py --model clip-tiny --weights int8      # the int8-weight GEMM path too

What it covers: the kernels and constexpr specializations the fused executor picks when it runs on CPU tensors
(the interpreter's configs: the launchers are told they run under the interpreter), for an image + text call, an
image-only and a text-only call. The configs picked on a real GPU (its SM count, PDL, TMA) are not all of these;
a GPU run is what checks those. Exit status 1 if any compile fails.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys

sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
os.environ.pop("TRITON_INTERPRET", None)  # real JITFunctions, so triton.compile sees the kernels
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime import driver  # noqa: E402

import dualfuse  # noqa: E402

ARCHS = (80, 87, 90)
OPTION_KEYS = ("num_warps", "num_ctas", "num_stages", "enable_fp_fusion", "launch_cooperative_grid")


class _StubDriver:
    """Just enough of a Triton driver for the JIT to specialize and hand the launch to jit_cache_hook."""

    def __init__(self, target):
        self.target = target

    def is_active(self):
        return True

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def compile_model_kernels(names: list[str], archs=ARCHS, dtype=torch.float16, weights=None) -> dict:
    compiled: collections.Counter = collections.Counter()
    failures: list[dict] = []
    shared: dict[str, int] = {}

    def hook(*, fn, compile, **_):
        src = ASTSource(fn.jit_function, compile["signature"], compile["constants"], compile["configs"][0])
        options = {k: compile[k] for k in OPTION_KEYS}
        for cc in archs:
            try:
                out = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
                compiled[f"{fn.name} sm_{cc}"] += 1
                key = f"{fn.name} sm_{cc}"
                shared[key] = max(shared.get(key, 0), int(out.metadata.shared))
            except Exception as e:  # report every failing specialization, keep going
                failures.append({"kernel": fn.name, "arch": f"sm_{cc}", "error": repr(e)[:500]})
        return True  # skip the launch

    # the launchers refuse CPU tensors unless they believe they run under the interpreter: patch _utils first
    # (modules imported later take the patched function), then every dualfuse module that already holds it
    import dualfuse.kernels._utils as kernel_utils
    kernel_utils.is_interpreter = lambda: True
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("dualfuse") and hasattr(mod, "is_interpreter"):
            mod.is_interpreter = lambda: True
    knobs.runtime.jit_cache_hook = hook
    driver.set_active(_StubDriver(GPUTarget("cuda", 90, 32)))
    for name in names:
        fused = dualfuse.fuse(dualfuse.load(name, seed=0), dtype=dtype, device="cpu",
                              **({"weights": weights} if weights else {}))
        ex = fused.executor
        if getattr(ex, "fallback", None) is not None:
            raise SystemExit(f"{name}: the fused executor fell back ({ex.fallback}); nothing to compile")
        io = ex.io
        if io.naflex:
            raise SystemExit(f"{name}: NaFlex models are not handled by this check")
        px = torch.randn(2, io.channels, io.image_size, io.image_size)
        ids = torch.randint(3, min(io.vocab_size, 50), (3, io.context_length))
        ex.encode(px, ids)
        ex.encode_image(px)
        ex.encode_text(ids)
    return {"triton": triton.__version__, "torch": torch.__version__, "models": names, "dtype": str(dtype),
            "weights": weights or "fp16", "compiled": dict(compiled), "max_shared_bytes": shared, "failures": failures}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", required=True, help="preset name (repeatable)")
    ap.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    ap.add_argument("--weights", choices=["fp16", "int8"], default=None,
                    help="fuse with these weights (int8: the quantized GEMM path)")
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args(argv)
    result = compile_model_kernels(args.model, dtype=getattr(torch, args.dtype), weights=args.weights)
    print(f"triton {result['triton']}, torch {result['torch']}, {args.dtype}")
    for key, n in sorted(result["compiled"].items()):
        print(f"  {key}: {n} specializations, max shared {result['max_shared_bytes'][key]} B")
    for f in result["failures"]:
        print(f"  FAILED {f['kernel']} {f['arch']}: {f['error']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 1 if result["failures"] or not result["compiled"] else 0


if __name__ == "__main__":
    sys.exit(main())

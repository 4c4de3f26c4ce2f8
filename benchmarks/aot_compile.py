"""Compile the Triton kernels a fused forward launches, ahead of time, on a machine without a GPU, with the installed
Triton (its bundled ptxas). Nothing runs: a stub driver reports a CUDA target, and Triton's jit_cache_hook compiles
each launch's specialization and skips the launch.

Two modes:

    # the configs the fused executor picks on a TARGET device (SM count, capability, shared memory: dualfuse.targets),
    # compiled for that target's architecture, each kernel checked against the target's limits
    python benchmarks/aot_compile.py --target orin-nano --target agx-orin --model clip-vit-b-32 --batch 1,8,32
    python benchmarks/aot_compile.py --target orin-nano --model clip-vit-b-32 --weights int8   # int8 weights there

    # the interpreter's configs (what the launchers pick on CPU tensors), for sm_80, sm_87 and sm_90
    python benchmarks/aot_compile.py --model clip-tiny --model siglip-tiny [--json out.json]
    python benchmarks/aot_compile.py --model clip-tiny --weights int8      # the int8-weight GEMM path too

Target mode: the launchers plan under ``kernels._utils.target_device(target.props())``, so the GEMM tile / split-K
cost model, the attention and embedding blocks, PDL and TMA (off below sm_90), and the fused executor's automatic
fold_ln (on where there is no PDL) are exactly what they pick on that device at each call shape. Calls per model and
batch B: B images + B texts, B images alone, B texts alone, B uint8 camera frames alone (``dualfuse stream``). Each
distinct specialization is compiled once; its shared memory (Triton's dynamic allocation, metadata.shared, plus the
cubin's static shared), registers per thread (cuobjdump --dump-resource-usage on the cubin), local memory (spills)
and threads per block (num_warps x 32) are recorded and checked against the target: shared <= its opt-in maximum
per block (166912 bytes on sm_87), registers <= 255, threads <= 1024. Exit status 1 if any compile fails or any
limit is exceeded.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

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
OPTION_KEYS = ("num_warps", "num_ctas", "num_stages", "enable_fp_fusion", "launch_cooperative_grid", "launch_pdl",
               "maxnreg")
# constexprs worth recording per specialization (the config the heuristics picked)
CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_D", "BLOCK_T", "BLOCK_ROWS", "NUM_PROBLEMS", "USE_TMA",
               "USE_PDL", "PREFETCH", "ANY_SPLIT", "ANY_PARTIAL", "NORM", "NORM_STATS_IN", "ANY_WQ", "ALL_WQ")
MAX_REGS, MAX_THREADS = 255, 1024


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


def _cuobjdump() -> str | None:
    import triton.backends.nvidia as nv

    path = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    return path if os.path.isfile(path) else None


def resource_usage(cubin: bytes) -> dict:
    """REG / SHARED (static) / LOCAL of the cubin's kernel, from cuobjdump --dump-resource-usage ({} if unavailable)."""
    tool = _cuobjdump()
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    out = {}
    for line in text.splitlines():
        if "REG:" in line:
            for item in line.split():
                k, _, v = item.partition(":")
                if k in ("REG", "SHARED", "LOCAL", "STACK") and v.isdigit():
                    out[k.lower()] = int(v)
    return out


def _patch_interpreter_flag():
    """The launchers refuse CPU tensors unless they believe they run under the interpreter: patch _utils first
    (modules imported later take the patched function), then every dualfuse module that already holds it."""
    import dualfuse.kernels._utils as kernel_utils

    kernel_utils.is_interpreter = lambda: True
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("dualfuse") and hasattr(mod, "is_interpreter"):
            mod.is_interpreter = lambda: True


class _Compiler:
    """jit_cache_hook: compile every distinct specialization once per arch; record resources; skip the launch."""

    def __init__(self, archs, limits=None, label="", cache: dict | None = None):
        self.archs, self.limits, self.label = archs, limits, label
        # (kernel, specialization key, arch) -> (record, error) shared between targets: a specialization two targets
        # pick is compiled once (the binary depends on the arch, not on the SM count)
        self.cache = {} if cache is None else cache
        self.seen: set = set()
        self.records: list[dict] = []
        self.failures: list[dict] = []

    def __call__(self, *, fn, compile, **_):
        ident = (fn.name, repr(compile["key"]))
        if ident in self.seen:
            return True
        self.seen.add(ident)
        spec = json.loads(compile["specialization_data"])
        options = {k: v for k, v in spec["options"].items() if k in OPTION_KEYS and v is not None}
        src = ASTSource(fn.jit_function, compile["signature"], compile["constants"], compile["configs"][0])
        names = fn.jit_function.arg_names
        config = {}
        for key, val in compile["constants"].items():
            name = names[key[0]] if isinstance(key, tuple) and len(key) == 1 else str(key)
            if name in CONFIG_KEYS:
                config[name] = getattr(val, "value", val)
        for cc in self.archs:
            hit = self.cache.get(ident + (cc,))
            if hit is None:
                t0 = time.perf_counter()
                try:
                    out = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
                except Exception as e:  # report every failing specialization, keep going
                    hit = (None, repr(e)[:500])
                else:
                    use = resource_usage(out.asm["cubin"])
                    hit = (dict(kernel=fn.name, arch=f"sm_{cc}", config=config, num_warps=out.metadata.num_warps,
                                num_stages=options.get("num_stages"), launch_pdl=bool(options.get("launch_pdl", False)),
                                threads=out.metadata.num_warps * 32,
                                shared=int(out.metadata.shared) + use.get("shared", 0), regs=use.get("reg"),
                                local=use.get("local"), compile_s=round(time.perf_counter() - t0, 2)), None)
                self.cache[ident + (cc,)] = hit
            if hit[0] is None:
                self.failures.append({"kernel": fn.name, "arch": f"sm_{cc}", "target": self.label, "error": hit[1]})
                continue
            rec = dict(hit[0], target=self.label)
            self.records.append(rec)
            if self.limits is not None:
                over = []
                if rec["shared"] > self.limits["shared"]:
                    over.append(f"shared {rec['shared']} B > {self.limits['shared']}")
                if rec["regs"] is not None and rec["regs"] > MAX_REGS:
                    over.append(f"registers {rec['regs']} > {MAX_REGS}")
                if rec["threads"] > MAX_THREADS:
                    over.append(f"threads {rec['threads']} > {MAX_THREADS}")
                if over:
                    self.failures.append({"kernel": fn.name, "arch": f"sm_{cc}", "target": self.label,
                                          "config": config, "error": "exceeds limits: " + "; ".join(over)})
        return True  # skip the launch


def _calls(ex, batch: int, frames: bool = True):
    io = ex.io
    px = torch.randn(batch, io.channels, io.image_size, io.image_size)
    ids = torch.randint(3, min(io.vocab_size, 50), (batch, io.context_length))
    ex.encode(px, ids)
    ex.encode_image(px)
    ex.encode_text(ids)
    if frames:
        ex.encode_image(torch.randint(0, 256, (batch, io.image_size, io.image_size, io.channels), dtype=torch.uint8))


def _fuse(name, dtype, weights=None):
    """The fused executor of preset ``name`` on CPU tensors; ``weights`` "int8": weight-only int8 (the quantized
    GEMM path: 1-byte weight tiles, per-channel scales, no TMA)."""
    fused = dualfuse.fuse(dualfuse.load(name, seed=0), dtype=dtype, device="cpu",
                          **({"weights": weights} if weights not in (None, "fp16") else {}))
    ex = fused.executor
    if getattr(ex, "fallback", None) is not None:
        raise SystemExit(f"{name}: the fused executor fell back ({ex.fallback}); nothing to compile")
    if ex.io.naflex:
        raise SystemExit(f"{name}: NaFlex models are not handled by this check")
    return ex


def compile_model_kernels(names: list[str], archs=ARCHS, dtype=torch.float16, weights=None) -> dict:
    """Interpreter mode: the configs the launchers pick on CPU tensors, for every arch in ``archs``; ``weights``
    as in :func:`_fuse`."""
    hook = _Compiler(archs)
    _patch_interpreter_flag()
    knobs.runtime.jit_cache_hook = hook
    driver.set_active(_StubDriver(GPUTarget("cuda", 90, 32)))
    for name in names:
        _calls(_fuse(name, dtype, weights), 2, frames=False)
    compiled, shared = {}, {}
    for r in hook.records:
        key = f"{r['kernel']} {r['arch']}"
        compiled[key] = compiled.get(key, 0) + 1
        shared[key] = max(shared.get(key, 0), r["shared"])
    return {"mode": "interpreter-configs", "triton": triton.__version__, "torch": torch.__version__, "models": names,
            "dtype": str(dtype), "weights": weights or "fp16", "compiled": compiled, "max_shared_bytes": shared,
            "failures": hook.failures}


def compile_for_targets(names: list[str], targets: list[str], batches=(1, 8, 32), dtype=torch.float16,
                        also_archs=(), echo=print, weights=None) -> dict:
    """Target mode (see the module docstring). also_archs: compile the same specializations for these archs too
    (e.g. 80: the Orin configs on sm_80, whose shared-memory limit per block is the same 163 KB). weights: as in
    :func:`_fuse` (the model fused with int8 weights under each target: the configs its heuristics pick for 1-byte
    weights)."""
    from dualfuse.kernels._utils import target_device
    from dualfuse.targets import get_target

    _patch_interpreter_flag()
    runs, failures, records = [], [], []
    cache: dict = {}
    t_all = time.perf_counter()
    for tname in targets:
        target = get_target(tname)
        cc = target.capability[0] * 10 + target.capability[1]
        hook = _Compiler([cc] + [a for a in also_archs if a != cc],
                         limits=dict(shared=target.smem_per_block), label=target.name, cache=cache)
        knobs.runtime.jit_cache_hook = hook
        driver.set_active(_StubDriver(GPUTarget("cuda", target.capability[0] * 10 + target.capability[1], 32)))
        for name in names:
            t0 = time.perf_counter()
            n0 = len(hook.records)
            with target_device(target.props()):
                ex = _fuse(name, dtype, weights)
                for b in batches:
                    _calls(ex, b)
            run = dict(target=target.name, arch=target.arch, num_sms=target.num_sms, model=name,
                       weights=weights or "fp16", batches=list(batches), fold_ln=ex.fold_ln,
                       pdl=any(r["launch_pdl"] for r in hook.records[n0:]),
                       tma=any(r["config"].get("USE_TMA") for r in hook.records[n0:]),
                       specializations=len(hook.records) - n0, seconds=round(time.perf_counter() - t0, 1))
            runs.append(run)
            echo(f"  {target.name} ({target.arch}, {target.num_sms} SMs) {name} batches {list(batches)}: "
                 f"{run['specializations']} new specializations, fold_ln {run['fold_ln']}, PDL {run['pdl']}, "
                 f"TMA {run['tma']}, {run['seconds']} s")
        records += hook.records
        failures += hook.failures
    summary = {}
    for r in records:
        s = summary.setdefault(f"{r['kernel']} {r['target']} {r['arch']}", dict(count=0, max_shared=0, max_regs=0, max_local=0,
                                                                   max_threads=0))
        s["count"] += 1
        s["max_shared"] = max(s["max_shared"], r["shared"])
        s["max_regs"] = max(s["max_regs"], r["regs"] or 0)
        s["max_local"] = max(s["max_local"], r["local"] or 0)
        s["max_threads"] = max(s["max_threads"], r["threads"])
    limits = {t: dict(shared_per_block=get_target(t).smem_per_block, registers_per_thread=MAX_REGS,
                      threads_per_block=MAX_THREADS) for t in targets}
    return {"mode": "target-configs", "triton": triton.__version__, "torch": torch.__version__, "models": names,
            "targets": targets, "batches": list(batches), "dtype": str(dtype), "weights": weights or "fp16",
            "limits": limits, "runs": runs,
            "summary": summary, "kernels": records, "failures": failures,
            "resource_tool": "cuobjdump --dump-resource-usage" if _cuobjdump() else None,
            "seconds": round(time.perf_counter() - t_all, 1)}


def _batches(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--batch: expected batch sizes like 1,8,32, got {text!r}") from None
    if not out or any(b < 1 for b in out):
        raise SystemExit(f"--batch: expected positive batch sizes like 1,8,32, got {text!r}")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", required=True, help="preset name (repeatable)")
    ap.add_argument("--target", action="append", default=None,
                    help="compile the configs picked on this device (dualfuse.targets name, repeatable)")
    ap.add_argument("--also-arch", type=int, action="append", default=[], metavar="CC",
                    help="target mode: compile the target's specializations for this arch too (e.g. 80)")
    ap.add_argument("--batch", default="1,8,32", help="target mode: batch sizes (default 1,8,32)")
    ap.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    ap.add_argument("--weights", choices=["fp16", "int8"], default=None,
                    help="fuse with these weights (int8: the quantized GEMM path)")
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    print(f"triton {triton.__version__}, torch {torch.__version__}, {args.dtype}, {args.weights or 'fp16'} weights")
    if args.target:
        result = compile_for_targets(args.model, args.target, _batches(args.batch), dtype, args.also_arch,
                                     weights=args.weights)
        for key, s in sorted(result["summary"].items()):
            print(f"  {key}: {s['count']} specializations, max shared {s['max_shared']} B, max registers "
                  f"{s['max_regs']}, max local {s['max_local']} B, max threads {s['max_threads']}")
        print(f"  limits checked: {json.dumps(result['limits'])}; {result['seconds']} s")
        ok = bool(result["kernels"])
    else:
        result = compile_model_kernels(args.model, dtype=dtype, weights=args.weights)
        for key, n in sorted(result["compiled"].items()):
            print(f"  {key}: {n} specializations, max shared {result['max_shared_bytes'][key]} B")
        ok = bool(result["compiled"])
    for f in result["failures"]:
        print(f"  FAILED {f['kernel']} {f['arch']} {f.get('target', '')}: {f['error']}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 1 if result["failures"] or not ok else 0


if __name__ == "__main__":
    sys.exit(main())

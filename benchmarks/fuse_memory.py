"""Host (and CUDA) memory of ``dualfuse.fuse(model)``: what the drop-in keeps beyond the source model.

Prints host RSS (VmRSS, after gc and malloc_trim) after a load that is dropped (the baseline: imports and caches),
after loading the source model, after fuse(), and after the source model is deleted (what a user who writes
``model = dualfuse.fuse(model)`` is left with, over the baseline); the source model's parameter bytes; the
bytes of the host spec (the weights fuse() re-fuses from on .to()/.half()/.float()), of the executor's packed
weights and of LayerNorm-folded GEMM weights (distinct storages, so tensors shared between them count once); on
CUDA also torch.cuda.memory_allocated() beyond the packed weights.

    python benchmarks/fuse_memory.py [--model clip-vit-b-32] [--dtype fp32] [--device cpu|cuda] [--fold-ln auto|on|off]

Without CUDA the fused kernels run through the Triton interpreter (TRITON_INTERPRET=1 is set here): fuse()
then builds its coverage-check runners on the CPU, which is all this script needs (it runs no forward).
"""
from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import dualfuse  # noqa: E402
from dualfuse.executors.base import resolve_dtype  # noqa: E402
from dualfuse.spec import named_tensors  # noqa: E402

MIB = 2 ** 20


def rss_mib() -> float:
    """VmRSS after a garbage collection and glibc's malloc_trim (freed heap given back to the OS, so that what
    was freed does not count)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def storage_bytes(tensors, seen: set) -> int:
    """Bytes of the distinct storages among ``tensors`` not already in ``seen`` (updated)."""
    total = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.is_meta:
            continue
        if t.is_meta:  # keep_host_copy=False: shapes only, no memory
            continue
        s = t.untyped_storage()
        key = (s.device.type, s.data_ptr())
        if key not in seen:
            seen.add(key)
            total += s.nbytes()
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="clip-vit-b-32")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--fold-ln", choices=("auto", "on", "off"), default="auto",
                    help="fuse(fold_ln=...): auto folds where launches run without PDL (CPU included)")
    ap.add_argument("--no-host-copy", action="store_true", help="fuse(keep_host_copy=False): no host copy of the weights")
    ap.add_argument("--weights", choices=("fp16", "int8"), default=None, help="fuse(weights=...): int8 = weight-only int8")
    args = ap.parse_args()
    dtype = resolve_dtype(args.dtype)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    start = rss_mib()
    dualfuse.load(args.model)  # a load that is dropped: what imports and caches keep, without fuse()
    base = rss_mib()
    model = dualfuse.load(args.model).to(dtype)
    gc.collect()
    loaded = rss_mib()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    cuda0 = torch.cuda.memory_allocated() if device.startswith("cuda") else 0

    fold_ln = {"auto": None, "on": True, "off": False}[args.fold_ln]
    opts = dict(keep_host_copy=False) if args.no_host_copy else {}
    if args.weights:
        opts["weights"] = args.weights
    fused = dualfuse.fuse(model, dtype=dtype, device=device, fold_ln=fold_ln, **opts)
    gc.collect()
    after_fuse = rss_mib()
    ex = fused.executor
    seen: set = set()
    spec_b = storage_bytes((t for _, t in named_tensors(ex.spec)), seen) if ex.spec is not None else 0
    packed_b = storage_bytes((t for _, t in named_tensors(ex.weights)), seen) if ex.weights is not None else 0
    extra = [getattr(ex, "map_query", None)]
    extra += [t for v in (getattr(ex, "map_kv", None),) if v is not None for t in vars(v).values()
              if isinstance(t, torch.Tensor)]
    extra += [t for v in getattr(ex, "folded", {}).values() for f in v if hasattr(f, "__dict__")
              for t in vars(f).values() if isinstance(t, torch.Tensor)]  # (Linear, FoldedLayerNorm)
    extra_b = storage_bytes(extra, seen)

    del model
    gc.collect()
    after_del = rss_mib()

    print(f"model {args.model}  dtype {args.dtype}  weights {args.weights or args.dtype}  "
          f"host copy {not args.no_host_copy}  device {device}  fold_ln {ex.fold_ln}  "
          f"fallback {ex.fallback is not None}  torch {torch.__version__}")
    print(f"source model parameters        {param_bytes / MIB:9.1f} MiB")
    print(f"host RSS at start              {start:9.1f} MiB")
    print(f"host RSS after a dropped load  {base:9.1f} MiB  (imports and caches; the baseline below)")
    print(f"host RSS after load            {loaded:9.1f} MiB  (+{loaded - base:.1f})")
    print(f"host RSS after fuse            {after_fuse:9.1f} MiB  (+{after_fuse - loaded:.1f} over the loaded model)")
    print(f"host RSS after del model       {after_del:9.1f} MiB  (+{after_del - base:.1f} kept by the fused model)")
    print(f"spec (host copy, re-fuse from) {spec_b / MIB:9.1f} MiB")
    print(f"packed weights not shared w/ spec {packed_b / MIB:6.1f} MiB  (on {ex.device})")
    print(f"folded LN/GEMM + MAP extras    {extra_b / MIB:9.1f} MiB")
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        alloc = torch.cuda.memory_allocated() - cuda0
        print(f"cuda memory_allocated by fuse  {alloc / MIB:9.1f} MiB  "
              f"({(alloc - packed_b - extra_b) / MIB:.1f} MiB beyond the packed weights)")


if __name__ == "__main__":
    main()

"""Stream-read bandwidth of host-mapped memory (the edge-regime stand-in's link), one SM count per process.

    for sms in 0 16 8; do python benchmarks/standin_probe.py --sms $sms --out $OUT/probe; done

A 256 MiB buffer in pinned host memory mapped into the GPU (dualfuse.hostmem) read by a Triton stream-read kernel
and by cuBLAS (``torch.mm`` of M = 1, 16, 64 fp16 rows by a host-mapped fp16 weight), each result checked bit-identical
to the same op on a device-memory copy; the device-memory ops timed beside. Then the re-read probe: the Triton read
with each block read by 2 and 4 programs at once (GB/s over the buffer's bytes once): about the plain read's if
re-reads that run together are served once, about 1/2 and 1/4 of it if each crosses the link again. ``--sms N``: inside a CUDA green context of
N SMs (0: the full card), entered before anything touches CUDA (a green context per process: dualfuse.green).
GB/s = 1e9 bytes/s; median of 10 reads after one warm-up. The same function (dualfuse.hostmem.measure_weight_bandwidth)
gives every stand-in report its bandwidth.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sms", type=int, default=0, help="green context SMs (0 = the full card)")
    ap.add_argument("--mib", type=int, default=256, help="buffer size in MiB (default 256)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default="out/probe")
    args = ap.parse_args(argv)
    info = None
    if args.sms:
        from dualfuse import green

        info = green.enter(args.sms)
    import torch

    from dualfuse.hostmem import measure_weight_bandwidth

    if not torch.cuda.is_available():
        print("standin_probe: needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = measure_weight_bandwidth(args.mib * 2 ** 20, readers=("triton", "reread", "cublas"), cublas_m=(1, 16, 64),
                                    iters=args.iters, device_too=True)
    card = torch.cuda.get_device_name()
    print(f"host-mapped read bandwidth, {card}, {args.sms or 'all'} SMs, {args.mib} MiB, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"{'reader':14s} {'memory':7s} {'ms':>8s} {'GB/s':>8s} identical")
    for r in rows:
        print(f"{r.reader:14s} {r.memory:7s} {r.median_ms:8.3f} {r.gbps:8.1f} {r.identical}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"probe-sms{args.sms}.json")
    with open(path, "w") as f:
        json.dump(dict(card=card, sms=args.sms, green_context=info, torch=torch.__version__,
                       date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                       rows=[r.to_dict() for r in rows]), f, indent=1)
    print(f"results: {path}")
    return 0 if all(r.identical for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

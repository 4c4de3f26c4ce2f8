"""What one dependency costs on the GPU: a kernel boundary (with and without programmatic dependent launch) vs a
wait inside one persistent launch (grid-wide counter, or one producer's flag).

Each variant runs N dependent phases of trivial work (every program reads a value another program wrote in the
previous phase and writes one value), captured in a CUDA graph; time per phase = replay time / N. This is the
floor under every launch of a latency-bound forward (batch 1): it decides whether merging launches into a
persistent kernel with in-kernel waits can pay.

    python benchmarks/sync_cost.py [--programs 112] [--phases 48] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from dualfuse.kernels._utils import gdc_launch, gdc_wait, pdl_supported  # noqa: E402
from dualfuse.timing import time_graph  # noqa: E402  (capture once, replay, CUDA events)


@triton.jit
def _phase_kernel(src, dst, P, USE_PDL: tl.constexpr):
    if USE_PDL:
        gdc_launch()
    pid = tl.program_id(0)
    if USE_PDL:
        gdc_wait()
    v = tl.load(src + (pid + 1) % P)  # a value another program of the previous launch wrote
    tl.store(dst + pid, v + 1)


@triton.jit
def _persistent_kernel(buf, cnt, P, PHASES: tl.constexpr, GLOBAL: tl.constexpr):
    """GLOBAL: every phase waits for all P programs of the previous one (one counter); else only for the one
    program whose value it reads (one flag per program and phase)."""
    pid = tl.program_id(0)
    src_pid = (pid + 1) % P
    for ph in range(PHASES):
        if ph > 0:
            if GLOBAL:
                flag = cnt
                target = ph * P
            else:
                flag = cnt + 1 + (ph - 1) * P + src_pid
                target = 1
            c = tl.atomic_add(flag, 0, sem="acquire", scope="gpu")
            while c < target:
                c = tl.atomic_add(flag, 0, sem="acquire", scope="gpu")
        v = tl.load(buf + ph * P + src_pid, cache_modifier=".cg")  # one buffer per phase: no reuse hazards
        tl.store(buf + (ph + 1) * P + pid, v + 1)
        tl.debug_barrier()
        if GLOBAL:
            tl.atomic_add(cnt, 1, sem="release", scope="gpu")
        else:
            tl.atomic_add(cnt + 1 + ph * P + pid, 1, sem="release", scope="gpu")
    # reset for the next replay: the last program to finish clears every counter
    tl.debug_barrier()
    done = tl.atomic_add(cnt + 1 + PHASES * P, 1, sem="acq_rel", scope="gpu")
    if done == P - 1:
        tl.store(cnt, 0)
        for i in range(0, PHASES * P, 128):
            offs = i + tl.arange(0, 128)
            tl.store(cnt + 1 + offs, 0, mask=offs < PHASES * P)
        tl.atomic_xchg(cnt + 1 + PHASES * P, 0, sem="release", scope="gpu")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--programs", default="112,132", help="comma-separated program counts (<= SMs: co-resident)")
    p.add_argument("--phases", type=int, default=48)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    N = args.phases
    rows = []
    for P in (int(x) for x in args.programs.split(",")):
        if P > sms:
            raise SystemExit(f"--programs {P} > {sms} SMs: a persistent kernel's programs must all be resident")
        bufs = [torch.zeros(P, dtype=torch.int32, device=dev) for _ in range(2)]
        buf = torch.zeros((N + 1) * P, dtype=torch.int32, device=dev)
        cnt = torch.zeros(2 + N * P, dtype=torch.int32, device=dev)

        def launches(pdl):
            def run():
                for i in range(N):
                    _phase_kernel[(P,)](bufs[i % 2], bufs[(i + 1) % 2], P, USE_PDL=pdl, launch_pdl=pdl)
            return run

        variants = {"launch": launches(False)}
        if pdl_supported(dev):
            variants["launch+pdl"] = launches(True)
        variants["persistent-global"] = lambda: _persistent_kernel[(P,)](buf, cnt, P, PHASES=N, GLOBAL=True)
        variants["persistent-flag"] = lambda: _persistent_kernel[(P,)](buf, cnt, P, PHASES=N, GLOBAL=False)
        for name, fn in variants.items():
            buf.zero_()
            us = statistics.median(time_graph([[fn]], replays=200)) * 1e3
            if name.startswith("persistent"):  # each phase read the previous phase's value: the last one is N
                buf.zero_()
                fn()
                torch.cuda.synchronize()
                assert int(cnt.abs().sum()) == 0, f"{name}: counters not reset"
                assert bool((buf[N * P:] == N).all()), f"{name}: a phase read a value before it was written"
            rows.append(dict(programs=P, phases=N, variant=name, us_total=us, us_per_phase=us / N))
            print(f"P={P:4d} {name:<20} {us / N:6.2f} us per phase ({us:.1f} us for {N})", flush=True)
    card = torch.cuda.get_device_name(dev)
    print(f"card: {card}, torch {torch.__version__}, triton {triton.__version__}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(card=card, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

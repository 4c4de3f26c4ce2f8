"""The compiled code of the grouped-GEMM kernel, without a GPU: dump the TTGIR and PTX of every specialization the
fused executor launches on a target device (and its SASS, by the cuobjdump that ships with Triton), and compare two
dumps (e.g. of two commits) after normalizing what a pure source reshuffle changes (source locations, debug
sections). Identical PTX and SASS mean identical machine code: a refactor that leaves every dump unchanged cannot
change speed. With source line info on (Triton's default) ptxas may still name registers differently or swap two
independent instructions where only the line table differs; `TRITON_DISABLE_LINE_INFO=1` on both dumps takes that
out.

    python benchmarks/kernel_ir.py --out /tmp/ir-new                     # dump (h100 and orin-nano configs)
    python benchmarks/kernel_ir.py --out /tmp/ir-new --compare /tmp/ir-old  # dump, then diff against an old dump

Specializations: clip-tiny and siglip-tiny fused at batch 1 under the h100 target (sm_90: TMA, PDL, prefetch, split-K)
and the orin-nano target (sm_87: LayerNorms folded into the GEMMs, row statistics in and out), clip-tiny with int8
weights under both, and direct launches for what those leave out (the per-problem table, split-K reduced in the
launch, deferred partial sums, no prefetch, a folded LayerNorm's pass over x, no early epilogue).
Compiled with the installed Triton (its bundled ptxas), like benchmarks/aot_compile.py, whose stub driver this reuses.
"""
from __future__ import annotations

import argparse
import difflib
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != str(HERE)]
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime import driver  # noqa: E402

_spec = importlib.util.spec_from_file_location("aot_compile", HERE / "aot_compile.py")
aot = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(aot)

KERNEL = "grouped_linear_kernel"
OLD_KERNEL_NAMES = ("_grouped_linear_kernel",)  # its name before it was made public (dumps of older commits)
CASES = (  # (target, model, weights)
    ("h100", "clip-tiny", None), ("h100", "siglip-tiny", None), ("h100", "clip-tiny", "int8"),
    ("orin-nano", "clip-tiny", None), ("orin-nano", "siglip-tiny", None), ("orin-nano", "clip-tiny", "int8"),
)


def _strip_locs(text: str) -> str:
    """The text without its ``loc(...)`` source locations (nested parentheses and quoted file names)."""
    out, i = [], 0
    while True:
        j = text.find("loc(", i)
        if j < 0:
            return "".join(out) + text[i:]
        if j > 0 and (text[j - 1].isalnum() or text[j - 1] in "_#"):  # a name ending in loc, not a location
            out.append(text[i:j + 4])
            i = j + 4
            continue
        out.append(text[i:j].rstrip(" "))
        depth, k, quoted = 0, j + 3, False
        while k < len(text):
            c = text[k]
            if c == '"':
                quoted = not quoted
            elif not quoted and c == "(":
                depth += 1
            elif not quoted and c == ")":
                depth -= 1
                if depth == 0:
                    break
            k += 1
        i = k + 1


def normalize(text: str, kind: str) -> str:
    """What a source reshuffle changes and the machine code does not. PTX: source locations, the labels that
    delimit inlined scopes for the debug info, debug sections. TTGIR: the same, and since constants are hoisted in
    the order the inliner meets them, the value and layout names: the TTGIR is compared as a sorted list of its
    operations (a necessary condition; the PTX and SASS are the exact ones)."""
    lines = []
    if kind == "ttgir":
        text = _strip_locs(text)
        # layout aliases (#blocked1 = ...) are numbered in the order they are met: spell them out
        aliases = dict(re.findall(r"^(#\w+) = (.*)$", text, flags=re.M))
        for ln in text.splitlines():
            if ln.startswith("#"):
                continue
            ln = re.sub(r"#\w+", lambda m: aliases.get(m.group(0), m.group(0)), ln)
            lines.append(re.sub(r"%[\w#]+", "%v", ln).strip())
        lines.sort()
    elif kind == "ptx":
        for ln in text.splitlines():
            s = ln.strip()
            if s.startswith((".section\t.debug", ".section .debug")):
                break  # debug sections run to the end of the file
            if not (s.startswith((".loc", ".file")) or re.fullmatch(r"\$L__tmp\d+:", s)):
                lines.append(ln)
    else:  # sass (cuobjdump -sass)
        lines = [ln for ln in text.splitlines() if ln.strip() and "Fatbin" not in ln and ".cubin" not in ln]
    return "\n".join(lines) + "\n"


def sass(cubin: bytes) -> str:
    """cuobjdump -sass of a cubin ("" without cuobjdump)."""
    tool = aot._cuobjdump()
    if tool is None:
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout


class _Dumper:
    def __init__(self, out: Path, cc: int, label: str):
        self.out, self.cc, self.label = out, cc, label
        self.seen: set = set()
        self.records: list[dict] = []

    def __call__(self, *, fn, compile, **_):
        if fn.name not in (KERNEL,) + OLD_KERNEL_NAMES:
            return True
        names = fn.jit_function.arg_names
        spec = json.loads(compile["specialization_data"])
        options = {k: v for k, v in spec["options"].items() if k in aot.OPTION_KEYS and v is not None}
        consts = {names[k[0]] if isinstance(k, tuple) and len(k) == 1 else str(k): repr(getattr(v, "value", v))
                  for k, v in compile["constants"].items()}
        sig = {names[k] if isinstance(k, int) else str(k): v for k, v in compile["signature"].items()}
        attrs = repr(sorted((repr(k), repr(v)) for k, v in compile["configs"][0].items()))
        key = json.dumps([self.cc, sorted(consts.items()), sorted(sig.items()), attrs, sorted(options.items())])
        name = hashlib.sha1(key.encode()).hexdigest()[:12]
        if name in self.seen:
            return True
        self.seen.add(name)
        src = ASTSource(fn.jit_function, compile["signature"], compile["constants"], compile["configs"][0])
        t0 = time.perf_counter()
        out = triton.compile(src, target=GPUTarget("cuda", self.cc, 32), options=options)
        for kind in ("ttgir", "ptx", "sass"):
            text = sass(out.asm["cubin"]) if kind == "sass" else out.asm[kind]
            (self.out / f"{name}.{kind}").write_text(normalize(text, kind))
        rec = dict(name=name, case=self.label, arch=f"sm_{self.cc}", key=json.loads(key),
                   ptx_lines=out.asm["ptx"].count("\n"), shared=int(out.metadata.shared),
                   compile_s=round(time.perf_counter() - t0, 1))
        self.records.append(rec)
        print(f"  {self.label} sm_{self.cc} {name}: {rec['compile_s']} s", flush=True)
        return True


def _direct_launches():
    """Launches the tiny models at batch 1 do not make: five problems (fields from the device table, META_IN_ARGS
    off); split-K reduced in the launch with an in-place residual, deferred partial sums, both without the L2
    prefetch; a folded LayerNorm whose statistics come from a pass over x, at 600 rows (no early epilogue)."""
    from dualfuse.kernels.gemm import GroupedLinear, LinearProblem, fold_layernorm, grouped_linear

    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).half()

    grouped_linear([r(50, 64) for _ in range(5)], [r(96, 64) for _ in range(5)], [r(96) for _ in range(5)],
                   activations="gelu")
    out = r(50, 256)
    parts = torch.empty(4, 50, 128)
    cfg = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, prefetch=False)
    GroupedLinear([LinearProblem(r(50, 768), r(256, 768), out, bias=r(256), residual=out)], split_k=4, config=cfg)()
    GroupedLinear([LinearProblem(r(50, 768), r(128, 768), parts, partial_sums=True)], config=cfg)()
    wf, bf, norm = fold_layernorm(r(256, 256), r(256), r(256), r(256), 1e-5)
    grouped_linear([r(600, 256)], [wf], [bf], activations="quick_gelu", norms=[norm])


def dump(out: Path, cases=CASES, direct: bool = True) -> list[dict]:
    from dualfuse.kernels._utils import target_device
    from dualfuse.targets import get_target

    out.mkdir(parents=True, exist_ok=True)
    aot._patch_interpreter_flag()
    records = []
    cases = list(cases) + ([("h100", "direct", None)] if direct else [])
    for tname, model, weights in cases:
        target = get_target(tname)
        cc = target.capability[0] * 10 + target.capability[1]
        hook = _Dumper(out, cc, f"{tname}/{model}/{weights or 'fp16'}")
        knobs.runtime.jit_cache_hook = hook
        driver.set_active(aot._StubDriver(GPUTarget("cuda", cc, 32)))
        with target_device(target.props()):
            if model == "direct":
                _direct_launches()
            else:
                aot._calls(aot._fuse(model, torch.float16, weights), 1, frames=False)
        records += hook.records
    (out / "index.json").write_text(json.dumps(dict(triton=triton.__version__, records=records), indent=1))
    return records


def same_name(text: str) -> str:
    """The text with the kernel's earlier names spelled as its current one (a dump of an older commit names its
    entry point, parameters and symbols after the old name)."""
    for old in OLD_KERNEL_NAMES:
        text = re.sub(rf"(?<!\w){re.escape(old)}", KERNEL, text)  # also its parameters: NAME_param_0, ...
    return text


def compare(new: Path, old: Path) -> int:
    a = {r["name"]: r for r in json.loads((old / "index.json").read_text())["records"]}
    b = {r["name"]: r for r in json.loads((new / "index.json").read_text())["records"]}
    bad = 0
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            print(f"  {name}: only in {'new' if name in b else 'old'}")
            bad += 1
            continue
        for kind in ("ttgir", "ptx", "sass"):
            x, y = same_name((old / f"{name}.{kind}").read_text()), same_name((new / f"{name}.{kind}").read_text())
            if x != y:
                bad += 1
                diff = list(difflib.unified_diff(x.splitlines(), y.splitlines(), lineterm="", n=0))
                print(f"  {b[name]['case']} {b[name]['arch']} {name}.{kind}: DIFFERS ({len(diff)} diff lines)")
                print("\n".join(diff[:20]))
    print(f"{len(set(a) & set(b))} specializations compared, {bad} differences")
    return 1 if bad else 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="write the dump here")
    ap.add_argument("--compare", help="then compare with this earlier dump")
    ap.add_argument("--direct-only", action="store_true", help="only the direct launches (no fused models)")
    args = ap.parse_args(argv)
    print(f"triton {triton.__version__}, torch {torch.__version__}")
    t0 = time.perf_counter()
    recs = dump(Path(args.out), cases=() if args.direct_only else CASES)
    print(f"{len(recs)} specializations dumped in {time.perf_counter() - t0:.0f} s")
    return compare(Path(args.out), Path(args.compare)) if args.compare else 0


if __name__ == "__main__":
    sys.exit(main())

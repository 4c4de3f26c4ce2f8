"""Small helpers shared by the dualfuse Triton kernels.

Kept small and stable: other kernels (LayerNorm, attention) import from here.

- `quick_gelu`, `gelu_erf`, `gelu_tanh`: @triton.jit activations on fp32 values.
- `apply_activation(x, act)`: picks one by integer code; `act` may be a tl.constexpr (branch resolved at
  compile time) or a runtime scalar loaded from memory (one uniform branch per program).
- `scalar_bool(c)`: a runtime scalar condition that can be combined with a bool block (`mask & scalar_bool(c)`).
- `problem_of(pid, meta, n, NF, COL_START)`, `load_field(row, col, ty, ALIGN)`: the prologue of a grouped kernel
  whose problems are rows of an int64 metadata table (which problem a program belongs to; its fields, hinted).
- `ACTIVATIONS` / `activation_code(name)`: the name -> code table shared by host and kernels.
- `num_sms()`, `device_smem_bytes()`, `l2_cache_bytes()`: device queries that also answer on CPU.
- `is_interpreter()`: True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1).
- `gdc_wait()`, `gdc_launch()`, `pdl_supported(device)`: programmatic dependent launch (sm_90+, optional).
- `set_sm_limit(n)`: the SM count of a green context, so the kernels plan their grids for it.
- `DeviceProps`, `target_device(props)`, `device_props(device)`, `target_props()`: what the config heuristics read
  of a device (SMs, compute capability, shared memory, L2); `target_device` makes them plan for another device
  (an Orin, ahead of time on a machine without it: benchmarks/aot_compile.py).
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# name -> code used inside kernels. 0 means "no activation". Names follow the HF meaning:
#   quick_gelu: x * sigmoid(1.702 x) (CLIP)  gelu: exact 0.5 x (1 + erf(x / sqrt 2))
#   gelu_tanh: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (SigLIP's gelu_pytorch_tanh)
ACT_NONE, ACT_QUICK_GELU, ACT_GELU, ACT_GELU_TANH = 0, 1, 2, 3
ACTIVATIONS: dict[str, int] = {"quick_gelu": ACT_QUICK_GELU, "gelu": ACT_GELU, "gelu_tanh": ACT_GELU_TANH}


def activation_code(name: str | None) -> int:
    """Integer code of an activation name (None -> 0). Unknown name -> ValueError."""
    if name is None:
        return ACT_NONE
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be None or one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


@triton.jit
def quick_gelu(x):
    return x * tl.sigmoid(1.702 * x)


@triton.jit
def gelu_erf(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def gelu_tanh(x):
    # tanh(z) = 2 * sigmoid(2z) - 1: tl has no portable tanh across triton 3.6..3.9 and the interpreter.
    z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return x * tl.sigmoid(2.0 * z)  # == 0.5 * x * (1 + tanh(z))


@triton.jit
def apply_activation(x, act):
    """x: fp32 tensor; act: ACT_* code (constexpr or runtime scalar)."""
    if act == 1:
        x = quick_gelu(x)
    elif act == 2:
        x = gelu_erf(x)
    elif act == 3:
        x = gelu_tanh(x)
    return x


@triton.jit
def scalar_bool(c):
    """``c``, a runtime scalar condition, as a bool that combines with a bool block: ``mask & scalar_bool(c)``.

    Under the interpreter a scalar comparison (``n > 0``, ``(flags & 16) != 0``) keeps its operands' dtype, so
    ``mask & (n > 0)`` is an int32 mask, which Triton 3.9's interpreter rejects ("mask has unsupported dtype");
    through tl.where it is a bool. Compiled, tl.where(c, True, False) folds to ``c``: the same code as ``mask & c``.
    """
    return tl.where(c, True, False)


@triton.jit
def problem_of(pid, meta, n_problems, NF: tl.constexpr, COL_START: tl.constexpr):
    """The problem program ``pid`` belongs to, for a kernel whose problems are the rows of an int64 [P, NF] table
    with each problem's first program id in column COL_START, increasing (a linear scan: there are few problems)."""
    prob = 0
    for p in range(1, n_problems):
        prob += (pid >= tl.load(meta + p * NF + COL_START)).to(tl.int32)
    return prob


@triton.jit
def load_field(row, col: tl.constexpr, ty, ALIGN: tl.constexpr):
    """Column ``col`` of a problem's int64 metadata row as ``ty`` (an integer or pointer type), hinted to be a
    multiple of ALIGN (bytes for a pointer, elements for an integer; 1: no hint) so loads can be 16 bytes wide.

    The hint is set here, inside the helper: tl.multiple_of marks the op that defines its value, and the value
    a @triton.jit helper returns keeps no such mark once the helper is inlined."""
    v = tl.load(row + col).to(ty)
    if ALIGN > 1:
        v = tl.multiple_of(v, ALIGN)
    return v


# Options every launch passes. enable_fp_fusion: contract a*b+c into FMAs, as Triton 3.6-3.9 do by default;
# stated explicitly because Triton 3.9 warns when it is unset and 3.10 turns the default off (other rounding).
LAUNCH_OPTIONS = {"enable_fp_fusion": True}


def is_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _cuda_index(device) -> int | None:
    device = torch.device(device) if device is not None else None
    if device is None:
        return torch.cuda.current_device() if torch.cuda.is_available() else None
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


# Nominal values reported for a non-CUDA device (the interpreter has no limits; kernels pick small
# fixed configs there anyway). Chosen to look like a small sm_8x part.
CPU_NUM_SMS = 8
CPU_SMEM_BYTES = 99 * 1024
CPU_L2_BYTES = 4 * 1024 * 1024


_SM_LIMIT: int | None = None  # SMs of the green context this process runs in (None: the whole device)


def set_sm_limit(n: int | None) -> None:
    """Plan kernel grids for ``n`` SMs (a green context's count; None = the whole device).

    A green context limits the SMs kernels get, but the device properties still report all of them; the
    grid heuristics (waves, split-K) would then plan for SMs the kernels cannot use. dualfuse.green.enter
    calls this. Affects kernels prepared after the call."""
    global _SM_LIMIT
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ValueError(f"SM limit must be None or a positive int, got {n!r}")
    _SM_LIMIT = n


@dataclass(frozen=True)
class DeviceProps:
    """What the kernels' config heuristics read of a device."""

    name: str
    num_sms: int
    capability: tuple[int, int]
    smem_per_block: int  # opt-in maximum of dynamic shared memory per block, bytes
    l2_bytes: int


_TARGET: DeviceProps | None = None  # the device kernels plan for instead of the one they run on (target_device)


@contextlib.contextmanager
def target_device(props: DeviceProps | None):
    """Within the block, kernels prepared plan their configs (tiles, split-K, PDL, TMA, shared-memory fits) for
    ``props`` instead of the device their tensors live on: ahead-of-time compiles for a device that is not here
    (``dualfuse.targets.Target.props()``). None: no change."""
    global _TARGET
    if props is not None and not isinstance(props, DeviceProps):
        raise ValueError(f"target_device: expected a DeviceProps or None, got {type(props).__name__}")
    old, _TARGET = _TARGET, (props if props is not None else _TARGET)
    try:
        yield props
    finally:
        _TARGET = old


def target_props() -> DeviceProps | None:
    """The DeviceProps set by target_device, or None."""
    return _TARGET


def device_props(device=None) -> DeviceProps | None:
    """The device kernels plan for: the target_device's, else the CUDA device's, else None (CPU: the interpreter's
    small fixed configs)."""
    if _TARGET is not None:
        return _TARGET
    idx = _cuda_index(device)
    if idx is None:
        return None
    p = torch.cuda.get_device_properties(idx)
    return DeviceProps(p.name, p.multi_processor_count, (p.major, p.minor), device_smem_bytes(device),
                       l2_cache_bytes(device))


def num_sms(device=None) -> int:
    """Streaming multiprocessors the kernels may use: the device's (CPU_NUM_SMS on CPU; the target's under
    target_device), or fewer when a green context's limit was set (set_sm_limit)."""
    n = _TARGET.num_sms if _TARGET is not None else _device_sms(_cuda_index(device))
    return min(n, _SM_LIMIT) if _SM_LIMIT is not None else n


@functools.lru_cache(maxsize=None)
def _device_sms(idx: int | None) -> int:
    if idx is None:
        return CPU_NUM_SMS
    return torch.cuda.get_device_properties(idx).multi_processor_count


def device_smem_bytes(device=None) -> int:
    """Max dynamic shared memory one block may opt in to (e.g. 232448 on H100, 166912 on Orin/A100)."""
    if _TARGET is not None:
        return _TARGET.smem_per_block
    return _device_smem_bytes(device)


@functools.lru_cache(maxsize=None)
def _device_smem_bytes(device=None) -> int:
    idx = _cuda_index(device)
    if idx is None:
        return CPU_SMEM_BYTES
    try:
        return int(triton.runtime.driver.active.utils.get_device_properties(idx)["max_shared_mem"])
    except Exception:  # older/newer driver API: fall back to torch
        props = torch.cuda.get_device_properties(idx)
        return int(getattr(props, "shared_memory_per_block_optin", 0) or props.shared_memory_per_block)


def l2_cache_bytes(device=None) -> int:
    if _TARGET is not None:
        return _TARGET.l2_bytes
    return _l2_cache_bytes(device)


@functools.lru_cache(maxsize=None)
def _l2_cache_bytes(device=None) -> int:
    idx = _cuda_index(device)
    if idx is None:
        return CPU_L2_BYTES
    return int(getattr(torch.cuda.get_device_properties(idx), "L2_cache_size", 50 * 1024 * 1024))


# Programmatic dependent launch (sm_90+, optional): a kernel launched with launch_pdl=True may start its
# programs while the previous kernel drains. gdc_launch() lets the NEXT launch start; gdc_wait() blocks until
# the previous launch has completed and its writes are visible. A kernel may do before gdc_wait only what
# reads nothing an earlier kernel writes (weights, metadata tables). Called through wrappers so a kernel's
# source never names tl.extra.cuda where it is missing (an older Triton, the interpreter).
try:
    from triton.language.extra.cuda import gdc_launch_dependents as _gdc_launch_dependents
    from triton.language.extra.cuda import gdc_wait as _gdc_wait_impl

    @triton.jit
    def gdc_wait():
        _gdc_wait_impl()

    @triton.jit
    def gdc_launch():
        _gdc_launch_dependents()

    try:
        from triton.backends.nvidia.compiler import CUDAOptions as _CUDAOptions

        HAS_PDL = "launch_pdl" in _CUDAOptions.__dataclass_fields__
    except Exception:  # pragma: no cover
        HAS_PDL = False
except Exception:  # pragma: no cover - Triton without the intrinsics
    HAS_PDL = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch():
        pass


def pdl_supported(device) -> bool:
    """Programmatic dependent launch: CUDA device of compute capability >= 9 and a Triton that has it (under
    target_device: the target's capability)."""
    if _TARGET is not None:
        return HAS_PDL and _TARGET.capability[0] >= 9
    device = torch.device(device)
    if not HAS_PDL or device.type != "cuda" or is_interpreter():
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


TORCH_TO_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def pow2_divisor(values, cap: int) -> int:
    """Largest power of two <= cap dividing every non-zero value (alignment hints for the compiler)."""
    a = cap
    for v in values:
        v = abs(int(v))
        while v and a > 1 and v % a:
            a //= 2
    return a


def check_tensor(where: str, name: str, t, device, dtype=None, *, allow_none: bool = False) -> None:
    """A launcher's check of one problem tensor: a Tensor (None too with ``allow_none``) on ``device`` (one launch,
    one device) of ``dtype`` when given (one launch shares dtypes); ValueError naming ``where`` and ``name``."""
    if t is None and allow_none:
        return
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{where}: {name} must be a Tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{where}: {name} is on {t.device}, expected {device} (all on one device)")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{where}: {name} dtype {t.dtype} differs from {dtype} (one launch shares dtypes)")


def describe(t) -> str:
    """A tensor's shape, dtype and strides for error messages (the type name for anything else)."""
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{tuple(t.shape)} {t.dtype} strides {tuple(t.stride())}"

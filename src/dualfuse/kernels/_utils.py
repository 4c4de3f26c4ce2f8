"""Small helpers shared by the dualfuse Triton kernels.

Kept small and stable: other kernels (LayerNorm, attention) import from here.

- `quick_gelu`, `gelu_erf`, `gelu_tanh`: @triton.jit activations on fp32 values.
- `apply_activation(x, act)`: picks one by integer code; `act` may be a tl.constexpr (branch resolved at
  compile time) or a runtime scalar loaded from memory (one uniform branch per program).
- `ACTIVATIONS` / `activation_code(name)`: the name -> code table shared by host and kernels.
- `num_sms()`, `device_smem_bytes()`, `l2_cache_bytes()`: device queries that also answer on CPU.
- `is_interpreter()`: True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# name -> code used inside kernels. 0 means "no activation". Names follow the issue/HF meaning:
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


@functools.lru_cache(maxsize=None)
def num_sms(device=None) -> int:
    """Streaming multiprocessors of the CUDA device (CPU_NUM_SMS on CPU).

    Note: a green context limits the SMs a kernel gets but not this number; pass an explicit count to
    the kernels' configs in that case."""
    idx = _cuda_index(device)
    if idx is None:
        return CPU_NUM_SMS
    return torch.cuda.get_device_properties(idx).multi_processor_count


@functools.lru_cache(maxsize=None)
def device_smem_bytes(device=None) -> int:
    """Max dynamic shared memory one block may opt in to (e.g. 232448 on H100, 166912 on Orin/A100)."""
    idx = _cuda_index(device)
    if idx is None:
        return CPU_SMEM_BYTES
    try:
        return int(triton.runtime.driver.active.utils.get_device_properties(idx)["max_shared_mem"])
    except Exception:  # older/newer driver API: fall back to torch
        props = torch.cuda.get_device_properties(idx)
        return int(getattr(props, "shared_memory_per_block_optin", 0) or props.shared_memory_per_block)


@functools.lru_cache(maxsize=None)
def l2_cache_bytes(device=None) -> int:
    idx = _cuda_index(device)
    if idx is None:
        return CPU_L2_BYTES
    return int(getattr(torch.cuda.get_device_properties(idx), "L2_cache_size", 50 * 1024 * 1024))


TORCH_TO_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def pow2_divisor(values, cap: int) -> int:
    """Largest power of two <= cap dividing every non-zero value (alignment hints for the compiler)."""
    a = cap
    for v in values:
        v = abs(int(v))
        while v and a > 1 and v % a:
            a //= 2
    return a


def describe(t) -> str:
    """A tensor's shape, dtype and strides for error messages (the type name for anything else)."""
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{tuple(t.shape)} {t.dtype} strides {tuple(t.stride())}"

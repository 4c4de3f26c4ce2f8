"""Test setup: on a machine without CUDA every Triton kernel runs through the interpreter."""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must be set before any @triton.jit function is created (i.e. before dualfuse.kernels imports).
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Kernel tests run where the kernels can run: the GPU when there is one, else the CPU interpreter.
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def kernel_device():
    return KERNEL_DEVICE

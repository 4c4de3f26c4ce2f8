"""Test setup: on a machine without CUDA every Triton kernel runs through the interpreter; every test's random
inputs come from a seed of its own (one base seed mixed with the test's node id), printed when the test fails.
Tests slower than ~5 s here carry `slow` and are left out by default (pyproject's addopts: -m "not slow");
`pytest -m slow` runs them."""
import hashlib
import os
import random

import numpy as np
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must be set before any @triton.jit function is created (i.e. before dualfuse.kernels imports).
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    # the interpreter re-patches triton.language at every helper call; skip the repeats, here and in the Python
    # processes tests spawn (interpreter_speed.py says why it is safe)
    import interpreter_speed

    interpreter_speed.install()
    _site = os.path.join(os.path.dirname(os.path.abspath(__file__)), "interpreter_site")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_site, os.environ.get("PYTHONPATH")) if p)

# Kernel tests run where the kernels can run: the GPU when there is one, else the CPU interpreter.
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"

# records the kernels launched through the interpreter; fails a default run that left one out (kernel_launches.py)
pytest_plugins = ("kernel_launches",)

SEED_ENV = "DUALFUSE_TEST_SEED"
DEFAULT_BASE_SEED = 20251126


def base_seed() -> int:
    raw = os.environ.get(SEED_ENV, "").strip()
    if not raw:
        return DEFAULT_BASE_SEED
    try:
        return int(raw, 0)
    except ValueError:
        raise pytest.UsageError(f"{SEED_ENV} must be an integer, got {raw!r}") from None


def seed_for(nodeid: str, base: int | None = None) -> int:
    """The seed of one test: a hash of the base seed and the node id (different tests, different inputs).
    31 bits: valid for torch, numpy's legacy global generator and random alike."""
    base = base_seed() if base is None else base
    digest = hashlib.blake2b(f"{base}:{nodeid}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # CPU and every CUDA device


def pytest_configure(config):
    # a malformed DUALFUSE_TEST_SEED stops the run here; a seeded start for fixtures built before any test's seed
    seed_everything(base_seed())


def pytest_report_header(config):
    return f"dualfuse test seed: base {base_seed()} ({SEED_ENV}), mixed with each test's node id"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def test_seed(request) -> int:
    """Seeds torch, random and numpy for this test; the seed, for a test that wants a generator of its own."""
    seed = seed_for(request.node.nodeid)
    seed_everything(seed)
    return seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        base = base_seed()
        rep.sections.append(("dualfuse test seed", f"dualfuse test seed: {seed_for(item.nodeid, base)} "
                             f"(rerun with {SEED_ENV}={base} python -m pytest '{item.nodeid}')"))


@pytest.fixture
def kernel_device():
    return KERNEL_DEVICE

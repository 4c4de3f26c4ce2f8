"""Shared by the kernel tests: fresh random inputs every run (the seed is printed for reproduction)."""
import secrets

import pytest
import torch


@pytest.fixture(autouse=True)
def fresh_seed():
    seed = secrets.randbits(31)
    torch.manual_seed(seed)
    print(f"seed={seed}")
    return seed

"""Fixtures shared by every test file."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels are defined at import: without a GPU, define them for Triton's interpreter so
    # tests/kernels can check them on the CPU (the training path takes them only when
    # DPSPEED_FUSED_GHOST_NORM=1, which a test sets where it means to)
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def float64():
    """torch's default dtype float64 for the test (exactness checks at 1e-6), restored after."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture
def fresh_registry(monkeypatch):
    """Layer rules registered by the test are gone after it."""
    from dpspeed.layers import registry

    monkeypatch.setattr(registry, "_BY_TYPE", dict(registry._BY_TYPE))
    monkeypatch.setattr(registry, "_BY_NAME", dict(registry._BY_NAME))

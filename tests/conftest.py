"""Fixtures shared by every test file."""

import pytest
import torch


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

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

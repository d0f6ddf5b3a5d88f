"""Clipping functions: the factor of a gradient of norm ||g|| in a group with threshold R."""

from __future__ import annotations

import pytest
import torch

from dpspeed.clipping.functions import abadi, automatic, clipping_function


def test_abadi_clips_to_the_threshold_and_leaves_small_gradients():
    norms = torch.tensor([0.0, 0.5, 1.0, 4.0])
    factors = abadi(norms, 1.0)
    assert factors[0] == 1 and factors[1] == 1
    assert torch.allclose(factors[2:], torch.tensor([1.0, 0.25]), atol=1e-5)
    assert ((factors * norms) <= 1.0).all()  # never above R


def test_automatic_normalises_every_example():
    norms = torch.tensor([0.0, 1.0, 100.0])
    assert torch.allclose(automatic(norms, 2.0), 2.0 / (norms + 0.01))
    assert ((automatic(norms, 2.0) * norms) < 2.0).all()


def test_factors_keep_the_norms_dtype_and_names_are_checked():
    assert abadi(torch.ones(3, dtype=torch.float64), 1.0).dtype == torch.float64
    assert clipping_function("automatic") is automatic
    with pytest.raises(ValueError, match="clipping_fn"):
        clipping_function("soft")

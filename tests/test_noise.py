"""The noise: N(0, sigma^2 R^2) once per logical batch, scaled to the groups' thresholds, divided by the
expected (not the realised) batch size."""

from __future__ import annotations

import math

from tests.helpers.engines import private_linear


def test_noise_std_is_sigma_times_R_once_per_logical_batch():
    """Zero data: the update is noise alone; its std over coordinates is sigma * R / expected batch."""
    engine, model, opt, loader = private_linear(noise=1.5, max_physical_batch_size=3, loss_reduction="sum")
    stds, steps = [], 0
    for x, y in loader:
        (model(x * 0) * 0).sum().backward()
        opt.step()
        if opt.is_last_physical_batch:
            stds.append(float(model.weight.grad.std()))
            steps += 1
        opt.zero_grad()
    assert steps == len(loader) == engine.accountant.steps
    # sum reduction: no division; 400 coordinates x 4 steps: std estimate within a few percent
    assert abs(sum(stds) / len(stds) - 1.5 * 2.0) < 0.15


def test_noise_scales_with_group_thresholds():
    engine, model, opt, loader = private_linear(noise=1.0, loss_reduction="mean", style=[["weight"]])
    assert math.isclose(engine.grouping.total_threshold, 2.0)
    engine2, *_ = private_linear(noise=1.0, style="param-wise")
    assert math.isclose(engine2.grouping.total_threshold, 2.0)


def test_mean_reduction_divides_by_expected_not_realised_batch():
    engine, model, opt, loader = private_linear(noise=1.0, loss_reduction="mean", batch=16)
    for x, y in loader:
        (model(x * 0) * 0).sum().backward()
        opt.step()
        if opt.is_last_physical_batch:
            assert abs(float(model.weight.grad.std()) - 2.0 / 16) < 0.02
        opt.zero_grad()

"""Noise, sampling and accounting: the parts of the guarantee that are not clipping."""

from __future__ import annotations

import math

import dp_accounting
import pytest
import torch
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpspeed import PrivacyEngine
from dpspeed.sampling import PoissonBatchSampler


def _setup(noise=1.0, n=64, batch=16, dim=400, style="all-layer", **kw):
    torch.manual_seed(0)
    model = nn.Linear(dim, 1, bias=False)
    loader = DataLoader(TensorDataset(torch.randn(n, dim), torch.randn(n, 1)), batch_size=batch)
    engine = PrivacyEngine()
    model, opt, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                             data_loader=loader, noise_multiplier=noise, max_grad_norm=2.0,
                                             clipping_style=style, **kw)
    return engine, model, opt, loader


def test_noise_std_is_sigma_times_R_once_per_logical_batch():
    """Zero data: the update is noise alone; its std over coordinates is sigma * R / expected batch."""
    engine, model, opt, loader = _setup(noise=1.5, max_physical_batch_size=3, loss_reduction="sum")
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
    engine, model, opt, loader = _setup(noise=1.0, loss_reduction="mean", style=[["weight"]])
    assert math.isclose(engine.grouping.total_threshold, 2.0)
    engine2, *_ = _setup(noise=1.0, style="param-wise")
    assert math.isclose(engine2.grouping.total_threshold, 2.0)


def test_mean_reduction_divides_by_expected_not_realised_batch():
    engine, model, opt, loader = _setup(noise=1.0, loss_reduction="mean", batch=16)
    for x, y in loader:
        (model(x * 0) * 0).sum().backward()
        opt.step()
        if opt.is_last_physical_batch:
            assert abs(float(model.weight.grad.std()) - 2.0 / 16) < 0.02
        opt.zero_grad()


def test_poisson_batch_sizes_are_binomial():
    n, q = 200, 0.1
    sampler = PoissonBatchSampler(n, q, steps=2000, seed=1)
    sizes = torch.tensor([len(b) for b in sampler], dtype=torch.float64)
    assert abs(float(sizes.mean()) - n * q) < 0.3
    assert abs(float(sizes.var()) - n * q * (1 - q)) < 2.0
    indices = [i for b in PoissonBatchSampler(n, q, steps=50, seed=1) for i in b]
    assert len(set(indices)) > 0.9 * len(set(range(n)) & set(indices))


def test_empty_logical_batch_still_steps_with_noise():
    engine, model, opt, loader = _setup(noise=1.0, n=64, batch=1, seed=3)
    empties = 0
    for x, y in loader:
        if len(x) == 0:
            empties += 1
        (model(x) - y).square().sum().backward()
        opt.step()
        assert model.weight.grad is not None and torch.isfinite(model.weight.grad).all()
        opt.zero_grad()
    assert empties > 0 and engine.accountant.steps == len(loader)


def test_sampler_state_resumes_the_same_batches():
    a = PoissonBatchSampler(100, 0.2, steps=3, seed=5)
    list(a)
    state = a.state_dict()
    b = PoissonBatchSampler(100, 0.2, steps=3, seed=99)
    b.load_state_dict(state)
    assert list(a) == list(b)


@pytest.mark.parametrize("kind", ["pld", "rdp"])
def test_epsilon_matches_dp_accounting(kind):
    engine = PrivacyEngine(accountant=kind)
    for _ in range(30):
        engine.accountant.step(1.1, 0.01)
    for _ in range(20):
        engine.accountant.step(0.9, 0.02)
    acc = pld_privacy_accountant.PLDAccountant() if kind == "pld" else rdp_privacy_accountant.RdpAccountant()
    for sigma, q, steps in [(1.1, 0.01, 30), (0.9, 0.02, 20)]:
        acc.compose(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
    assert engine.accountant.get_epsilon(1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)


def test_make_private_with_epsilon_reaches_target():
    model = nn.Linear(3, 1)
    loader = DataLoader(TensorDataset(torch.randn(1000, 3), torch.randn(1000, 1)), batch_size=50)
    engine = PrivacyEngine()
    model, opt, loader = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
        target_epsilon=2.0, target_delta=1e-5, epochs=3, max_grad_norm=1.0)
    for _ in range(3 * len(loader)):
        engine.accountant.step(engine.noise_multiplier, 50 / 1000)
    assert engine.get_epsilon(1e-5) == pytest.approx(2.0, rel=0.01)
    assert engine.get_epsilon(1e-5) <= 2.0 * 1.0001


def test_state_dict_round_trip_continues_epsilon():
    engine, model, opt, loader = _setup()
    for x, y in loader:
        (model(x) - y).square().mean().backward()
        opt.step()
        opt.zero_grad()
    state = engine.state_dict()
    fresh, *_ = _setup()
    fresh.load_state_dict(state)
    assert fresh.get_epsilon(1e-5) == engine.get_epsilon(1e-5)
    assert fresh.data_loader.state_dict()["generator"].equal(engine.data_loader.state_dict()["generator"])


def test_fixed_batches_warn_that_epsilon_assumes_poisson():
    engine, model, opt, loader = _setup(poisson_sampling=False)
    engine.accountant.step(1.0, 0.25)
    with pytest.warns(UserWarning, match="assumes Poisson"):
        engine.get_epsilon(1e-5)

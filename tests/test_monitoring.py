"""engine.on_step: each logical step's numbers, checked against the per-example gradients of the
one-example-at-a-time reference; the CSV writer."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpspeed import PrivacyEngine
from dpspeed.monitoring import CSVWriter, StepMetrics
from dpspeed.testing import per_example_grads

pytestmark = pytest.mark.usefixtures("float64")


def _run(style, max_grad_norm: float, **options) -> tuple[list[StepMetrics], list[float], PrivacyEngine]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(12, 4) * 2, torch.randint(0, 3, (12,))
    examples = [(x[i : i + 1], y[i : i + 1]) for i in range(12)]
    grads = per_example_grads(model, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="sum"), examples)
    norms = [math.sqrt(sum(float(g.square().sum()) for g in example.values())) for example in grads]
    engine = PrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), data_loader=DataLoader(TensorDataset(x, y),
        batch_size=6), noise_multiplier=1.0, max_grad_norm=max_grad_norm, poisson_sampling=False,
        clipping_style=style, **options)
    seen: list[StepMetrics] = []
    engine.on_step(seen.append)
    for xb, yb in loader:
        nn.functional.cross_entropy(model(xb), yb).backward()
        optimizer.step()
        optimizer.zero_grad()
    return seen, norms, engine


@pytest.mark.parametrize("style,physical", [("all-layer", None), ("layer-wise", 4), ("param-wise", 2)])
def test_step_metrics_match_the_reference_norms(style, physical):
    """Layer-wise clipping releases each layer's groups early: the parts of a pass add up."""
    seen, norms, engine = _run(style, 1.0, max_physical_batch_size=physical, clipping_mode="bk")
    assert [m.step for m in seen] == [1, 2] and [m.examples for m in seen] == [6, 6]
    for m, batch in zip(seen, (norms[:6], norms[6:])):
        want = torch.tensor(batch)
        assert m.norm_max == pytest.approx(float(want.max()), rel=1e-6)
        assert m.norm_p50 == pytest.approx(float(torch.quantile(want, 0.5)), rel=1e-6)
        assert m.noise_std == pytest.approx(1.0) and m.epsilon is None


def test_clipped_fraction_counts_examples_over_a_threshold():
    assert all(m.clipped_fraction == 0.0 for m in _run("all-layer", 1e6)[0])
    assert all(m.clipped_fraction == 1.0 for m in _run("all-layer", 1e-6)[0])
    seen, norms, _ = _run("all-layer", 2.0)
    assert seen[0].clipped_fraction == pytest.approx(sum(n > 2.0 for n in norms[:6]) / 6)


def test_epsilon_every_k_steps_and_the_csv_writer(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    engine = PrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(torch.randn(40, 3), torch.randint(0, 2, (40,))), batch_size=10),
        noise_multiplier=1.0, max_grad_norm=1.0)
    seen: list[StepMetrics] = []
    engine.on_step(seen.append, delta=1e-5, epsilon_every=2)
    engine.on_step(CSVWriter(tmp_path / "dp.csv"))
    for xb, yb in loader:
        nn.functional.cross_entropy(model(xb), yb).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert [m.epsilon is None for m in seen] == [True, False, True, False]
    assert seen[-1].epsilon == pytest.approx(engine.get_epsilon(1e-5))
    rows = list(csv.DictReader((tmp_path / "dp.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4] and all(r["epsilon"] == "" for r in rows)
    assert sum(int(r["examples"]) for r in rows) == sum(m.examples for m in seen)


def test_nothing_is_kept_for_metrics_unless_watched():
    _, _, engine = _run("all-layer", 1.0)
    assert engine.optimizer.step_norms == []
    model = nn.Linear(2, 2)
    optimizer = PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                             data_loader=DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=2),
                                             noise_multiplier=1.0, max_grad_norm=1.0)[1]
    assert optimizer.step_norms is None

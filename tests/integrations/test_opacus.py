"""A script written for Opacus runs on dpspeed with its imports changed: Opacus's make_private
arguments are mapped or refused by name, and what Opacus scripts read and call is there."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpspeed import BatchMemoryManager, ModuleValidator, PrivacyEngine
from dpspeed.integrations.opacus import translate


def test_opacus_arguments_map_to_dpspeeds():
    assert translate({"clipping": "flat"}, "auto", "layer-wise") == ("auto", "all-layer")
    assert translate({"clipping": "per_layer"}, "auto", "all-layer") == ("auto", "param-wise")
    assert translate({"grad_sample_mode": "ghost"}, "auto", "all-layer") == ("ghost", "all-layer")
    for mode in ("hooks", "functorch", "ew"):
        assert translate({"grad_sample_mode": mode}, "bk", "all-layer") == ("bk", "all-layer")
    assert translate({"batch_first": True, "wrap_model": False, "rand_on_empty": True}, "auto", "all-layer") == (
        "auto", "all-layer")


@pytest.mark.parametrize("options,error,match", [
    ({"clipping": "adaptive"}, ValueError, "adaptive clipping"),
    ({"grad_sample_mode": "ghost_fsdp"}, ValueError, "no dpspeed equivalent"),
    ({"batch_first": False}, ValueError, "dimension 0"),
    ({"clip_per_sample": True}, TypeError, "clip_per_sample"),
])
def test_opacus_options_dpspeed_lacks_are_refused_by_name(options, error, match):
    with pytest.raises(error, match=match):
        translate(options, "auto", "all-layer")


def _private(engine: PrivacyEngine, **options):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    loader = DataLoader(TensorDataset(torch.randn(64, 4), torch.randint(0, 3, (64,))), batch_size=16)
    return engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
                               noise_multiplier=1.0, max_grad_norm=2.0, **options)


def test_make_private_takes_opacus_arguments_and_exposes_what_opacus_code_reads():
    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, loader = _private(engine, clipping="per_layer", grad_sample_mode="hooks", wrap_model=False)
    assert engine.clipping.grouping.groups == [["weight"], ["bias"]]
    assert optimizer.max_grad_norm == pytest.approx(2.0) and optimizer.expected_batch_size == 16
    assert loader.batch_size == 16 and loader.sample_rate == pytest.approx(0.25)
    for x, y in loader:
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    epsilon, order = engine.accountant.get_privacy_spent(delta=1e-5)
    assert epsilon == pytest.approx(engine.get_epsilon(1e-5)) and order > 1 and len(engine.accountant) == 4
    assert PrivacyEngine().accountant.get_privacy_spent(1e-5)[1] is None  # PLD has no order


def test_batch_memory_manager_caps_physical_batches_and_steps_once_per_logical_batch():
    engine = PrivacyEngine()
    model, optimizer, loader = _private(engine, poisson_sampling=False)
    rows, steps = [], 0
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=5, optimizer=optimizer) as physical:
        for x, y in physical:
            rows.append(len(x))
            nn.functional.cross_entropy(model(x), y).backward()
            steps += optimizer.is_last_physical_batch
            optimizer.step()
            optimizer.zero_grad()
    assert max(rows) == 5 and sum(rows) == 64 and steps == 4 == optimizer.logical_steps
    assert loader.batches.max_size is None  # restored on exit
    with pytest.raises(TypeError, match="the data loader make_private returned"):
        BatchMemoryManager(data_loader=DataLoader(range(4)), max_physical_batch_size=2, optimizer=optimizer)


def test_module_validator_is_validate_and_fix_model(caplog):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    assert not ModuleValidator.is_valid(model) and "BatchNorm2d" in ModuleValidator.validate(model)[0]
    with pytest.raises(ValueError, match="BatchNorm2d"):
        ModuleValidator.validate(model, strict=True)
    with caplog.at_level(logging.INFO):
        fixed = ModuleValidator.fix(model)
    assert isinstance(fixed[1], nn.GroupNorm) and ModuleValidator.validate(fixed) == []


def test_make_private_on_the_loader_it_returned_uses_the_users_loader():
    """A script (or notebook cell) run a second time passes the loader make_private returned."""
    engine = PrivacyEngine()
    _, _, loader = _private(engine)
    model = nn.Linear(4, 3)
    again = PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                         data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0)[2]
    assert again.source is loader.source and again.batch_size == 16


def test_per_layer_thresholds_follow_the_optimizers_parameter_order():
    """Opacus lists them in the optimizer's order (weights, then biases, with a weight-decay split);
    dpspeed's param-wise groups follow the model's: each threshold reaches its own parameter."""
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    weights, biases = [model[0].weight, model[2].weight], [model[0].bias, model[2].bias]
    optimizer = torch.optim.SGD([{"params": weights, "weight_decay": 1e-4}, {"params": biases}], lr=0.1)
    loader = DataLoader(TensorDataset(torch.randn(16, 4), torch.randint(0, 3, (16,))), batch_size=8)
    engine = PrivacyEngine()
    engine.make_private(module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0,
                        max_grad_norm=[1.0, 2.0, 3.0, 4.0], clipping="per_layer")
    thresholds = dict(zip((g[0] for g in engine.clipping.grouping.groups), engine.clipping.grouping.thresholds))
    assert thresholds == {"0.weight": 1.0, "2.weight": 2.0, "0.bias": 3.0, "2.bias": 4.0}

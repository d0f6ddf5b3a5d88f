"""Accounting: epsilon from dp-accounting for the steps taken, calibration to a target, checkpoints,
and a warning when the batches were not Poisson."""

from __future__ import annotations

import warnings

import dp_accounting
import pytest
import torch
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpspeed import PrivacyEngine
from dpspeed.accounting import PLD_DISCRETIZATION, epsilon_at, noise_for_epsilon
from tests.helpers.engines import private_linear


@pytest.mark.parametrize("kind", ["pld", "rdp"])
def test_epsilon_matches_dp_accounting(kind):
    engine = PrivacyEngine(accountant=kind)
    for _ in range(30):
        engine.accountant.step(1.1, 0.01)
    for _ in range(20):
        engine.accountant.step(0.9, 0.02)
    grid = {"value_discretization_interval": PLD_DISCRETIZATION}
    acc = pld_privacy_accountant.PLDAccountant(**grid) if kind == "pld" else rdp_privacy_accountant.RdpAccountant()
    finest = pld_privacy_accountant.PLDAccountant() if kind == "pld" else rdp_privacy_accountant.RdpAccountant()
    for sigma, q, steps in [(1.1, 0.01, 30), (0.9, 0.02, 20)]:
        event = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
                                                  steps)
        acc.compose(event)
        finest.compose(event)
    epsilon = engine.accountant.get_epsilon(1e-5)
    assert epsilon == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    # dpspeed's coarser PLD grid is pessimistic: an upper bound on dp-accounting's default, and close to it
    assert finest.get_epsilon(1e-5) <= epsilon <= finest.get_epsilon(1e-5) * 1.01


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
    """And, for a run made reproducible with seed=, its sampler's stream (the noise's: test_noise)."""
    engine, model, opt, loader = private_linear(seed=7)
    for x, y in loader:
        (model(x) - y).square().mean().backward()
        opt.step()
        opt.zero_grad()
    state = engine.state_dict()
    fresh, *_ = private_linear(seed=7)
    fresh.load_state_dict(state)
    assert fresh.get_epsilon(1e-5) == engine.get_epsilon(1e-5)
    assert fresh.data_loader.state_dict()["generator"].equal(engine.data_loader.state_dict()["generator"])


def test_no_epsilon_for_batches_that_were_not_poisson_sampled():
    engine, model, opt, loader = private_linear(poisson_sampling=False)
    engine.accountant.step(1.0, 0.25)
    with pytest.raises(ValueError, match="no epsilon for this run"):
        engine.get_epsilon(1e-5)


def test_a_resumed_optimizer_without_the_privacy_state_gets_no_epsilon():
    """Resuming model and optimizer but not the engine would restart epsilon from zero."""
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    data = DataLoader(TensorDataset(torch.randn(40, 3), torch.randn(40, 1)), batch_size=10)

    def private(engine):
        return engine.make_private(module=model, optimizer=optimizer, data_loader=data, noise_multiplier=1.0,
                                   max_grad_norm=1.0)

    first = PrivacyEngine()
    m, opt, loader = private(first)
    for x, y in loader:
        (m(x) - y).square().sum().backward()
        opt.step()
        opt.zero_grad()
    saved = first.state_dict()
    first.detach()
    resumed = PrivacyEngine()
    private(resumed)  # the same optimizer, with its momentum
    with pytest.raises(ValueError, match="privacy state was not restored"):
        resumed.get_epsilon(1e-5)
    resumed.load_state_dict(saved)
    assert resumed.get_epsilon(1e-5) == first.get_epsilon(1e-5)


def test_a_delta_of_at_least_one_over_n_is_warned_about():
    engine, model, opt, loader = private_linear(n=64)
    engine.accountant.step(1.0, 0.25)
    with pytest.warns(UserWarning, match="at least 1/N"):
        engine.get_epsilon(0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine.get_epsilon(1e-5)


@pytest.mark.parametrize("target", [0.0, -1.0, 1e4, float("inf"), float("nan")])
def test_calibration_refuses_targets_that_mean_nothing(target):
    with pytest.raises(ValueError, match="target_epsilon must be in"):
        noise_for_epsilon(target, 1e-5, 0.01, 100)


def test_calibration_reaches_a_tiny_target_where_rdp_is_far_looser_than_pld():
    sigma = noise_for_epsilon(1e-3, 1e-5, 0.01, 1000)
    assert epsilon_at("pld", sigma, 0.01, 1000, 1e-5) <= 1e-3 * 1.0001
    assert epsilon_at("pld", sigma * 0.99, 0.01, 1000, 1e-5) > 1e-3


def test_the_private_optimizers_checkpoint_carries_the_privacy_state():
    """A checkpoint of model and optimizer alone (plain SGD: no optimizer state of its own) resumes
    epsilon where it stopped; an optimizer state dict without the privacy state gets no epsilon."""
    model = nn.Linear(3, 1)
    data = DataLoader(TensorDataset(torch.randn(40, 3), torch.randn(40, 1)), batch_size=10)

    def private(engine, optimizer):
        return engine.make_private(module=model, optimizer=optimizer, data_loader=data, noise_multiplier=1.0,
                                   max_grad_norm=1.0)

    first = PrivacyEngine()
    m, opt, loader = private(first, torch.optim.SGD(model.parameters(), lr=0.1))
    for x, y in loader:
        (m(x) - y).square().sum().backward()
        opt.step()
        opt.zero_grad()
    checkpoint = opt.state_dict()
    assert checkpoint["dpspeed"]["logical_steps"] == first.accountant.steps > 0
    first.detach()

    resumed = PrivacyEngine()
    _, opt, _ = private(resumed, torch.optim.SGD(model.parameters(), lr=0.1))
    assert resumed.get_epsilon(1e-5) == 0
    opt.load_state_dict(checkpoint)
    assert resumed.get_epsilon(1e-5) == first.get_epsilon(1e-5)
    assert opt.param_groups is opt.original_optimizer.param_groups
    resumed.detach()

    early = PrivacyEngine()  # the checkpoint loaded into the torch optimizer, before make_private
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    plain.load_state_dict(checkpoint)
    _, opt, _ = private(early, plain)
    with pytest.raises(ValueError, match="privacy state was not restored"):
        early.get_epsilon(1e-5)
    opt.load_state_dict(checkpoint)
    assert early.get_epsilon(1e-5) == first.get_epsilon(1e-5)
    early.detach()

    foreign = PrivacyEngine()
    _, opt, _ = private(foreign, torch.optim.SGD(model.parameters(), lr=0.1))
    opt.load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())
    with pytest.raises(ValueError, match="privacy state was not restored"):
        foreign.get_epsilon(1e-5)
    foreign.detach()


def _budgeted(max_epsilon: float, **options):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    loader = DataLoader(TensorDataset(torch.randn(40, 4), torch.randint(0, 2, (40,))), batch_size=10)
    engine = PrivacyEngine()
    return engine, *engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                        data_loader=loader, noise_multiplier=3.0, max_grad_norm=1.0,
                                        max_epsilon=max_epsilon, delta=1e-5, **options)


def test_max_epsilon_stops_before_the_step_that_would_exceed_it(monkeypatch):
    from dpspeed import accounting
    from dpspeed.accounting import BudgetExhausted

    computed = []
    original = accounting.Accountant.get_epsilon
    monkeypatch.setattr(accounting.Accountant, "get_epsilon", lambda self, d: computed.append(1) or original(self, d))
    engine, model, optimizer, loader = _budgeted(2.0)
    with pytest.raises(BudgetExhausted, match=r"before step \d+: it would spend more than max_epsilon = 2"):
        for _ in range(100):
            for x, y in loader:
                nn.functional.cross_entropy(model(x), y).backward()
                before = [p.detach().clone() for p in model.parameters()]
                optimizer.step()
                optimizer.zero_grad()
    taken = engine.accountant.steps
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))  # the refused step released nothing
    assert epsilon_at("pld", 3.0, 0.25, taken, 1e-5) <= 2.0 < epsilon_at("pld", 3.0, 0.25, taken + 1, 1e-5)
    assert taken > 20 and len(computed) <= 4 * taken.bit_length() + 4  # O(log K), not one per step


@pytest.mark.parametrize("options,match", [({"delta": None}, "together"), ({"poisson_sampling": False}, "Poisson")])
def test_max_epsilon_arguments_are_checked_before_anything_is_attached(options, match):
    model = nn.Linear(4, 2)
    loader = DataLoader(TensorDataset(torch.randn(40, 4), torch.randint(0, 2, (40,))), batch_size=10)
    with pytest.raises(ValueError, match=match):
        PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                     data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0, max_epsilon=2.0,
                                     **{"delta": 1e-5, **options})
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_epsilon_after_every_step_equals_composing_the_whole_history():
    """The accountant extends its kept distribution by the steps taken since the last query."""
    from dpspeed.accounting import Accountant

    kept = Accountant("pld")
    for step in range(40):
        kept.step(1.2 if step < 25 else 0.9, 0.05)
        if step % 7 == 0 or step >= 38:
            fresh = Accountant("pld")
            fresh.history = [list(run) for run in kept.history]
            assert kept.get_epsilon(1e-5) == pytest.approx(fresh.get_epsilon(1e-5), rel=1e-9)
    reference = pld_privacy_accountant.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    for sigma, rate, steps in kept.history:
        reference.compose(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(sigma)), steps))
    assert kept.get_epsilon(1e-5) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
    kept.load_state_dict({"kind": "pld", "history": [[2.0, 0.01, 3]]})  # not an extension: composed afresh
    assert kept.get_epsilon(1e-5) == pytest.approx(epsilon_at("pld", 2.0, 0.01, 3, 1e-5), rel=1e-9)


def test_steps_without_noise_give_infinite_epsilon():
    from dpspeed.accounting import Accountant

    accountant = Accountant("pld")
    accountant.step(1.0, 0.1)
    accountant.step(0.0, 0.1)
    assert accountant.get_epsilon(1e-5) == float("inf")


def test_max_epsilon_is_checked_again_when_the_history_is_replaced():
    """A checkpoint loaded after training started brings a history the guard's horizon never saw."""
    from dpspeed.accounting import BudgetExhausted

    engine, model, optimizer, loader = _budgeted(3.0)
    for x, y in loader:
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    engine.accountant.load_state_dict({"kind": "pld", "history": [[0.5, 0.25, 3]]})  # few steps, far over budget
    with pytest.raises(BudgetExhausted):
        for x, y in loader:
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()


def test_a_refused_two_pass_step_leaves_no_gradient_behind():
    from dpspeed.accounting import BudgetExhausted

    engine, model, optimizer, criterion, loader = _budgeted(0.01, criterion=nn.CrossEntropyLoss(),
                                                            clipping_mode="ghost")
    with pytest.raises(BudgetExhausted):
        for x, y in loader:
            criterion(model(x), y).backward()
            optimizer.step()
    assert all(p.grad is None for p in model.parameters())


def test_calibration_after_steps_already_spent_reaches_the_target_over_the_whole_run():
    spent = [[1.2, 0.25, 4]]
    sigma = noise_for_epsilon(3.0, 1e-3, 0.25, 6, spent=spent)
    assert 2.99 < epsilon_at("pld", sigma, 0.25, 6, 1e-3, spent) <= 3.0 * 1.0001
    assert epsilon_at("pld", sigma * 0.99, 0.25, 6, 1e-3, spent) > 3.0
    with pytest.raises(ValueError, match="already spent"):
        noise_for_epsilon(1.0, 1e-3, 0.25, 6, spent=spent)


def _calibrated_run(epochs: int, state: dict | None = None, load_first: bool = False) -> PrivacyEngine:
    """make_private_with_epsilon for `epochs` (after the run `state` was saved from, loaded before
    or after it), then its steps."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    data = DataLoader(TensorDataset(torch.randn(40, 3), torch.randn(40, 1)), batch_size=10)
    engine = PrivacyEngine()
    if state is not None and load_first:
        engine.load_state_dict(state)
    m, opt, loader = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=data, target_epsilon=3.0,
        target_delta=1e-3, epochs=epochs, max_grad_norm=1.0)
    if state is not None and not load_first:
        engine.load_state_dict(state)
    while engine.accountant.steps < epochs * len(data):
        for x, y in loader:
            (m(x) - y).square().sum().backward()
            opt.step()
            opt.zero_grad()
            if engine.accountant.steps == epochs * len(data):
                break
    return engine


@pytest.mark.parametrize("load_first", [False, True], ids=["loaded-after", "loaded-before"])
def test_a_run_resumed_with_a_longer_horizon_ends_within_its_target(load_first):
    """The noise was calibrated for the whole horizon as if no step had been taken: "one more
    epoch" resumed from a checkpoint ended at epsilon 3.6 for a target of 3 (whether the state was
    loaded after make_private_with_epsilon or before it)."""
    first = _calibrated_run(epochs=1)
    resumed = _calibrated_run(epochs=2, state=first.state_dict(), load_first=load_first)
    assert resumed.accountant.steps == 8
    assert resumed.noise_multiplier > first.noise_multiplier
    assert 2.97 < resumed.get_epsilon(1e-3) <= 3.0 * 1.0001
    same_horizon = _calibrated_run(epochs=1, state={**first.state_dict(), "accountant": {
        "kind": "pld", "history": [[first.noise_multiplier, 0.25, 2]]}, "logical_steps": 2})
    assert same_horizon.accountant.history == [[first.noise_multiplier, 0.25, 4]]  # the noise kept as it was


def test_a_horizon_the_restored_run_already_reached_is_refused():
    first = _calibrated_run(epochs=1)
    with pytest.raises(ValueError, match="already holds 4 steps .*, and the horizon is 4"):
        _calibrated_run(epochs=1, state=first.state_dict(), load_first=True)


def test_an_explicit_noise_multiplier_is_not_recalibrated_for_an_earlier_target():
    """An engine once made private with make_private_with_epsilon, detached and attached again with
    noise_multiplier=0.4: load_state_dict rewrote the 0.4 for the first call's target."""
    data = DataLoader(TensorDataset(torch.randn(40, 3), torch.randn(40, 1)), batch_size=10)
    engine = PrivacyEngine()
    first = nn.Linear(3, 1)
    engine.make_private_with_epsilon(module=first, optimizer=torch.optim.SGD(first.parameters(), lr=0.1),
                                     data_loader=data, target_epsilon=3.0, target_delta=1e-3, epochs=1,
                                     max_grad_norm=1.0)
    engine.detach()
    second = nn.Linear(3, 1)
    _, optimizer, _ = engine.make_private(module=second, optimizer=torch.optim.SGD(second.parameters(), lr=0.1),
                                          data_loader=data, noise_multiplier=0.4, max_grad_norm=1.0)
    engine.load_state_dict({"accountant": {"kind": "pld", "history": [[2.0, 0.25, 2]]}, "logical_steps": 2})
    assert optimizer.noise_multiplier == 0.4


@pytest.mark.parametrize("load_first", [False, True], ids=["loaded-after", "loaded-before"])
def test_a_seeded_state_loaded_before_make_private_continues_its_streams(load_first):
    """Loaded before make_private_with_epsilon, a seeded run's state gave only its accountant: its
    step count and its random streams were dropped, so the resumed run drew the same Poisson
    batches and the same noise as its first steps (the difference of two updates cancels it)."""
    data = TensorDataset(torch.randn(32, 3), torch.randint(0, 2, (32,)))

    def private(engine: PrivacyEngine, epochs: int):
        torch.manual_seed(0)
        model = nn.Linear(3, 2)
        return engine.make_private_with_epsilon(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(data, batch_size=8), target_epsilon=3.0, target_delta=1e-3, epochs=epochs,
            max_grad_norm=1.0, seed=7)

    first = PrivacyEngine()
    model, optimizer, loader = private(first, epochs=1)
    drawn = []
    for x, y in loader:
        drawn.append(x.clone())
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    state = first.state_dict()
    resumed = PrivacyEngine()
    if load_first:
        resumed.load_state_dict(state)
    model, optimizer, loader = private(resumed, epochs=2)
    if not load_first:
        resumed.load_state_dict(state)
    assert optimizer.logical_steps == 4
    cpu = torch.device("cpu")
    continued, saved = ([g.get_state() for g in e.optimizer.noise.generators_for(cpu)] for e in (resumed, first))
    assert len(continued) == len(saved) > 1 and all(torch.equal(a, b) for a, b in zip(continued, saved))
    assert not torch.equal(next(iter(loader))[0], drawn[0])


def test_a_state_loaded_after_detach_waits_for_the_next_make_private():
    """After detach the engine still had its old optimizer: the state went into it, and the next
    make_private started at step 0 with the seed's first streams again."""
    data = TensorDataset(torch.randn(32, 3), torch.randint(0, 2, (32,)))
    engine, model = PrivacyEngine(), nn.Linear(3, 2)
    _, optimizer, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                               data_loader=DataLoader(data, batch_size=8), noise_multiplier=1.0,
                                               max_grad_norm=1.0, seed=7)
    first_batch = None
    for x, y in loader:
        first_batch = x.clone() if first_batch is None else first_batch
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    state = engine.state_dict()
    engine.detach()
    engine.load_state_dict(state)
    model = nn.Linear(3, 2)
    _, optimizer, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                               data_loader=DataLoader(data, batch_size=8), noise_multiplier=1.0,
                                               max_grad_norm=1.0, seed=7)
    assert optimizer.logical_steps == 4
    assert not torch.equal(next(iter(loader))[0], first_batch)

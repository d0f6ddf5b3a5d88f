"""The private optimizer's phases: physical batches accumulate until the last one of a logical batch,
sums survive zero_grad, padding rows are left out, the mean is taken over the expected batch size,
and the user's optimizer steps once per logical batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpspeed import PrivacyEngine

X = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))


def _private(reduction: str = "sum"):
    """Per-example gradients x_i of a bias-free Linear(3, 1) under loss = output.sum(); no clipping
    (R far above every norm), no noise."""
    model = nn.Linear(3, 1, bias=False)
    loader = DataLoader(TensorDataset(torch.zeros(8, 3)), batch_size=4)
    model, optimizer, _ = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), data_loader=loader,
        noise_multiplier=0.0, max_grad_norm=1e6, loss_reduction=reduction, clipping_mode="bk", poisson_sampling=False)
    return model, optimizer


def _backward(model: nn.Module, x: torch.Tensor, reduction: str = "sum") -> None:
    out = model(x)
    (out.sum() if reduction == "sum" else out.sum() / len(x)).backward()


def test_physical_batches_accumulate_until_the_last_one():
    model, optimizer = _private()
    steps = []
    optimizer.on_logical_step(lambda: steps.append(optimizer.logical_steps))
    optimizer.begin_physical_batch(last=False)
    _backward(model, X[:2])
    optimizer.step()
    optimizer.zero_grad()
    assert model.weight.grad is None and steps == [] and set(optimizer.summed) == {"weight"}
    optimizer.begin_physical_batch(last=True)
    _backward(model, X[2:])
    optimizer.step()
    assert steps == [1] and optimizer.summed == {}
    assert torch.allclose(model.weight.grad, X.sum(0, keepdim=True))


def test_a_mean_is_taken_over_the_expected_batch_size():
    model, optimizer = _private("mean")
    optimizer.begin_physical_batch(last=True)
    _backward(model, X[:2], "mean")  # 2 examples drawn where 4 were expected
    optimizer.step()
    assert torch.allclose(model.weight.grad, X[:2].sum(0, keepdim=True) / 4)


def test_padding_rows_contribute_nothing():
    model, optimizer = _private()
    optimizer.begin_physical_batch(last=True, row_mask=torch.tensor([True, False, True, False]))
    _backward(model, X)
    optimizer.step()
    assert torch.allclose(model.weight.grad, (X[0] + X[2]).unsqueeze(0))


def test_a_discarded_logical_batch_leaves_nothing_behind():
    model, optimizer = _private()
    optimizer.begin_physical_batch(last=False)
    _backward(model, X)
    optimizer.step()
    optimizer.discard_logical_batch()
    optimizer.begin_physical_batch(last=True)
    _backward(model, X[:1])
    optimizer.step()
    assert torch.allclose(model.weight.grad, X[:1])


def test_parameter_groups_cannot_be_added_after_make_private():
    _, optimizer = _private()
    with pytest.raises(RuntimeError, match="before make_private"):
        optimizer.add_param_group({"params": [nn.Parameter(torch.zeros(1))]})


def _loop(batch_size: int = 2, physical: int | None = None, n: int = 8):
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False)
    data = DataLoader(TensorDataset(torch.randn(n, 3)), batch_size=batch_size)
    engine = PrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), data_loader=data, noise_multiplier=0.0,
        max_grad_norm=1e6, loss_reduction="sum", clipping_mode="bk", poisson_sampling=False,
        max_physical_batch_size=physical)
    return engine, model, optimizer, loader, data


def test_a_step_on_a_batch_the_private_loader_did_not_yield_is_refused():
    """Training on the loader passed to make_private: no Poisson sampling, yet epsilon would claim it."""
    engine, model, optimizer, loader, original = _loop()
    for (x,) in original:
        model(x).sum().backward()
        with pytest.raises(RuntimeError, match="did not yield"):
            optimizer.step()
        break


def test_physical_batches_of_separate_logical_batches_cannot_be_merged():
    """Stepping every other batch would take 2 batches per accounted step."""
    engine, model, optimizer, loader, _ = _loop()
    batches = iter(loader)
    (x,) = next(batches)
    model(x).sum().backward()  # no step
    with pytest.raises(RuntimeError, match="previous physical batch was not stepped"):
        next(batches)


def test_a_loop_broken_off_drops_its_unfinished_logical_batch(caplog):
    """Physical batches of 2 in logical batches of 4: a pass broken off after one physical batch
    leaves half a logical batch, which must not reach the next step."""
    engine, model, optimizer, loader, _ = _loop(batch_size=4, physical=2)
    for (x,) in loader:
        model(x).sum().backward()
        optimizer.step()
        break
    assert optimizer.summed  # half a logical batch
    with caplog.at_level("WARNING", logger="dpspeed"):
        batches = []
        for (x,) in loader:
            model(x).sum().backward()
            optimizer.step()
            batches.append(x)
            if optimizer.is_last_physical_batch:
                break
    assert "left unfinished" in caplog.text
    assert torch.allclose(model.weight.grad, torch.cat(batches).sum(0, keepdim=True))  # these examples only
    assert engine.accountant.steps == 1


def test_a_second_backward_through_one_forward_is_refused():
    engine, model, optimizer, loader, _ = _loop()
    (x,) = next(iter(loader))
    loss = model(x).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward pass"):
        loss.backward()


def test_a_forward_after_a_backward_in_one_physical_batch_is_refused():
    engine, model, optimizer, loader, _ = _loop()
    (x,) = next(iter(loader))
    model(x).sum().backward()
    with pytest.raises(RuntimeError, match="forward pass after a backward pass"):
        model(x)


def test_whole_batch_and_partial_passes_cannot_be_mixed_in_one_step():
    engine, model, optimizer, loader, _ = _loop(batch_size=4)
    (x,) = next(iter(loader))
    model(x)
    with pytest.raises(RuntimeError, match=r"over all of a physical batch \(4 rows\) and over part of it \(2 rows\)"):
        model(x[:2])


def test_a_part_then_the_whole_batch_names_the_parts_rows():
    engine, model, optimizer, loader, _ = _loop(batch_size=4)
    (x,) = next(iter(loader))
    model(x[:3])
    with pytest.raises(RuntimeError, match=r"over all of a physical batch \(4 rows\) and over part of it \(3 rows\)"):
        model(x)


@pytest.mark.parametrize("zero_grad_first", [False, True])
def test_a_loop_over_the_examples_of_a_batch_clips_each_on_its_own(zero_grad_first):
    """One forward pass per example (variable-length inputs), one backward of the summed losses:
    every example is its own, clipped to R by itself, not merged with the others as views."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False)
    data = DataLoader(TensorDataset(torch.randn(3, 3) * 10), batch_size=3)
    model, optimizer, loader = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), data_loader=data, noise_multiplier=0.0,
        max_grad_norm=1.0, loss_reduction="sum", clipping_mode="bk", poisson_sampling=False)
    (x,) = next(iter(loader))
    if zero_grad_first:
        optimizer.zero_grad()
    sum(model(x[i : i + 1]).sum() for i in range(3)).backward()
    optimizer.step()
    want = sum(x[i] / x[i].norm() for i in range(3))  # each example's gradient x_i, clipped to norm 1
    assert torch.allclose(model.weight.grad.flatten(), want, atol=1e-5)


@pytest.mark.parametrize("mode", ["auto", "per-example", "ghost", "mix-ghost", "bk", "bk-mix-ghost", "bk-mix-opt"])
def test_zero_grad_between_forward_and_backward_keeps_the_batch(mode):
    """Valid PyTorch (and Lightning's order): forward, zero_grad, backward, step. The batch was dropped
    silently (a step of nothing); it must give what zero_grad before the forward gives."""

    def step(zero_grad_between: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        data = DataLoader(TensorDataset(torch.randn(6, 3) * 10, torch.tensor([0, 1, 0, 1, 1, 0])), batch_size=6)
        model, optimizer, criterion, loader = PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), data_loader=data,
            criterion=nn.CrossEntropyLoss(), noise_multiplier=0.0, max_grad_norm=0.1, clipping_mode=mode,
            poisson_sampling=False)
        x, y = next(iter(loader))
        if not zero_grad_between:
            optimizer.zero_grad()
        loss = criterion(model(x), y)
        if zero_grad_between:
            optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    expected = step(zero_grad_between=False)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(step(zero_grad_between=True), expected)


def _probe_then_train(backward_through_probe: bool) -> torch.Tensor:
    """In each step a pass outside torch.no_grad (a probe on other rows), zero_grad, then the training pass."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    data = DataLoader(TensorDataset(torch.randn(12, 3) * 10, torch.tensor([0, 1, 0, 1, 1, 0] * 2)), batch_size=6)
    model, optimizer, loader = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), data_loader=data, noise_multiplier=0.0,
        max_grad_norm=0.1, clipping_mode="bk", poisson_sampling=False)
    for x, y in loader:
        probe = model(torch.randn(4, 3)).sum()
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        (loss + probe if backward_through_probe else loss).backward()
        optimizer.step()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_a_pass_kept_by_zero_grad_is_dropped_when_another_pass_begins():
    """zero_grad keeps a pass for its backward; a probe pass (no torch.no_grad) never gets one: it
    was merged with the training pass, or refused as a part beside the whole batch."""
    assert _probe_then_train(backward_through_probe=False).abs().sum() > 0
    with pytest.raises(RuntimeError, match="made before optimizer.zero_grad"):
        _probe_then_train(backward_through_probe=True)

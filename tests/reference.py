"""The reference every clipping path is checked against: one example at a time, plain autograd."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpspeed import PrivacyEngine

LossFn = Callable[[nn.Module, tuple], torch.Tensor]


def reference_groups(style, names: list[str]) -> list[list[str]]:
    """Groups as the issue defines them, written independently of dpspeed.grouping."""
    if style == "all-layer":
        return [names]
    if style == "param-wise":
        return [[n] for n in names]
    if style == "layer-wise":
        owners: dict[str, list[str]] = {}
        for n in names:
            owners.setdefault(n.rpartition(".")[0], []).append(n)
        return list(owners.values())
    if isinstance(style, list):
        return style
    raise ValueError(style)


def clip_factor(norm: float, threshold: float, fn: str) -> float:
    if fn == "abadi":
        return min(1.0, threshold / (norm + 1e-6))
    return threshold / (norm + 0.01)


def per_example_grads(model: nn.Module, loss_fn: LossFn, examples: list[tuple]) -> list[dict[str, torch.Tensor]]:
    """Each example's gradient: forward and backward of that example alone."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out = []
    for example in examples:
        grads = torch.autograd.grad(loss_fn(model, example), list(params.values()), allow_unused=True)
        out.append({n: torch.zeros_like(p).detach() if g is None else g.detach() for (n, p), g in zip(params.items(), grads)})
    return out


def reference_sum(per_example: list[dict[str, torch.Tensor]], groups: list[list[str]], thresholds: list[float],
                  fn: str) -> dict[str, torch.Tensor]:
    """sum_i of each example's gradient, clipped per group."""
    total = {n: torch.zeros_like(g) for n, g in per_example[0].items()}
    for grads in per_example:
        for group, r in zip(groups, thresholds):
            norm = math.sqrt(sum(float(grads[n].double().square().sum()) for n in group))
            c = clip_factor(norm, r, fn)
            for n in group:
                total[n] += c * grads[n]
    return total


def private_grads(model: nn.Module, loss_fn: LossFn | None, tensors: tuple[torch.Tensor, ...], *, max_grad_norm=1.0,
                  physical: int | None = None, forward=None, **options) -> tuple[dict[str, torch.Tensor], PrivacyEngine]:
    """The gradient dpspeed hands the optimizer after one logical batch of all `tensors`, sigma = 0.
    Without `loss_fn`, the criterion make_private returns is applied to forward(model, inputs)."""
    loader = DataLoader(TensorDataset(*tensors), batch_size=len(tensors[0]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = PrivacyEngine()
    private = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=0.0,
        max_grad_norm=max_grad_norm, max_physical_batch_size=physical, poisson_sampling=False, **options,
    )
    if loss_fn is None:
        model, optimizer, criterion, loader = private
        loss_fn = lambda m, b: criterion((forward or (lambda m_, x: m_(x)))(m, b[0]), b[1])
    else:
        model, optimizer, loader = private
    grads = None
    for batch in loader:
        loss_fn(model, tuple(batch)).backward()
        optimizer.step()
        if optimizer.is_last_physical_batch:
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        optimizer.zero_grad()
    return grads, engine


def assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rtol: float) -> None:
    assert set(got) == set(want), (sorted(got), sorted(want))
    flat_got = torch.cat([got[n].double().flatten() for n in want])
    flat_want = torch.cat([want[n].double().flatten() for n in want])
    err = float((flat_got - flat_want).detach().norm() / flat_want.norm().clamp_min(1e-30))
    worst = max(want, key=lambda n: float((got[n].double() - want[n].double()).norm() / want[n].double().norm().clamp_min(1e-30)))
    assert err <= rtol, f"relative error {err:.3g} > {rtol} (worst parameter: {worst})"

"""Ghost clipping (Li et al. 2022) and mixed ghost clipping (Bu et al. 2022): two backward passes.

The first pass runs back to the recorded layer outputs only (no weight gradients) and gives each
example's gradient norm, by the ghost trick or, per layer in `mix-ghost`, from explicit gradients.
The second pass backpropagates the loss reweighted by the clipping factors, sum_i C_i L_i, whose
ordinary weight gradients are the clipped sum. One factor per example: all-layer clipping only.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .clipper import clip_factors, release
from .sections import section

TWO_PASS_MODES = ("ghost", "mix-ghost")


def per_example_losses(criterion: nn.Module, reduction: str):
    """The criterion with reduction='none', reduced over each example's own elements (tokens)."""
    unreduced = copy.copy(criterion)
    unreduced.reduction = "none"

    def losses(*args, **kwargs) -> torch.Tensor:
        values = unreduced(*args, **kwargs)
        if values.dim() > 1:
            values = values.flatten(1)
            values = values.mean(1) if reduction == "mean" else values.sum(1)
        return values

    return losses


class DPLoss:
    """The criterion make_private returns for the two-pass modes: `criterion(output, target)` gives a
    loss whose `backward()` makes both passes."""

    def __init__(self, criterion: nn.Module, optimizer, loss_reduction: str):
        if not hasattr(criterion, "reduction"):
            raise ValueError("ghost clipping needs a criterion with a `reduction` attribute (torch's losses have one)")
        self.criterion = criterion
        self.losses = per_example_losses(criterion, loss_reduction)
        self.optimizer = optimizer
        self.loss_reduction = loss_reduction

    def __call__(self, *args, **kwargs) -> "DPLossValue":
        return DPLossValue(self.losses(*args, **kwargs), self)


class DPLossValue:
    """The reduced loss (for logging: item(), float()) and the two-pass backward."""

    def __init__(self, per_example: torch.Tensor, loss: DPLoss):
        self.per_example = per_example
        self.loss = loss
        reduced = per_example.sum()
        self.value = reduced / max(len(per_example), 1) if loss.loss_reduction == "mean" else reduced

    def item(self) -> float:
        return float(self.value.detach())

    def __float__(self) -> float:
        return self.item()

    def detach(self) -> torch.Tensor:
        return self.value.detach()

    def __repr__(self) -> str:
        return f"DPLossValue({self.item():.6g})"

    def backward(self) -> None:
        optimizer = self.loss.optimizer
        controller = optimizer.controller
        tapped = controller.take_tapped()
        passes = controller.take_passes_now()
        total = self.per_example.sum()
        if tapped:
            torch.autograd.grad(total, tapped, retain_graph=True, allow_unused=True)  # first pass: norms only
        factors = None
        for recorded in passes:
            with section("norms"):
                pf = clip_factors(recorded, optimizer.grouping, optimizer.clip_fn, "sum", optimizer.choose, optimizer.row_mask)
            release(recorded)
            if pf is not None:
                factors = pf.factors[0]
                optimizer.note_nonfinite(pf.nonfinite)
        if factors is None:
            factors = torch.zeros_like(self.per_example)
        weighted = torch.where(factors > 0, factors.to(self.per_example.dtype) * self.per_example, 0.0)
        weighted.sum().backward()  # second pass: autograd's weight gradients are the clipped sum

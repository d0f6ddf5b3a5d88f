"""Ghost clipping (Li et al. 2022) and mixed ghost clipping (Bu et al. 2022): two backward passes.

The first pass runs back to the recorded layer outputs only (no weight gradients) and gives each
example's gradient norm, by the ghost trick or, per layer in `mix-ghost`, from explicit gradients.
The second pass backpropagates the loss reweighted by the clipping factors, sum_i C_i L_i, whose
ordinary weight gradients are the clipped sum. One factor per example: all-layer clipping only.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..layers.precision import to_acc
from ..profiling import section
from .pipeline import Sums, clip_factors, release

if TYPE_CHECKING:
    from ..optimizer import DPOptimizer


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


def autograd_sums(params: dict[str, nn.Parameter]) -> Sums:
    """The clipped sums the second pass left in the parameters' .grad (taken out of them)."""
    sums = {}
    for name, p in params.items():
        if p.grad is not None:
            sums[name] = to_acc(p.grad)
            p.grad = None
    return sums


class DPLoss:
    """The criterion make_private returns for the two-pass modes: `criterion(output, target)` gives a
    loss whose `backward()` makes both passes."""

    def __init__(self, criterion: nn.Module, optimizer: DPOptimizer):
        if not hasattr(criterion, "reduction"):
            raise ValueError("ghost clipping needs a criterion with a `reduction` attribute (torch's losses have one)")
        self.criterion = criterion
        self.optimizer = optimizer
        self.loss_reduction = optimizer.clipping.loss_reduction
        self.losses = per_example_losses(criterion, self.loss_reduction)

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

    def _factors(self) -> torch.Tensor:
        """First pass: back to the recorded outputs only; each example's clipping factor."""
        optimizer = self.loss.optimizer
        controller = optimizer.controller
        taken_before = controller.recordings_taken
        tapped, recordings = controller.take_tapped(), controller.take_recordings_now()
        if not recordings and taken_before:
            raise RuntimeError(
                "a second backward pass through the same forward pass: its examples were clipped by the first one, "
                "and would count twice. Put every term of the loss into the per-example losses of the criterion "
                "make_private returned (a criterion module of your own, with a `reduction`), call backward() once, "
                "then optimizer.step()")
        if not recordings:
            raise RuntimeError(
                "the loss's forward pass recorded nothing: it ran without dpspeed's hooks (another copy of the "
                "model, or a call that bypasses module hooks, such as model.forward(x) instead of model(x)), so no "
                "example could be clipped. Compute the loss from the model make_private returned")
        if any(t.dtype in (torch.bfloat16, torch.float16) for t in tapped):
            raise ValueError(
                "ghost and mix-ghost take the clipped sum from autograd's weight gradients, which 16-bit autocast "
                "rounds to 16 bits over the whole batch: one example could move that rounding by about "
                "batch_size / 256 · max_grad_norm. Use a one-pass mode (bk, auto) under bf16 or fp16 autocast"
            )
        if tapped:
            torch.autograd.grad(self.per_example.sum(), tapped, retain_graph=True, allow_unused=True)
        config = optimizer.clipping.of_unreduced_losses()
        with section("norms"):
            computed = [clip_factors(recorded, config, optimizer.row_mask) for recorded in recordings]
        if any(pf is not None and pf.nonfinite for pf in computed):
            # autograd would multiply a non-finite example's activations by its zero factor (NaN):
            # this batch's clipped sums come by book-keeping instead, without that example
            for recorded in recordings:
                optimizer.clip_and_add(recorded, config)
            return None
        factors = None
        for recorded, pf in zip(recordings, computed):
            release(recorded)
            if pf is not None:
                factors = pf.factors[0]
        return torch.zeros_like(self.per_example) if factors is None else factors

    def backward(self) -> None:
        optimizer = self.loss.optimizer
        optimizer.refuse_unclipped_gradients()  # another loss's backward through the model, before this one
        factors = self._factors()
        if factors is None:
            return  # the sums are in the optimizer already
        weighted = torch.where(factors > 0, factors.to(self.per_example.dtype) * self.per_example, 0.0)
        weighted.sum().backward()  # second pass: autograd's weight gradients are the clipped sum
        optimizer.grant_gradients()

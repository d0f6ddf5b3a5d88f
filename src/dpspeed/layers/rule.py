"""What a layer rule is: per-example gradients, ghost norms and clipped sums of one module type."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..capture.records import Call
from .precision import weighted_sum


class LayerRule:
    """Per-example gradient rule of one module type.

    `params` declares the parameters the rule covers, by their names inside the module; a child's
    parameter that the module uses in its own forward is named with a dot (`"out_proj.weight"`).
    A module whose used parameters are not all declared goes to a fallback rule instead.
    `names` are the parameters a method is asked about (the trainable ones among `params`).
    Every method receives the gradient of the *summed* loss; the engine scales for `mean`.
    """

    #: the parameters this rule computes gradients of, by name inside the module
    params: tuple[str, ...] = ("weight", "bias")
    #: whether `ghost_sq_norms` is implemented (norms without per-example gradients)
    ghost: bool = False
    #: whether the module's recorded forward calls run through `record_forward` (the rule needs
    #: tensors from inside the module: a recurrent layer's states), not a hook on its output
    records_inside: bool = False

    def declares(self, name: str) -> bool:
        """Whether the rule covers the parameter `name` (its name inside the module)."""
        return name in self.params

    def validate(self, module: nn.Module) -> None:
        """Raise ValueError if this module's configuration cannot be handled exactly."""

    def covers(self, module: nn.Module) -> bool:
        """Whether the rule handles this module's configuration; False sends the module to the
        fallback (which replays it exactly, if slowly) instead."""
        return True

    def record_forward(self, module: nn.Module, args: tuple, kwargs: dict,
                       tap: Callable[..., None]) -> object:
        """With `records_inside`: the module's output for `args`, `kwargs`, computed so that
        `tap(inputs, leaves, info=None)` is called once with the tensors the rule's methods read as
        the call's args, the intermediate tensors whose gradients they read (one row per example,
        each requiring grad), which come back as the call's output gradients in that order, and
        a dict of anything else they read, kept as the call's kwargs."""
        raise NotImplementedError

    def per_sample_grads(self, module: nn.Module, call: Call, names: list[str]) -> dict[str, torch.Tensor]:
        """Per-example gradients, name -> tensor of shape (B, *param.shape)."""
        raise NotImplementedError

    def shrink(self, module: nn.Module, call: Call, names: list[str]) -> None:
        """As soon as the call's output gradients have all arrived (one-pass modes), let it keep
        less until it is clipped, in a form the other methods read to the same results: an input
        cast to the compute dtype, or a norm layer's per-example gradients in place of its tensors
        (`Call.condense`). Nothing by default."""

    def ghost_sq_norms(self, module: nn.Module, call: Call, names: list[str]) -> dict[str, torch.Tensor]:
        """Squared per-example gradient norms without materialising the gradients, name -> (B,)."""
        raise NotImplementedError

    def gram_operands(self, module: nn.Module, call: Call, names: list[str]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Where the weight is among `names` and its ghost norm is one Gram inner product (a
        Linear's): its (B, T, d) and (B, T, p) operands. The pipeline computes the norms of all such
        layers of a pass together (`keep_gram_norms`) and keeps each in its call's cache, which
        `ghost_sq_norms` takes. None (the default): the rule computes its own."""
        return None

    def row_operands(self, module: nn.Module, call: Call, names: list[str]) -> dict[str, torch.Tensor]:
        """The parameters among `names` whose per-example gradient is a small tensor the rule forms
        anyway (a bias's, (B, p)), name -> that tensor. The pipeline takes the squared row norms
        and the clipped sums of those of a pass together (`squared_row_norms_together`,
        `weighted_sums_together`) and keeps each in its call's cache, which `ghost_sq_norms` and
        `clipped_sum` take (`kept_row_norm`, `kept_row_sum`). None by default (an empty dict)."""
        return {}

    def clipped_sum(
        self, module: nn.Module, call: Call, names: list[str], factors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """`sum_i factors[name][i] * g_i(name)`, without per-example gradients where possible."""
        grads = self.per_sample_grads(module, call, names)
        return {n: weighted_sum(factors[n], grads[n]) for n in names}

    def sum_rounding(self, module: nn.Module, call: Call, names: list[str]) -> dict[str, torch.Tensor]:
        """Per parameter and example, how far what `clipped_sum` adds for an example can exceed its
        factor times its gradient's norm, per unit of factor: rounding inside the sum, (B,) each.
        The clipping raises the example's norm by it, so that nothing it adds exceeds the
        threshold. None needed (the default) when the sum multiplies per-example gradients by
        their factors exactly (`weighted_sum`)."""
        return {}

    def costs(self, module: nn.Module, call: Call) -> tuple[float, float] | None:
        """(ghost cost, explicit cost) of the norm in multiply-adds per example, or None."""
        return None

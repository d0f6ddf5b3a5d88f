"""The clipping configuration of one private model: groups and thresholds, clip function, loss
reduction and the method chooser, made once from make_private's arguments and shared by every
stage that clips (the optimizer, early release, the two-pass loss)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from .functions import ClipFunction, clipping_function
from .groups import ClippingStyle, Grouping, make_grouping
from .methods import ALL_MODES, MODES, TWO_PASS_MODES, Chooser, FixedRule
from .planner import Planner


def method_chooser(mode: str, memory_budget: int | None = None) -> Chooser:
    """The chooser of a clipping mode: the `auto` planner, or one rule for every layer."""
    if mode == "auto":
        return Planner(memory_budget)
    rule = MODES.get(mode) or TWO_PASS_MODES.get(mode)
    if rule is None:
        raise ValueError(f"unknown clipping_mode {mode!r}; choose one of {sorted(ALL_MODES)}")
    return FixedRule(rule)


@dataclass(eq=False)
class ClippingConfig:
    """How every example is clipped. It owns the grouping: with `clipping_style=M` (uniform groups
    of consecutive layers in the order of first use) the groups are made again once the first
    forward pass has been traced (`follow_first_use`)."""

    mode: str
    grouping: Grouping
    clip_fn: ClipFunction
    loss_reduction: str
    chooser: Chooser
    style: ClippingStyle
    max_grad_norm: float | Sequence[float]

    @classmethod
    def create(cls, mode: str, style: ClippingStyle, clip_fn: str, loss_reduction: str,
               max_grad_norm: float | Sequence[float], names: list[str], memory_budget: int | None = None,
               ) -> "ClippingConfig":
        """Check and build; raises ValueError (or TypeError) naming the bad argument."""
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        fn = clipping_function(clip_fn)
        chooser = method_chooser(mode, memory_budget)
        grouping = make_grouping(style, names, max_grad_norm)
        return cls(mode, grouping, fn, loss_reduction, chooser, style, max_grad_norm)

    @property
    def two_pass(self) -> bool:
        """Whether the clipped sum comes from a second backward pass (ghost, mix-ghost)."""
        return self.mode in TWO_PASS_MODES

    def follow_first_use(self, order: list[str]) -> None:
        """With M uniform groups: regroup the layers in the order the model first used them."""
        if isinstance(self.style, int) and not isinstance(self.style, bool):
            self.grouping = make_grouping(self.style, order, self.max_grad_norm)

    def with_grouping(self, grouping: Grouping) -> "ClippingConfig":
        """The same clipping over part of the groups (a released unit of layers)."""
        return replace(self, grouping=grouping)

    def of_unreduced_losses(self) -> "ClippingConfig":
        """The same clipping applied to gradients of per-example losses that were summed, not
        averaged (the two-pass modes' first pass)."""
        return replace(self, loss_reduction="sum")

"""Clipping methods: for each bound layer, how its per-example norms and its clipped sum are made,
and the fixed clipping modes that choose one per layer by a rule of the seed papers.

A `Chooser` picks a `LayerMethod` per binding; the `auto` mode's planner (`planner.py`) is one too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from ..capture.records import Binding, Call


@dataclass(frozen=True)
class LayerMethod:
    """How one binding contributes: its norms by the ghost trick or from explicit per-example
    gradients, and its clipped sum by reusing those gradients or by book-keeping (a^T diag(C) g)."""

    ghost_norm: bool
    reuse: bool


EXPLICIT = LayerMethod(ghost_norm=False, reuse=True)
GHOST_BK = LayerMethod(ghost_norm=True, reuse=False)
EXPLICIT_BK = LayerMethod(ghost_norm=False, reuse=False)


class Chooser(Protocol):
    """Chooses each binding's method for a recorded pass: `prepare` sees all of the pass's calls
    first (a planner sizes its plan from them), then each binding is asked once."""

    def prepare(self, calls: dict[Binding, list[Call]]) -> None: ...

    def __call__(self, binding: Binding, calls: list[Call]) -> LayerMethod: ...


def _ghost_cheaper(binding: Binding, calls: list[Call]) -> bool:
    costs = binding.rule.costs(binding.module, calls[0]) if binding.rule.ghost else None
    return costs is not None and costs[0] < costs[1]


def per_example(binding: Binding, calls: list[Call]) -> LayerMethod:
    """Explicit per-example gradients everywhere, summed with their factors (Opacus's algorithm)."""
    return EXPLICIT


def book_keeping(binding: Binding, calls: list[Call]) -> LayerMethod:
    """BK (Bu et al. 2023): ghost norms wherever a layer has them; clipped sums as a^T diag(C) g."""
    return GHOST_BK if binding.rule.ghost else EXPLICIT


def book_keeping_mix_ghost(binding: Binding, calls: list[Call]) -> LayerMethod:
    """BK-MixGhost: per layer, the cheaper of ghost norm and explicit norm; sums by book-keeping."""
    if _ghost_cheaper(binding, calls):
        return GHOST_BK
    return EXPLICIT_BK if binding.rule.ghost else EXPLICIT


def book_keeping_mix_opt(binding: Binding, calls: list[Call]) -> LayerMethod:
    """BK-MixOpt: per layer, the cheaper norm; layers with explicit gradients reuse them for the sum."""
    return GHOST_BK if _ghost_cheaper(binding, calls) else EXPLICIT


class FixedRule:
    """A Chooser that applies one rule of the seed papers to every binding, with nothing to plan."""

    def __init__(self, rule: Callable[[Binding, list[Call]], LayerMethod]):
        self.rule = rule

    def prepare(self, calls: dict[Binding, list[Call]]) -> None:
        pass

    def __call__(self, binding: Binding, calls: list[Call]) -> LayerMethod:
        return self.rule(binding, calls)


#: the one-pass modes: norms and clipped sums from the recorded tensors
MODES: dict[str, Callable[[Binding, list[Call]], LayerMethod]] = {
    "per-example": per_example,
    "bk": book_keeping,
    "bk-mix-ghost": book_keeping_mix_ghost,
    "bk-mix-opt": book_keeping_mix_opt,
}
#: the two-pass modes (`two_pass.py`): norms from the recorded tensors, the clipped sum from a
#: second backward pass of the reweighted loss
TWO_PASS_MODES: dict[str, Callable[[Binding, list[Call]], LayerMethod]] = {
    "ghost": book_keeping,
    "mix-ghost": book_keeping_mix_ghost,
}
ALL_MODES = (*MODES, *TWO_PASS_MODES, "auto")

"""Clipping modes: for each handled layer, how its per-example norms and its clipped sum are made."""

from __future__ import annotations

from .clipper import EXPLICIT, LayerMethod, MethodChooser
from .handlers import Handler
from .layers.base import Call

GHOST_BK = LayerMethod(ghost_norm=True, reuse=False)
EXPLICIT_BK = LayerMethod(ghost_norm=False, reuse=False)


def _ghost_cheaper(handler: Handler, calls: list[Call]) -> bool:
    costs = handler.rule.costs(handler.module, calls[0]) if handler.rule.ghost else None
    return costs is not None and costs[0] < costs[1]


def per_example(handler: Handler, calls: list[Call]) -> LayerMethod:
    """Explicit per-sample gradients everywhere, summed with their factors (Opacus's algorithm)."""
    return EXPLICIT


def book_keeping(handler: Handler, calls: list[Call]) -> LayerMethod:
    """BK (Bu et al. 2023): ghost norms wherever a layer has them; clipped sums as a^T diag(C) g."""
    return GHOST_BK if handler.rule.ghost else EXPLICIT


def book_keeping_mix_ghost(handler: Handler, calls: list[Call]) -> LayerMethod:
    """BK-MixGhost: per layer, the cheaper of ghost norm and explicit norm; sums by book-keeping."""
    if _ghost_cheaper(handler, calls):
        return GHOST_BK
    return EXPLICIT_BK if handler.rule.ghost else EXPLICIT


def book_keeping_mix_opt(handler: Handler, calls: list[Call]) -> LayerMethod:
    """BK-MixOpt: per layer, the cheaper norm; layers with explicit gradients reuse them for the sum."""
    return GHOST_BK if _ghost_cheaper(handler, calls) else EXPLICIT


MODES: dict[str, MethodChooser] = {
    "per-example": per_example,
    "bk": book_keeping,
    "bk-mix-ghost": book_keeping_mix_ghost,
    "bk-mix-opt": book_keeping_mix_opt,
}


TWO_PASS: dict[str, MethodChooser] = {"ghost": book_keeping, "mix-ghost": book_keeping_mix_ghost}
ALL_MODES = (*MODES, *TWO_PASS, "auto")


def method_chooser(mode: str, memory_budget: int | None = None) -> MethodChooser:
    if mode == "auto":
        from .planner import Planner

        return Planner(memory_budget)
    if mode not in MODES and mode not in TWO_PASS:
        raise ValueError(f"unknown clipping_mode {mode!r}; choose one of {sorted(ALL_MODES)}")
    return MODES.get(mode) or TWO_PASS[mode]

"""Clipping functions: the per-example factor applied to a gradient of norm ||g|| in a group with
threshold R, computed in float32 (or float64) whatever the training precision."""

from __future__ import annotations

from typing import Callable

import torch

ClipFunction = Callable[[torch.Tensor, float], torch.Tensor]


def abadi(norms: torch.Tensor, threshold: float) -> torch.Tensor:
    """min(1, R / ||g||) (Abadi et al. 2016); a zero gradient keeps factor 1."""
    return (threshold / (norms + 1e-6)).clamp(max=1.0)


def automatic(norms: torch.Tensor, threshold: float) -> torch.Tensor:
    """R / (||g|| + 0.01): automatic clipping (Bu et al. 2023), every example normalised."""
    return threshold / (norms + 0.01)


CLIPPING_FUNCTIONS: dict[str, ClipFunction] = {"abadi": abadi, "automatic": automatic}


def clipping_function(name: str) -> ClipFunction:
    if name not in CLIPPING_FUNCTIONS:
        raise ValueError(f"unknown clipping_fn {name!r}; choose one of {sorted(CLIPPING_FUNCTIONS)}")
    return CLIPPING_FUNCTIONS[name]

"""Clipping styles: how the trainable parameters are split into groups, each clipped to its own R_m."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

ClippingStyle = Union[str, int, Sequence[Sequence[str]]]
STYLES = ("all-layer", "layer-wise", "param-wise")


@dataclass
class Grouping:
    """Groups of parameter names, one threshold each, and the group of every parameter."""

    groups: list[list[str]]
    thresholds: list[float]

    def __post_init__(self) -> None:
        self.group_of = {name: m for m, names in enumerate(self.groups) for name in names}

    @property
    def total_threshold(self) -> float:
        """||(R_1, ..., R_M)||: the sensitivity of the clipped sum, which the noise is scaled to."""
        return math.sqrt(sum(r * r for r in self.thresholds))

    def holding(self, names: set[str]) -> "Grouping":
        """The groups (and thresholds) that hold any of `names`."""
        keep = [m for m, group in enumerate(self.groups) if any(n in names for n in group)]
        return Grouping([self.groups[m] for m in keep], [self.thresholds[m] for m in keep])


def _layer(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _layers(names: list[str]) -> list[list[str]]:
    """Parameter names grouped by the module that owns them, in the order of `names`."""
    layers: dict[str, list[str]] = {}
    for name in names:
        layers.setdefault(_layer(name), []).append(name)
    return list(layers.values())


def make_groups(style: ClippingStyle, names: list[str]) -> list[list[str]]:
    """Split `names` (in order of first use) into groups; raise ValueError on a bad style."""
    if isinstance(style, str):
        if style == "all-layer":
            return [list(names)]
        if style == "layer-wise":
            return _layers(names)
        if style == "param-wise":
            return [[n] for n in names]
        raise ValueError(f"unknown clipping_style {style!r}; use one of {STYLES}, an int or a list of lists")
    if isinstance(style, bool):
        raise TypeError("clipping_style must be a name, an int or a list of lists of parameter names")
    if isinstance(style, int):
        layers = _layers(names)
        if not 1 <= style <= len(layers):
            raise ValueError(f"clipping_style={style} groups, but the model has {len(layers)} layers with trainable parameters")
        size, extra = divmod(len(layers), style)
        bounds = [m * size + min(m, extra) for m in range(style + 1)]
        return [sum(layers[bounds[m] : bounds[m + 1]], []) for m in range(style)]
    return _custom_groups(style, names)


def _custom_groups(style: Sequence[Sequence[str]], names: list[str]) -> list[list[str]]:
    groups = [list(g) for g in style]
    seen: dict[str, int] = {}
    for m, group in enumerate(groups):
        if not group:
            raise ValueError(f"clipping group {m} is empty")
        for name in group:
            if name not in names:
                raise ValueError(f"clipping group {m} names {name!r}, which is not a trainable parameter of the model")
            if name in seen:
                raise ValueError(f"parameter {name!r} is in clipping groups {seen[name]} and {m}; each must be in exactly one")
            seen[name] = m
    missing = [n for n in names if n not in seen]
    if missing:
        raise ValueError(f"trainable parameters in no clipping group: {missing}")
    return groups


def make_grouping(style: ClippingStyle, names: list[str], max_grad_norm: float | Sequence[float]) -> Grouping:
    """The groups of `style` over `names`, each with its threshold: a single max_grad_norm R is
    split evenly, R / sqrt(M) per group, so the whole clipped gradient has norm at most R."""
    groups = make_groups(style, names)
    if isinstance(max_grad_norm, (int, float)):
        if not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
            raise ValueError(f"max_grad_norm must be a finite number > 0, got {max_grad_norm}")
        thresholds = [float(max_grad_norm) / math.sqrt(len(groups))] * len(groups)
    else:
        thresholds = [float(r) for r in max_grad_norm]
        if len(thresholds) != len(groups):
            raise ValueError(f"max_grad_norm has {len(thresholds)} thresholds but clipping_style gives {len(groups)} groups")
        if not all(r > 0 and math.isfinite(r) for r in thresholds):
            raise ValueError(f"every threshold in max_grad_norm must be a finite number > 0, got {thresholds}")
    return Grouping(groups, thresholds)

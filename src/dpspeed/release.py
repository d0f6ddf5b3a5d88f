"""Group-wise memory release (Bu et al., group-wise clipping, Algorithm 1): as soon as the backward
pass has delivered every output gradient of a set of layers whose clipping groups are complete,
clip and sum them, and let their kept activations and output gradients go.

Layers and clipping groups form a bipartite graph; its connected components are the units that
can be released together. With layer-wise clipping each layer is its own unit, so the kept
tensors live only as long as that layer's part of the backward pass; with all-layer clipping the
one unit completes at the end of the backward pass.
"""

from __future__ import annotations

from typing import Callable

from .controller import Controller, Pass
from .grouping import Grouping
from .handlers import Handler
from .layers.base import Call


def release_units(handlers: list[Handler], grouping: Grouping) -> dict[Handler, int]:
    """Each handler's unit: handlers are joined when their parameters share a clipping group."""
    parent = list(range(len(handlers)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner_of_group: dict[int, int] = {}
    for i, handler in enumerate(handlers):
        for name in handler.params.values():
            group = grouping.group_of[name]
            if group in owner_of_group:
                parent[find(i)] = find(owner_of_group[group])
            else:
                owner_of_group[group] = i
    return {h: find(i) for i, h in enumerate(handlers)}


def sub_grouping(grouping: Grouping, names: set[str]) -> Grouping:
    """The groups (and thresholds) that hold `names`."""
    keep = [m for m, group in enumerate(grouping.groups) if any(n in names for n in group)]
    return Grouping([grouping.groups[m] for m in keep], [grouping.thresholds[m] for m in keep])


class EarlyRelease:
    """Watches arriving output gradients and hands completed units to `process`."""

    def __init__(self, controller: Controller, grouping: Callable[[], Grouping], process: Callable[[Pass, Grouping], None]):
        self.controller = controller
        self.grouping = grouping
        self.process = process
        self._members: dict[Handler, list[Handler]] = {}
        self._handlers: list[Handler] | None = None

    def members(self, handler: Handler) -> list[Handler]:
        """The handlers released together with `handler` (recomputed when the handlers change)."""
        if self._handlers is not self.controller.handlers:
            self._handlers = self.controller.handlers
            units = release_units(self._handlers, self.grouping())
            by_unit: dict[int, list[Handler]] = {}
            for h, unit in units.items():
                by_unit.setdefault(unit, []).append(h)
            self._members = {h: by_unit[unit] for h, unit in units.items()}
        return self._members.get(handler, [handler])

    def on_grad(self, handler: Handler, call: Call) -> None:
        if not all(g is not None for g in call.output_grads):
            return
        recorded = next((p for p in reversed(self.controller.passes) if call in p.get(handler, ())), None)
        if recorded is None:
            return
        unit = [h for h in self.members(handler) if h in recorded]
        if not all(all(g is not None for g in c.output_grads) for h in unit for c in recorded[h]):
            return
        part = {h: recorded.pop(h) for h in unit}
        names = {n for h in unit for n in h.params.values()}
        self.process(part, sub_grouping(self.grouping(), names))

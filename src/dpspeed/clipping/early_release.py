"""Group-wise memory release (Bu et al., group-wise clipping, Algorithm 1): as soon as the backward
pass has delivered every output gradient of a set of layers whose clipping groups are complete,
clip and sum them, and let their kept activations and output gradients go.

Layers and clipping groups form a bipartite graph; its connected components are the units that
can be released together. With layer-wise clipping each layer is its own unit, so the kept
tensors live only as long as that layer's part of the backward pass; with all-layer clipping the
one unit completes at the end of the backward pass. Before its unit, each call keeps less as soon
as its gradient arrives (`shrink`): inputs in the compute dtype, norm layers' small per-example
gradients in place of their tensors.
"""

from __future__ import annotations

from typing import Callable

from ..capture.hooks import Controller
from ..capture.records import Binding, Call
from ..profiling import section
from .config import ClippingConfig
from .groups import Grouping


def release_units(bindings: list[Binding], grouping: Grouping) -> dict[Binding, int]:
    """Each binding's unit: bindings are joined when their parameters share a clipping group."""
    parent = list(range(len(bindings)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner_of_group: dict[int, int] = {}
    for i, binding in enumerate(bindings):
        for name in binding.params.values():
            group = grouping.group_of[name]
            if group in owner_of_group:
                parent[find(i)] = find(owner_of_group[group])
            else:
                owner_of_group[group] = i
    return {b: find(i) for i, b in enumerate(bindings)}


def _complete(calls: list[Call]) -> bool:
    return all(c.complete for c in calls)


def shrink(binding: Binding, call: Call) -> None:
    """A call keeps less as soon as its output gradients have arrived (`LayerRule.shrink`: inputs in
    the compute dtype, norm layers' per-example gradients in place of their tensors)."""
    if call.complete and call.per_sample is None and not call.released and call.batch_size > 0:
        with section("norms"):  # (an empty batch, a rank's share under torchrun, is never clipped)
            binding.rule.shrink(binding.module, call, list(binding.params))


class EarlyRelease:
    """Watches arriving output gradients (`gradient_arrived`) and hands every completed unit of a
    recording to `process(part, config, source=recording)`, with the config narrowed to the unit's
    groups."""

    def __init__(self, controller: Controller, config: ClippingConfig,
                 process: Callable[..., None]):
        self.controller = controller
        self.config = config
        self.process = process
        self._members: dict[Binding, list[Binding]] = {}
        self._bindings: list[Binding] | None = None

    def members(self, binding: Binding) -> list[Binding]:
        """The bindings released together with `binding` (recomputed when the bindings change)."""
        if self._bindings is not self.controller.bindings:
            self._bindings = self.controller.bindings
            units = release_units(self._bindings, self.config.grouping)
            by_unit: dict[int, list[Binding]] = {}
            for b, unit in units.items():
                by_unit.setdefault(unit, []).append(b)
            self._members = {b: by_unit[unit] for b, unit in units.items()}
        return self._members.get(binding, [binding])

    def gradient_arrived(self, binding: Binding, call: Call) -> None:
        """Clip the unit of `binding` if this gradient completed it."""
        if not _complete([call]):
            return
        recorded = next((r for r in reversed(self.controller.recordings) if call in r.get(binding, ())), None)
        if recorded is None:
            return
        unit = [b for b in self.members(binding) if b in recorded]
        if not all(_complete(recorded[b]) for b in unit):
            return
        part = {b: recorded.pop(b) for b in unit}
        names = {n for b in unit for n in b.params.values()}
        self.process(part, self.config.with_grouping(self.config.grouping.holding(names)), source=recorded)

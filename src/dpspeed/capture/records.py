"""What the capture stage records, and hands to the layer rules and the clipping.

Every record compares by identity (`eq=False`): records hold tensors, and a value comparison
(`call in calls`) would compare those tensors element by element.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

if TYPE_CHECKING:
    from ..layers.rule import LayerRule


@dataclass(eq=False)
class TapSpec:
    """Which leaves of a module's output were tapped, with their shapes (for zero gradients)."""

    indices: list[int]
    shapes: list[tuple[torch.Size, torch.dtype, torch.device]]


def autocast_state() -> list[tuple[str, torch.dtype]]:
    """The device types under autocast now, with their dtypes."""
    return [(device, torch.get_autocast_dtype(device)) for device in ("cpu", "cuda") if torch.is_autocast_enabled(device)]


@dataclass(eq=False)
class Call:
    """One forward call of a bound module: its inputs and, after backward, its output gradients."""

    args: tuple
    kwargs: dict
    output_grads: list[torch.Tensor | None] = field(default_factory=list)
    output_spec: TapSpec | None = None  # which output leaves were tapped (used by the replaying rules)
    rows_per_example: int = 1  # > 1 when the module saw the batch flattened to (B * k, ...)
    shared: dict = field(default_factory=dict)  # one dict for all calls on the same input tensor
    cache: dict = field(default_factory=dict)  # what one rule method computed for another (per call)
    released: bool = False  # clipped, its tensors let go
    #: its per-example gradients, formed as its output gradients arrived in place of the kept
    #: inputs and output gradients (`condense`)
    per_sample: dict[str, torch.Tensor] | None = None
    discarded: bool = False  # its pass was dropped before any gradient came (zero_grad, then another pass)
    #: the autocast state the call ran under: a replay of it runs under the same (records are made
    #: in the forward pass, replays in the backward pass or at the step, outside the forward's autocast)
    autocast: list[tuple[str, torch.dtype]] = field(default_factory=autocast_state)

    @property
    def has_grads(self) -> bool:
        return self.per_sample is not None or any(g is not None for g in self.output_grads)

    @property
    def complete(self) -> bool:
        """Whether every output gradient has arrived (or been condensed into per-example gradients)."""
        return self.per_sample is not None or all(g is not None for g in self.output_grads)

    @property
    def batch_size(self) -> int:
        """The rows of the call: the leading dimension of its first output gradient."""
        return next(g.shape[0] for g in self._row_tensors())

    @property
    def device(self) -> torch.device:
        return next(g.device for g in self._row_tensors())

    def _row_tensors(self):
        return iter(self.per_sample.values()) if self.per_sample is not None else (
            g for g in self.output_grads if g is not None)

    def condense(self, per_sample: dict[str, torch.Tensor]) -> None:
        """Keep the call's per-example gradients (one row per row of the call) instead of its inputs
        and output gradients, which are let go."""
        self.per_sample = per_sample
        self.args, self.kwargs, self.shared, self.cache = (), {}, {}, {}
        self.output_grads = [None] * len(self.output_grads)

    def release(self) -> None:
        """Let go of the kept activations and output gradients once the call is clipped: the
        autograd graph holds this call (through its gradient hooks) until the step ends."""
        self.args, self.kwargs, self.shared, self.cache, self.per_sample = (), {}, {}, {}, None
        self.output_grads = [None] * len(self.output_grads)
        self.released = True

    def input(self) -> torch.Tensor:
        return self.args[0]

    def grad(self) -> torch.Tensor:
        """The gradient of the module's single output (zeros if it never reached the loss)."""
        return self.output_grads[0]

    def grads_or_zeros(self) -> list[torch.Tensor]:
        """Every tapped output's gradient, zeros for one that never reached the loss."""
        return [torch.zeros(shape, dtype=dtype, device=device) if g is None else g
                for g, (shape, dtype, device) in zip(self.output_grads, self.output_spec.shapes)]


Recipe = Callable[[dict[str, torch.Tensor], int], torch.Tensor]  # (parameter values, batch) -> tensor


@dataclass(eq=False)
class OpUse(Call):
    """One torch op that combined a module's bare parameters with the batch: the op, its argument
    leaves, and how to rebuild the parameter-derived ones for one example."""

    func: Any = None
    leaves: list = field(default_factory=list)
    spec: Any = None
    recipes: dict[int, Recipe] = field(default_factory=dict)  # leaf position -> parameter-derived value
    batched: list[int] = field(default_factory=list)  # leaf positions of batched tensors
    values: dict[str, torch.Tensor] | None = None  # parameter values at the use (None: the module's)

    def release(self) -> None:
        super().release()
        self.leaves, self.values, self.recipes = [], None, {}


@dataclass(eq=False)
class Binding:
    """A module whose forward calls are recorded, the rule that turns them into per-example
    gradients, and the parameters it covers as {name inside the module: name inside the model}."""

    module: nn.Module
    name: str
    rule: LayerRule
    params: dict[str, str] = field(default_factory=dict)
    #: the parameters are used in this module's own code, never while one of its children runs
    own_code_only: bool = False


#: One physical batch's record: the calls of every bound module, in the order they were made, over
#: every forward pass of the batch (each pass's row i is the same example: clipped together).
Recording = dict[Binding, list[Call]]

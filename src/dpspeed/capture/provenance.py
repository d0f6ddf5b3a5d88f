"""Batch provenance: which tensors derive from the model's batched inputs.

Both the first-pass trace (which modules see the batch) and the op taps (which ops combine a bare
parameter with the batch) follow the batch through torch calls with one of these.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch.utils._pytree import tree_flatten


#: types that are always leaves of a pytree (tensors are, unless registered otherwise)
_SCALARS = (int, float, bool, str, type(None), torch.dtype, torch.device)


def flat_leaves(args: tuple, kwargs: dict) -> list | None:
    """tree_flatten's leaves of (args, kwargs) for the common call of tensors and scalars only,
    without its cost (it runs for every op a hook watches); None for anything else."""
    if kwargs or not all(isinstance(a, torch.Tensor) or type(a) in _SCALARS for a in args):
        return None
    return list(args)


def tensors(tree: Any) -> list[torch.Tensor]:
    """The tensors among the leaves of a nested structure."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


class BatchProvenance:
    """The tensors computed from the batch, by id. Every tensor whose id is recorded is kept alive
    while this object lives, so that no other tensor can take its id."""

    def __init__(self, inputs: Iterable[torch.Tensor] = ()):
        self._batched: set[int] = set()
        self._alive: list[torch.Tensor] = []
        self.mark(inputs)

    def mark(self, batched: Iterable[torch.Tensor]) -> None:
        """Record tensors as derived from the batch."""
        batched = list(batched)
        self._batched.update(id(t) for t in batched)
        self._alive.extend(batched)

    def keep(self, other: Iterable[torch.Tensor]) -> None:
        """Keep tensors alive whose ids are looked up elsewhere (parameters, recipes' outputs)."""
        self._alive.extend(other)

    def is_batched(self, tree: Any) -> bool:
        return any(id(t) in self._batched for t in tensors(tree))

    def positions(self, leaves: list) -> list[int]:
        """The positions of the batched tensors among `leaves`."""
        return [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor) and id(leaf) in self._batched]

    def follow(self, inputs: Any, outputs: Any) -> None:
        """The outputs of a call derive from the batch when any of its inputs does."""
        if self.is_batched(inputs):
            self.mark(tensors(outputs))

"""Copies of a private model are plain models: every hook dpspeed puts on the user's model is a
`PrivateHook`, which a deep copy (an EMA model, a copy fine-tuned without DP) or a pickle of the
model turns into a hook that does nothing. The copy then never records into, or toggles the
parameters of, the model make_private attached to."""

from __future__ import annotations

from typing import Any, Callable

import torch


def does_nothing(*args: Any, **kwargs: Any) -> None:
    """What a copied model's dpspeed hooks do: nothing (its forward runs as without dpspeed)."""
    return None


def _does_nothing() -> Callable[..., None]:
    return does_nothing


class PrivateHook:
    """A module hook of dpspeed's: calls `fn`; copied or pickled, it becomes `does_nothing`."""

    def __init__(self, fn: Callable):
        self.fn = fn

    @torch.compiler.disable  # hooks record with Python side effects: keep them out of compiled graphs
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> Callable[..., None]:
        return does_nothing

    def __reduce__(self):
        return _does_nothing, ()

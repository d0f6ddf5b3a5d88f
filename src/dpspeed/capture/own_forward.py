"""A module's forward routed through dpspeed on that one instance, until removed: its class, its
state_dict and every hook stay the user's. For rules that need tensors from inside the module
(`LayerRule.records_inside`)."""

from __future__ import annotations

import functools
import types
from typing import Callable

from torch import nn

#: (the module's own forward, args, kwargs) -> output
RecordedForward = Callable[[Callable, tuple, dict], object]


class OwnForward:
    """Installs `recorded(own_forward, args, kwargs)` as `module.forward`; `remove()` restores it.

    The replacement is a method bound to the module, so a deep copy of the model binds it to the
    copy, which then runs its own forward unrecorded."""

    def __init__(self, module: nn.Module, recorded: RecordedForward):
        self.module = module
        self._previous = module.__dict__.get("forward")  # a forward set on the instance (accelerate's)

        def forward(this: nn.Module, *args, **kwargs):
            own = self._previous if this is module and self._previous is not None else (
                functools.partial(type(this).forward, this))
            return recorded(own, args, kwargs) if this is module else own(*args, **kwargs)

        module.forward = types.MethodType(forward, module)

    def remove(self) -> None:
        if self._previous is not None:
            self.module.forward = self._previous
        else:
            del self.module.forward

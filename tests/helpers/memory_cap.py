"""A memory budget for tests on the CPU: the bytes of live tensor storages created inside it, with
storages resized in place (fully_shard frees gathered weights that way) counted at their size now."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary


def _plain(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding `t`'s data (a DTensor's local shard)."""
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        inner = [getattr(t, name) for name in names]
        return [p for i in inner if isinstance(i, torch.Tensor) for p in _plain(i)]
    return [t]


class MemoryCap(TorchDispatchMode):
    """Raises torch.OutOfMemoryError when the live bytes exceed `limit`; keeps the peak."""

    def __init__(self, limit: int | None = None):
        super().__init__()
        self.limit = limit
        self.peak = 0
        self._storages = WeakIdKeyDictionary()

    def live(self) -> int:
        return sum(s.nbytes() for s in list(self._storages.keys()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                for plain in _plain(t):
                    self._storages[plain.untyped_storage()] = True
        live = self.live()
        self.peak = max(self.peak, live)
        if self.limit is not None and live > self.limit:
            raise torch.OutOfMemoryError(f"{live} bytes live, over the budget of {self.limit}")
        return out

"""Peak memory of one step, and the prediction of Bu et al.'s Fact 6.1 (group-wise clipping) for it.

Fact 6.1: with layers in forward order and clipping group m spanning layers G_m[0]..G_m[-1], the
m-th memory peak of the backward pass holds the activations of every layer up to G_m[-1] and the
output gradients of the layers of group m: B (sum_{l <= G_m[-1]} T_l d_l + sum_{G_m[0] <= r <= G_m[-1]} T_r p_r).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from ..clipping.groups import ClippingStyle, make_groups
from .workload import logits


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages created inside it and still alive; keeps the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._seen = WeakIdKeyDictionary()

    def _freed(self, nbytes: int, _ref) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                if storage not in self._seen:
                    nbytes = storage.nbytes()
                    self._seen[storage] = weakref.ref(storage, lambda ref, n=nbytes: self._freed(n, ref))
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
        return out


def peak_bytes(run: Callable[[], None], device: torch.device) -> int:
    """The peak of memory allocated by `run` above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    meter = _LiveBytes()
    with meter:
        run()
    return meter.peak


@dataclass
class LayerSize:
    """A module that owns trainable parameters, with its per-example input (T d) and output (T p) sizes."""

    name: str
    params: list[str]
    input_elements: int
    output_elements: int


def layer_sizes(model: nn.Module, x: torch.Tensor) -> list[LayerSize]:
    """The modules owning trainable parameters, in the order they run, from one forward pass."""
    found: list[LayerSize] = []
    handles = []

    def hook(name: str, params: list[str]):
        def record(module: nn.Module, args: tuple, output) -> None:
            inputs = [a for a in tree_leaves(args) if isinstance(a, torch.Tensor)]
            outputs = [o for o in tree_leaves(output) if isinstance(o, torch.Tensor)]
            if name not in {s.name for s in found} and inputs and outputs:
                found.append(LayerSize(name, params, inputs[0][0].numel(), outputs[0][0].numel()))
        return record

    for name, module in model.named_modules():
        params = [f"{name}.{p}" if name else p for p, v in module.named_parameters(recurse=False) if v.requires_grad]
        if params:
            handles.append(module.register_forward_hook(hook(name, params)))
    try:
        with torch.no_grad():
            logits(model(x[:1]))
    finally:
        for h in handles:
            h.remove()
    return found


def fact_6_1(layers: list[LayerSize], style: ClippingStyle, batch: int, element_bytes: int) -> int:
    """The largest of the M memory peaks of Fact 6.1 for `style`, in bytes."""
    names = [p for layer in layers for p in layer.params]
    groups = make_groups(style, names)
    where = {p: i for i, layer in enumerate(layers) for p in layer.params}
    peaks = []
    for group in groups:
        first, last = min(where[p] for p in group), max(where[p] for p in group)
        kept = sum(layer.input_elements for layer in layers[: last + 1])
        kept += sum(layer.output_elements for layer in layers[first : last + 1])
        peaks.append(batch * kept * element_bytes)
    return max(peaks)

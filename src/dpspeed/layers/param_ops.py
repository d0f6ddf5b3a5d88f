"""Bare parameters (a ViT's cls_token and pos_embed, LayerScale's gamma, StdConv2d's weight): per-example
gradients from the few torch ops that combine them with the batch, replayed one example at a time.

While the owning module runs, a torch-function mode follows which tensors come from the batch.
An op on a parameter alone (gamma.reshape, cls_token.expand) is kept as a recipe; an op that meets
the batch (x + pos_embed, torch.cat) is a *use*: its output gradient is tapped, and the per-example
gradient is that op's vector-Jacobian product on each example. The rest of the network is never
replayed (the torch.func fallback would replay all of the module's forward).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from .base import Call, LayerRule
from .functional import per_example_pullback

Recipe = Callable[[dict[str, torch.Tensor], int], torch.Tensor]  # (parameter values, batch) -> tensor


@dataclass
class OpUse(Call):
    """One op that met the batch: the op, its argument leaves, and how to rebuild the parameter ones."""

    func: Any = None
    leaves: list = field(default_factory=list)
    spec: Any = None
    recipes: dict[int, Recipe] = field(default_factory=dict)  # leaf position -> parameter-derived value
    batched: list[int] = field(default_factory=list)  # leaf positions of batched tensors
    values: dict[str, torch.Tensor] | None = None  # parameter values at the use (None: the module's)

    def release(self) -> None:
        super().release()
        self.leaves, self.values, self.recipes = [], None, {}


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _replace_batch_ints(leaves: list, batch: int, example_batch: int) -> list:
    return [example_batch if isinstance(v, int) and not isinstance(v, bool) and v == batch else v for v in leaves]


class OpTapRecorder(TorchFunctionMode):
    """Records the uses of `params` ({id: local name}) while a module's forward runs."""

    def __init__(self, params: dict[int, str], inputs: list[torch.Tensor], on_use: Callable[[OpUse, list[torch.Tensor]], list],
                 values: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.params = params
        self.values = values  # the parameters' values to replay with, when the module's own go away
        self._submodules_running = 0
        self.on_use = on_use
        self._batched: set[int] = {id(t) for t in inputs}
        self._recipes: dict[int, Recipe] = {}
        self._alive: list[torch.Tensor] = list(inputs)  # keeps ids unique while the module runs
        self.batch = next((t.shape[0] for t in inputs if t.dim() > 0), None)

    def suspend(self) -> None:
        """Stop watching while a submodule runs (the parameters are used in this module's own code);
        submodules of submodules nest."""
        self._submodules_running += 1
        if self._submodules_running == 1:
            self.__exit__(None, None, None)

    def resume(self, inputs: Any, outputs: Any) -> None:
        """Watch again once the outermost submodule returns; its outputs (any nesting of tensors)
        are batched when any of its inputs was."""
        self._submodules_running -= 1
        if self._submodules_running:
            return
        if any(id(t) in self._batched for t in _tensors(inputs)):
            outputs = _tensors(outputs)
            self._batched.update(id(t) for t in outputs)
            self._alive.extend(outputs)
        self.__enter__()

    def _recipe(self, leaf) -> Recipe | None:
        if not isinstance(leaf, torch.Tensor):
            return None
        if id(leaf) in self.params:
            name = self.params[id(leaf)]
            return lambda values, batch, name=name: values[name]
        return self._recipes.get(id(leaf))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves, spec = tree_flatten((args, kwargs))
        recipes = {i: r for i, leaf in enumerate(leaves) if (r := self._recipe(leaf)) is not None}
        batched = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor) and id(leaf) in self._batched]
        out = func(*args, **kwargs)
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not outputs:
            return out
        self._alive.extend(outputs)
        if not recipes:
            if batched:
                self._batched.update(id(t) for t in outputs)
            return out
        if not batched:  # parameter-only: keep the recipe, to rebuild it per example
            if len(outputs) == 1:
                scale = outputs[0].dim() > 0 and outputs[0].shape[0] == self.batch  # expand(B, ...)

                def recipe(values, batch, leaves=leaves, recipes=recipes, scale=scale, recorded_batch=self.batch):
                    args_ = [recipes[i](values, batch) if i in recipes else v for i, v in enumerate(leaves)]
                    if scale:
                        args_ = _replace_batch_ints(args_, recorded_batch, batch)
                    a, k = tree_unflatten(args_, spec)
                    return func(*a, **k)

                self._recipes[id(outputs[0])] = recipe
            return out
        use = OpUse(args=(), kwargs={}, func=func, leaves=leaves, spec=spec, recipes=recipes, batched=batched,
                    values=self.values)
        out_leaves, out_spec = tree_flatten(out)
        out_leaves = self.on_use(use, out_leaves)
        self._batched.update(id(t) for t in out_leaves if isinstance(t, torch.Tensor))
        self._alive.extend(t for t in out_leaves if isinstance(t, torch.Tensor))
        return tree_unflatten(out_leaves, out_spec)


class ParameterOpRule(LayerRule):
    """Per-example gradients of a module's bare parameters from their recorded uses."""

    def __init__(self, pause_recording: Callable):
        self.pause_recording = pause_recording

    def per_sample_grads(self, module: nn.Module, call: OpUse, names: list[str]) -> dict[str, torch.Tensor]:
        def outputs(v: dict[str, torch.Tensor], rows_in: list[torch.Tensor]) -> tuple:
            leaves = list(call.leaves)
            for i, recipe in call.recipes.items():
                leaves[i] = recipe(v, 1)
            for i, t in zip(call.batched, rows_in):
                leaves[i] = t
            a, k = tree_unflatten(leaves, call.spec)
            out = tree_flatten(call.func(*a, **k))[0]
            return tuple(out[i] for i in call.output_spec.indices)

        values = call.values or {n: module.get_parameter(n).detach() for n in names}
        batched = [call.leaves[i].unsqueeze(1) for i in call.batched]
        return per_example_pullback(outputs, values, batched, 0, call, self.pause_recording,
                                    f"an op on {type(module).__name__}'s parameters")

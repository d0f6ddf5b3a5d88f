"""Op taps: record the torch ops that combine a module's bare parameters with the batch.

Used for parameters a module uses in its own code (a ViT's cls_token and pos_embed, LayerScale's
gamma, StdConv2d's weight). While the module runs, a torch-function mode follows which tensors
come from the batch. An op on parameters alone (gamma.reshape, cls_token.expand) is kept as a
recipe; an op that meets the batch (x + pos_embed, torch.cat) is a *use*: an `OpUse` record whose
output gradient is tapped, so that the per-example gradient is that op's vector-Jacobian product
on each example (`layers/param_ops.py`). The rest of the network is never replayed.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from .copies import PrivateHook
from .provenance import BatchProvenance, flat_leaves, tensors
from .records import Binding, OpUse, Recipe

OnUse = Callable[[OpUse, list], list]  # (the use, its output leaves) -> the leaves to return


#: the parameter-only ops that may give a tensor its batch dimension
_EXPANSIONS = {"expand", "expand_as", "broadcast_to", "repeat", "tile", "repeat_interleave"}
#: the ops whose integer arguments are sizes (one equal to the batch size, after an expansion, is it)
_SIZED = _EXPANSIONS | {"reshape", "view", "unflatten", "new_zeros", "new_ones", "new_full", "new_empty"}
#: ops whose output carries no gradient back to the parameters: not a use, whatever meets it
_NO_GRADIENT = {"detach", "detach_", "requires_grad_"}


def _replace_batch_ints(leaves: list, batch: int, example_batch: int) -> list:
    return [example_batch if isinstance(v, int) and not isinstance(v, bool) and v == batch else v for v in leaves]


class OpTapRecorder(TorchFunctionMode):
    """Records the uses of `params` ({id: local name}) while a module's forward runs."""

    def __init__(self, params: dict[int, str], inputs: list[torch.Tensor], on_use: OnUse,
                 values: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.params = params
        self.values = values  # the parameters' values to replay with, when the module's own go away
        self.on_use = on_use
        self.provenance = BatchProvenance(inputs)
        self.batch = next((t.shape[0] for t in inputs if t.dim() > 0), None)
        self._submodules_running = 0
        self._recipes: dict[int, Recipe] = {}
        self._scaled: set[int] = set()  # recipes' outputs whose dimension 0 is the batch

    @property
    def suspended(self) -> bool:
        return self._submodules_running > 0

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
        self.provenance.follow(inputs, outputs)
        self.__enter__()

    def _recipe(self, leaf) -> Recipe | None:
        if not isinstance(leaf, torch.Tensor):
            return None
        if id(leaf) in self.params:
            name = self.params[id(leaf)]
            return lambda values, batch, name=name: values[name]
        return self._recipes.get(id(leaf))

    def _keep_recipe(self, func, leaves: list, spec, recipes: dict[int, Recipe], outputs: list[torch.Tensor]) -> None:
        """Remember how each output of a parameter-only op (several for chunk, split, unbind) is
        rebuilt from the parameters' values for a batch of any size: an expansion to the recorded
        batch in dimension 0 (cls_token.expand(B, -1, -1)) becomes one to the new size, and so do
        the sizes given to the shape ops after it (reshape, view) while their output keeps that
        dimension. No other integer is touched: an exponent, or the permutation of a table whose
        first size happens to equal the batch size, is not a batch size."""
        name = getattr(func, "__name__", "")
        from_batch = name in _EXPANSIONS or any(id(leaves[i]) in self._scaled for i in recipes)
        for output in outputs:
            if from_batch and output.dim() > 0 and output.shape[0] == self.batch:
                self._scaled.add(id(output))
        resize = from_batch and name in _SIZED and outputs[0].dim() > 0 and outputs[0].shape[0] == self.batch
        recorded_batch = self.batch

        def rebuilt(values: dict[str, torch.Tensor], batch: int) -> list[torch.Tensor]:
            args = [recipes[i](values, batch) if i in recipes else v for i, v in enumerate(leaves)]
            if resize:
                args = _replace_batch_ints(args, recorded_batch, batch)
            a, k = tree_unflatten(args, spec)
            return tensors(func(*a, **k))

        for index, output in enumerate(outputs):
            self._recipes[id(output)] = lambda values, batch, index=index: rebuilt(values, batch)[index]

    def crossing(self, tree: Any, where: str) -> Any:
        """`tree` (a submodule's inputs, or the module's output) with every parameter-derived tensor
        that leaves the watched code without having met the batch made a use of its own (an
        identity, tapped), so that its gradient is taken per example; None when there is none. Such
        a tensor must be expanded to the batch in dimension 0: in any other layout, which rows
        are which example's is unknown, and it is refused."""
        leaves, spec = tree_flatten(tree)
        found = False
        for i, leaf in enumerate(leaves):
            recipe = self._recipe(leaf)
            if recipe is None or not leaf.is_floating_point():  # no gradient flows through an index or a mask
                continue
            if leaf.dim() == 0 or leaf.shape[0] != self.batch:
                raise RuntimeError(
                    f"a tensor computed from the parameters {sorted(set(self.params.values()))} alone (shape "
                    f"{tuple(leaf.shape)}) {where} without meeting the batch, and not expanded to the batch in "
                    "dimension 0: dpspeed cannot tell each example's share of its gradient. Expand it to "
                    "(batch, ...) there, or make the parameter one of a module that has a rule")
            use = OpUse(args=(), kwargs={}, func=torch.clone, leaves=[leaf], spec=tree_flatten(((leaf,), {}))[1],
                        recipes={0: recipe}, batched=[], values=self.values)
            leaves[i] = self.on_use(use, [torch.clone(leaf)])[0]
            self.provenance.mark([leaves[i]])
            found = True
        return tree_unflatten(leaves, spec) if found else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves, spec = flat_leaves(args, kwargs), None
        if leaves is None:
            leaves, spec = tree_flatten((args, kwargs))
        recipes = {i: r for i, leaf in enumerate(leaves) if (r := self._recipe(leaf)) is not None}
        if recipes and spec is None:
            spec = tree_flatten((args, kwargs))[1]
        batched = self.provenance.positions(leaves)
        out = func(*args, **kwargs)
        outputs = tensors(out)
        if not outputs:
            return out
        self.provenance.keep(outputs)
        if not recipes:
            if batched:
                self.provenance.mark(outputs)
            return out
        if not batched:  # parameter-only: keep the recipe, to rebuild it per example
            if torch.is_grad_enabled() and getattr(func, "__name__", "") not in _NO_GRADIENT:
                self._keep_recipe(func, leaves, spec, recipes, outputs)
            return out
        use = OpUse(args=(), kwargs={}, func=func, leaves=leaves, spec=spec, recipes=recipes, batched=batched,
                    values=self.values)
        out_leaves, out_spec = tree_flatten(out)
        out_leaves = self.on_use(use, out_leaves)
        self.provenance.mark(tensors(out_leaves))
        return tree_unflatten(out_leaves, out_spec)


class OpTaps:
    """The forward hooks that run an `OpTapRecorder` while a bound module's own code runs: entered
    with the module, suspended while any of its submodules runs (when the parameters are used in
    the module's own code only), left when it returns."""

    def __init__(self, binding: Binding, on_use: OnUse, recording: Callable[[], bool], copy_values: bool):
        self.binding = binding
        self.on_use = on_use
        self.recording = recording  # whether this forward pass is recorded
        self.copy_values = copy_values  # a sharded module frees its gathered weights after running
        self._recorders: list[OpTapRecorder | None] = []  # one per running call (calls may nest)

    def install(self) -> list:
        """Register the hooks; returns their handles."""
        module = self.binding.module
        hooks = [
            module.register_forward_pre_hook(PrivateHook(self.enter), with_kwargs=True),
            module.register_forward_hook(PrivateHook(self.leave), with_kwargs=True, always_call=True),
        ]
        if self.binding.own_code_only:
            # every submodule, not only children: a parent may call its grandchildren (for layer in self.blocks)
            for child in list(module.modules())[1:]:
                # first: a fully_shard submodule gathers its weights in its own pre-hook, unwatched
                hooks.append(child.register_forward_pre_hook(PrivateHook(self.child_enter), with_kwargs=True,
                                                             prepend=True))
                hooks.append(child.register_forward_hook(PrivateHook(self.child_leave), with_kwargs=True,
                                                         always_call=True))
        return hooks

    @torch.compiler.disable  # hooks record with Python side effects: keep them out of compiled graphs
    def enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.recording():
            self._recorders.append(None)
            return
        inputs = tensors((args, kwargs))
        # looked up now: fully_shard puts gathered tensors in the module while it runs
        current = {n: module.get_parameter(n) for n in self.binding.params}
        values = {n: p.detach().clone() for n, p in current.items()} if self.copy_values else None
        recorder = OpTapRecorder({id(p): n for n, p in current.items()}, inputs, self.on_use, values)
        self._recorders.append(recorder)
        recorder.__enter__()

    @torch.compiler.disable
    def leave(self, module: nn.Module, args: tuple, kwargs: dict, output):
        recorder = self._recorders.pop() if self._recorders else None
        if recorder is None:
            return None
        recorder.__exit__(None, None, None)
        return recorder.crossing(output, f"is returned by '{self.binding.name or '<root>'}'")

    @torch.compiler.disable
    def child_enter(self, child: nn.Module, args: tuple, kwargs: dict):
        recorder = self._recorders[-1] if self._recorders else None
        if recorder is None:
            return None
        outermost = not recorder.suspended
        recorder.suspend()  # first: the crossing's own torch calls are not to be watched
        return recorder.crossing((args, kwargs), f"enters {type(child).__name__}") if outermost else None

    @torch.compiler.disable
    def child_leave(self, child: nn.Module, args: tuple, kwargs: dict, output) -> None:
        if self._recorders and self._recorders[-1] is not None:
            self._recorders[-1].resume((args, kwargs), output)

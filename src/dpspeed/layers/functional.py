"""Generic fallback: per-sample gradients of any module's own parameters through torch.func.

The module's forward is replayed on each example (vmap over a batch of one) and pulled back
with that example's output gradient. Exact for any module whose forward treats examples
independently; one extra forward and backward of the module in cost.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..capture.records import Call
from .rule import LayerRule


def per_example_pullback(
    outputs: Callable[[dict[str, torch.Tensor], Any], tuple],
    params: dict[str, torch.Tensor],
    inputs: Any,
    in_dims: Any,
    call: Call,
    pause_recording: Callable,
    what: str,
) -> dict[str, torch.Tensor]:
    """For every example (vmapped; each keeps a batch dimension of 1), the vector-Jacobian product of
    `outputs(params, example_inputs)` with that example's output gradients (zeros where none came)."""
    grads = tuple(call.grads_or_zeros())

    def one_example(example_inputs: Any, example_grads: tuple) -> dict[str, torch.Tensor]:
        _, pullback = vjp(lambda p: outputs(p, example_inputs), params)
        return pullback(tuple(g.unsqueeze(0) for g in example_grads))[0]

    with pause_recording(), torch.no_grad(), contextlib.ExitStack() as autocast:
        for device, dtype in call.autocast:
            autocast.enter_context(torch.autocast(device, dtype))
        try:
            return vmap(one_example, in_dims=(in_dims, 0), randomness="error")(inputs, grads)
        except RuntimeError as err:
            if "randomness" in str(err):
                raise RuntimeError(
                    f"{what} uses randomness (e.g. dropout) and has no exact per-sample rule; "
                    "set its dropout to 0 or give it a rule"
                ) from err
            raise


@contextlib.contextmanager
def constant_inside(uses: list[tuple[nn.Module, str]]):
    """While each (child, name) runs its forward, its parameter `name` (its own, or a dotted name
    of one of its children's) is detached: a replay then differentiates only the uses outside those
    children (a tied weight's other uses are theirs)."""
    handles = []
    for child, name in uses:
        prefix, _, leaf = name.rpartition(".")
        owner = child.get_submodule(prefix)
        swapped = []

        def detach(module: nn.Module, args, owner=owner, leaf=leaf, swapped=swapped) -> None:
            swapped.append(owner._parameters[leaf])
            owner._parameters[leaf] = swapped[-1].detach()

        def restore(module: nn.Module, args, output, owner=owner, leaf=leaf, swapped=swapped) -> None:
            owner._parameters[leaf] = swapped.pop()

        handles += [child.register_forward_pre_hook(detach), child.register_forward_hook(restore, always_call=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class FunctionalRule(LayerRule):
    """Handles the given parameters of a module (its own, or of children it uses directly). Uses of
    them by children bound to a rule of their own (`bound_inside`: (child, its name for it)) are
    those rules' to differentiate: the replay holds them constant there, counting each use once."""

    def __init__(self, pause_recording: Callable):
        self.pause_recording = pause_recording
        self.bound_inside: list[tuple[nn.Module, str]] = []

    def per_sample_grads(self, module: nn.Module, call: Call, names: list[str]) -> dict[str, torch.Tensor]:
        batch = call.batch_size
        leaves, spec = tree_flatten((call.args, call.kwargs))
        batched = [isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == batch for t in leaves]
        inputs = [t.unsqueeze(1) if b else t for t, b in zip(leaves, batched)]
        indices = call.output_spec.indices

        def outputs(p: dict[str, torch.Tensor], example_inputs: list) -> tuple:
            args, kwargs = tree_unflatten(example_inputs, spec)
            with constant_inside(self.bound_inside):
                out_leaves, _ = tree_flatten(functional_call(module, p, args, kwargs))
            return tuple(out_leaves[i] for i in indices)

        params = {n: module.get_parameter(n).detach() for n in names}
        in_dims = [0 if b else None for b in batched]
        return per_example_pullback(outputs, params, inputs, in_dims, call, self.pause_recording,
                                    f"{type(module).__name__}'s forward")

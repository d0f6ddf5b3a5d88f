"""Bare parameters (a ViT's cls_token and pos_embed, LayerScale's gamma, StdConv2d's weight): per-example
gradients from the torch ops that combined them with the batch (recorded by `capture/op_taps.py`),
each replayed one example at a time and pulled back with that example's output gradient. The rest
of the network is never replayed (the torch.func fallback would replay all of the module's forward).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..capture.records import OpUse
from .functional import per_example_pullback
from .rule import LayerRule


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
        try:
            return per_example_pullback(outputs, values, batched, 0, call, self.pause_recording,
                                        f"an op on {type(module).__name__}'s parameters")
        except RuntimeError as err:
            if "Mismatch in shape" not in str(err):
                raise
            raise RuntimeError(
                f"{getattr(call.func, '__name__', call.func)} on the parameters {names} of {type(module).__name__} cannot be replayed for one "
                "example: a tensor computed from them alone was expanded to the batch in a dimension other than "
                "the first. Expand it to (batch, ...) instead, or make the parameter one of a module that has "
                "a rule") from err

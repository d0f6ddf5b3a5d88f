"""Examples must not interact: the check, made once before any gradient is taken, that changing one
example's inputs leaves every other example's outputs unchanged.

Per-example clipping bounds what an example contributes through its own gradient. A model whose
output for one example depends on another (a batch-centering layer, `x - x.mean(0)`; a layer
mixing rows through a parameter; a sequence-first tensor whose length equals the batch size, so
that attention runs across examples) lets an example move the others' gradients too, which no
clipping bounds. The check runs the model twice without gradients, with the same random state:
on the batch, and with example 0's inputs changed (floating-point inputs shifted, integer inputs
such as token ids replaced by another example's).
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from .loss_check import MeanDenominatorCheck
from .trace import replayable

logger = logging.getLogger(__name__)

#: relative change of another example's output that counts as an interaction
TOLERANCE = 1e-3


def _changed_first_example(args: tuple, kwargs: dict, rows: int) -> tuple[tuple, dict]:
    def change(t):
        if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != rows or t.dtype == torch.bool:
            return t
        t = t.clone()
        if t.is_floating_point() or t.is_complex():
            t[0] += 4 * (t.float().std() + 1).to(t.dtype) * torch.ones_like(t[0]).uniform_(0.5, 1.5)
        else:
            differs = next((i for i in range(1, rows) if not torch.equal(t[i], t[0])), None)
            if differs is not None:
                t[0] = t[differs]
        return t

    return tree_map(change, (args, kwargs))


def _batched_outputs(output, rows: int) -> list[torch.Tensor]:
    return [t for t in tree_flatten(output)[0]
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() > 0 and t.shape[0] == rows]


def _row_changes(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row, the largest change from `a` to `b` (NaN left NaN is no change; NaN appearing is an
    infinite one), in float64."""
    a, b = a.double(), b.double()
    same = (a == b) | (a.isnan() & b.isnan())
    change = torch.where(same, 0.0, (a - b).abs().nan_to_num(nan=float("inf")))
    return change.reshape(len(change), -1).amax(1)


def _magnitude(a: torch.Tensor) -> float:
    """The largest finite absolute value of `a` (the scale a change is measured against)."""
    return float(a.double().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).abs().max())


class _FirstInputs:
    """While entered: each call's first tensor input of the watched modules, in call order."""

    def __init__(self, watched: list[tuple[str, nn.Module]]):
        self.watched = watched
        self.seen: list[tuple[str, nn.Module, torch.Tensor]] = []
        self._handles: list = []

    def __enter__(self) -> _FirstInputs:
        for name, module in self.watched:
            def record(module: nn.Module, args: tuple, name: str = name) -> None:
                first = args[0] if args else None
                if isinstance(first, torch.Tensor) and first.dim() > 0 and first.dtype != torch.bool:
                    self.seen.append((name, module, first.detach().clone()))
            self._handles.append(module.register_forward_pre_hook(record))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()


def _check_row_layout(before: _FirstInputs, after: _FirstInputs, rows: int) -> None:
    """Each watched layer reads dimension 0 of its input as the batch, example i's rows being the
    block [i k, (i + 1) k) of its B k rows. Changing example 0 may move only the block [0, k): a
    sequence-first tensor (T, B, ...) whose T is a multiple of B would otherwise be clipped as T
    examples of the wrong rows, and one example could contribute more than the bound."""
    for (name, module, a), (_, _, b) in zip(before.seen, after.seen):
        if a.shape != b.shape or a.shape[0] % rows:
            continue
        k = a.shape[0] // rows
        if a.is_floating_point():
            moved = _row_changes(a, b) > TOLERANCE * (_magnitude(a) + 1e-12)
        else:  # token ids
            moved = (a != b).reshape(len(a), -1).any(1)
        if bool(moved[k:].any()):
            raise ValueError(
                f"the model mixes the examples of a batch before {type(module).__name__} at '{name or '<root>'}', or "
                f"that layer's input's first dimension is not the batch: changing example 0 changed rows of its input "
                f"(shape {tuple(a.shape)}) beyond example 0's first {k}. dpspeed reads dimension 0 of a layer's input "
                f"as the {rows} examples ({k} row(s) each, in blocks), and clipping bounds an example only if no other "
                "example's rows move with it. Look for layers that mix the batch (BatchNorm, x - x.mean(0)) and for "
                "sequence-first tensors (batch_first=False)"
            )


def check_examples_independent(model: nn.Module, args: tuple, kwargs: dict, rows: int,
                               watched: list[tuple[str, nn.Module]] = ()) -> None:
    """Raise ValueError naming the output that changed when another example's inputs did, or the
    `watched` layer (name, module) whose input is not laid out batch first (`_check_row_layout`).
    Call it with recording paused; the random state and the model's buffers are left as they were.
    A loss the model computes itself is checked on the way (`loss_check.MeanDenominatorCheck`).
    With fewer than two rows there is nothing to compare, but the model still runs twice, so that
    the ranks of a sharded model make the same collectives."""
    watched = list(watched) if rows >= 2 else []
    with replayable(model) as rewind, torch.no_grad():
        changed_args, changed_kwargs = _changed_first_example(args, kwargs, rows) if rows >= 2 else (args, kwargs)
        rewind()
        with MeanDenominatorCheck(rows), _FirstInputs(watched) as inputs_before:  # and a loss the model computes
            before = _batched_outputs(model(*args, **kwargs), rows)
        rewind()
        with _FirstInputs(watched) as inputs_after:
            after = _batched_outputs(model(*changed_args, **changed_kwargs), rows)
    if rows < 2:
        return
    _check_row_layout(inputs_before, inputs_after, rows)
    if not before:
        logger.warning("the model's output has no tensor with one row per example, so dpspeed could not check that "
                       "the examples of a batch do not interact; make sure they do not")
    for k, (a, b) in enumerate(zip(before, after)):
        change, scale = float(_row_changes(a[1:], b[1:]).max()), _magnitude(a[1:])
        if change > TOLERANCE * (scale + 1e-12):
            raise ValueError(
                f"the model mixes the examples of a batch: changing example 0's inputs changed the output {k} of "
                f"other examples (by up to {change:.3g}). Each example's gradient would depend on the others, "
                "and no clipping bounds what one example then contributes. Look for layers that mix the batch "
                "(BatchNorm, x - x.mean(0)) and for tensors laid out sequence-first (batch_first=False)"
            )

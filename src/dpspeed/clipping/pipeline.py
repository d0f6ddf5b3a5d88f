"""The clipping pipeline, from one recorded pass (inputs and output gradients of every bound
module) to the sum of clipped per-example gradients:

1. squared norms: per parameter and example, by the ghost trick or from explicit gradients, as the
   chooser decides per binding;
2. factors: per clipping group and example, from the group's norm and threshold;
3. clipped sums: sum_i C_i g_i per parameter, from explicit gradients where kept, by book-keeping
   (a^T diag(C) g) elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch.utils._pytree import tree_map

from ..capture.records import Binding, Call, Recording
from ..layers import keep_gram_norms
from ..layers.precision import (ROW_NORMS, ROW_SUMS, STACKED_ROWS_LIMIT, squared_row_norms_together, to_acc,
                                weighted_sum, weighted_sums_together, without_autocast)
from ..profiling import section
from .config import ClippingConfig
from .groups import Grouping
from .methods import EXPLICIT, LayerMethod

Sums = dict[str, torch.Tensor]


@dataclass(eq=False)
class PassFactors:
    """One pass after its norms: each group's clipping factor per example, and what the sums need."""

    calls: dict[Binding, list[Call]]
    methods: dict[Binding, LayerMethod]
    explicit: Sums  # per-example gradients (B, *shape) of the parameters whose norms were explicit
    factors: torch.Tensor  # (groups, batch), already scaled back to the recorded gradients
    batch: int
    nonfinite: int
    #: for the metrics (`monitoring`), per example: its squared norm over this pass's groups, whether
    #: it exceeds a group's threshold, and whether it counts (a real example, its norm finite)
    sq_norm: torch.Tensor | None = None
    over: torch.Tensor | None = None
    counted: torch.Tensor | None = None


@dataclass(eq=False)
class ClippedPass:
    sums: Sums
    nonfinite: int
    sq_norm: torch.Tensor | None = None  # as in PassFactors
    over: torch.Tensor | None = None
    counted: torch.Tensor | None = None


def _per_sample(binding: Binding, call: Call) -> Sums:
    """Per-example gradients of one call, rows of one example summed when the batch was flattened."""
    grads = call.per_sample or binding.rule.per_sample_grads(binding.module, call, list(binding.params))
    k = call.rows_per_example
    if k == 1:
        return grads
    return {n: g.reshape(g.shape[0] // k, k, *g.shape[1:]).sum(1) for n, g in grads.items()}


def _clipped_sum(binding: Binding, call: Call, factors: Sums) -> Sums:
    k = call.rows_per_example
    if k > 1:
        factors = {n: f.repeat_interleave(k) for n, f in factors.items()}
    return binding.rule.clipped_sum(binding.module, call, list(binding.params), factors)


def _zero_rows(call: Call, keep: torch.Tensor) -> Call:
    """The call with every tensor row of a dropped example set to zero."""
    keep = keep.repeat_interleave(call.rows_per_example)
    batch = keep.shape[0]

    def mask(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() > 0 and t.shape[0] == batch:
            return torch.where(keep.view(-1, *[1] * (t.dim() - 1)), t, torch.zeros((), dtype=t.dtype, device=t.device))
        return t

    grads = [mask(g) for g in call.output_grads]
    zeroed = Call(tree_map(mask, call.args), tree_map(mask, call.kwargs), grads, call.output_spec, call.rows_per_example,
                  {})
    if call.per_sample is not None:
        zeroed.per_sample = {n: mask(g) for n, g in call.per_sample.items()}
    return zeroed


def _add(sums: Sums, name: str, value: torch.Tensor) -> None:
    sums[name] = sums[name] + value if name in sums else value


def _choose_methods(calls: dict[Binding, list[Call]], config: ClippingConfig) -> dict[Binding, LayerMethod]:
    """Each binding's method; a parameter used by several calls or bindings, and a batch seen
    flattened, take explicit gradients (their per-example sum is formed before the norm)."""
    users: dict[str, int] = {}
    for binding in calls:
        for name in binding.params.values():
            users[name] = users.get(name, 0) + 1
    config.chooser.prepare(calls)
    methods = {}
    for binding, cs in calls.items():
        shared = len(cs) > 1 or any(users[n] > 1 for n in binding.params.values())
        flattened = any(c.rows_per_example > 1 for c in cs)
        methods[binding] = EXPLICIT if shared or flattened else config.chooser(binding, cs)
    return methods


def _squared_norms(calls: dict[Binding, list[Call]], methods: dict[Binding, LayerMethod]) -> tuple[Sums, Sums]:
    """Per parameter, the squared per-example norms (float32) and, where explicit, the gradients.
    Where the sum comes by book-keeping, the norm is raised by what rounding inside that sum can
    add (`LayerRule.sum_rounding`), so that the factor bounds what is actually added."""
    explicit: Sums = {}
    for binding, cs in calls.items():
        if not methods[binding].ghost_norm:
            for call in cs:
                for n, g in _per_sample(binding, call).items():
                    _add(explicit, binding.params[n], g)
    sq_norms = _norms_together(calls, methods, explicit)
    rounding: Sums = {}
    for binding, cs in calls.items():
        local = list(binding.params)
        for call in cs:
            if methods[binding].ghost_norm:  # first: the rounding bound reuses what it computes
                for n, v in binding.rule.ghost_sq_norms(binding.module, call, local).items():
                    _add(sq_norms, binding.params[n], to_acc(v))
            if not methods[binding].reuse:
                for n, v in binding.rule.sum_rounding(binding.module, call, local).items():
                    _add(rounding, binding.params[n], to_acc(v))
    if rounding:  # (n + extra)^2 for every such parameter at once
        names = list(rounding)
        raised = (_stacked([sq_norms[n] for n in names]).sqrt() + _stacked([rounding[n] for n in names])).square()
        sq_norms.update(zip(names, raised.unbind(0)))
    return sq_norms, explicit


def _norms_together(calls: dict[Binding, list[Call]], methods: dict[Binding, LayerMethod], explicit: Sums) -> Sums:
    """The norms that many layers of a pass share launches for: the ghost norms of every weight
    whose norm is one Gram inner product (one fused launch per shape where the kernel runs), and
    the squared row norms of small per-example tensors (biases', norm layers'), stacked by shape.
    The ghost rules' are kept in each call's cache for the rule; those of `explicit` are returned."""
    layers, rows, owners = [], list(explicit.values()), []
    for binding, cs in calls.items():
        if methods[binding].ghost_norm:
            local = list(binding.params)
            for call in cs:
                operands = binding.rule.gram_operands(binding.module, call, local)
                if operands is not None:
                    layers.append((call, *operands))
                for name, x in binding.rule.row_operands(binding.module, call, local).items():
                    owners.append((call, name))
                    rows.append(x)
    if len(layers) > 1:
        keep_gram_norms(layers)
    norms = squared_row_norms_together(rows)
    for (call, name), norm in zip(owners, norms[len(explicit):]):
        call.cache.setdefault(ROW_NORMS, {})[name] = norm
    return dict(zip(explicit, norms[: len(explicit)]))


def _stacked(rows: list[torch.Tensor]) -> torch.Tensor:
    """(len(rows), batch), in the widest of their dtypes."""
    dtype = rows[0].dtype
    for row in rows[1:]:
        dtype = torch.promote_types(dtype, row.dtype)
    return torch.stack([row.to(dtype) for row in rows])


def _group_norms(sq_norms: Sums, grouping: Grouping, batch: int) -> torch.Tensor:
    """(groups, batch): the norm of each example's gradient over each group's parameters."""
    device = next(iter(sq_norms.values())).device if sq_norms else torch.device("cpu")
    totals = []
    for names in grouping.groups:
        members = [sq_norms[n] for n in names if n in sq_norms]
        if len(members) > 1:
            totals.append(_stacked(members).sum(0))
        else:
            totals.append(members[0] if members else torch.zeros(batch, device=device))
    return _stacked(totals).sqrt()


@torch.no_grad()
@without_autocast()
def clip_factors(recorded: Recording, config: ClippingConfig, row_mask: torch.Tensor | None = None) -> PassFactors | None:
    """Per-example norms of every group and their clipping factors; None for an empty pass. With a
    mean-reduced loss the recorded gradients carry a 1/batch factor, undone so that each example's
    gradient is that of its own loss. Padding rows (`row_mask` False) and examples with a
    non-finite gradient get factor 0."""
    calls = {b: [c for c in cs if c.has_grads] for b, cs in recorded.items()}
    calls = {b: cs for b, cs in calls.items() if cs}
    if not calls:
        return None
    first = next(iter(calls.values()))[0]
    batch = first.batch_size // first.rows_per_example
    if batch == 0:
        return None
    loss_scale = float(batch) if config.loss_reduction == "mean" else 1.0
    methods = _choose_methods(calls, config)
    sq_norms, explicit = _squared_norms(calls, methods)
    grouping = config.grouping
    norms = _group_norms(sq_norms, grouping, batch) * loss_scale
    factors = torch.stack([config.clip_fn(norms[m], r) for m, r in enumerate(grouping.thresholds)]) * loss_scale
    if row_mask is not None:  # padding rows of a fixed-shape batch contribute nothing
        keep = row_mask.to(factors.device)
        factors = factors * keep
        norms = torch.where(keep, norms, torch.zeros_like(norms))
    finite = torch.isfinite(norms).all(0)
    counted = finite if row_mask is None else finite & row_mask.to(finite.device)
    nonfinite = 0
    if not bool(finite.all()):
        nonfinite = int((~finite).sum())
        factors = torch.where(finite, factors, torch.zeros_like(factors))
        explicit = {n: _zero_rows(Call((g,), {}, [g]), finite).args[0] for n, g in explicit.items()}
        calls = {b: [_zero_rows(c, finite) for c in cs] for b, cs in calls.items()}
    bounds = torch.tensor(grouping.thresholds, device=norms.device, dtype=norms.dtype)[:, None]
    return PassFactors(calls, methods, explicit, factors, batch, nonfinite, norms.square().sum(0),
                       (norms > bounds).any(0), counted)


@torch.no_grad()
def clipped_sums(pf: PassFactors, grouping: Grouping) -> Iterator[Sums]:
    """sum_i C_i g_i, layer by layer in the pass's order, each parameter once: from explicit
    gradients where kept (every use of a shared parameter is explicit), by book-keeping elsewhere."""

    per_group = list(pf.factors)  # one tensor per group for every layer (their 16-bit casts are kept)

    def factor(name: str) -> torch.Tensor:
        return per_group[grouping.group_of[name]]

    small = _small_sums_together(pf, factor)
    done: set[str] = set()
    for binding, cs in pf.calls.items():
        names = [n for n in binding.params.values() if n not in done]
        done.update(names)
        if not names:
            continue
        method = pf.methods[binding]
        if method.reuse and not method.ghost_norm:
            yield {name: small.pop(name) if name in small else weighted_sum(factor(name), pf.explicit[name])
                   for name in names}
            continue
        sums: Sums = {}
        local_factors = {n: factor(g) for n, g in binding.params.items()}
        for call in cs:
            for n, s in _clipped_sum(binding, call, local_factors).items():
                _add(sums, binding.params[n], s)
        yield {name: sums[name] for name in names}  # in the binding's order, which every rank shares


def _small_sums_together(pf: PassFactors, factor: Callable[[str], torch.Tensor]) -> Sums:
    """The clipped sums of small per-example tensors (`weighted_sums_together`): of the rules'
    `row_operands` in book-keeping layers, kept in each call's cache for its rule's `clipped_sum`,
    and of the small explicit gradients the sums reuse (at most STACKED_ROWS_LIMIT coordinates per
    example: the others are summed layer by layer, as they are handed on), returned by name."""
    def small(name: str) -> bool:
        return name in pf.explicit and math.prod(pf.explicit[name].shape[1:]) <= STACKED_ROWS_LIMIT

    explicit = list(dict.fromkeys(name for binding in pf.calls if pf.methods[binding] == EXPLICIT
                                  for name in binding.params.values() if small(name)))
    terms = [(factor(name), pf.explicit[name]) for name in explicit]
    owners = []
    for binding, cs in pf.calls.items():
        if not pf.methods[binding].reuse:
            local = list(binding.params)
            for call in cs:
                if call.rows_per_example == 1:
                    for name, x in binding.rule.row_operands(binding.module, call, local).items():
                        owners.append((call, name))
                        terms.append((factor(binding.params[name]), x))
    sums = weighted_sums_together(terms)
    for (call, name), total in zip(owners, sums[len(explicit):]):
        call.cache.setdefault(ROW_SUMS, {})[name] = total
    return dict(zip(explicit, sums[: len(explicit)]))


def clip_pass(recorded: Recording, config: ClippingConfig, row_mask: torch.Tensor | None = None,
              on_sums: Callable[[Sums], None] | None = None) -> ClippedPass:
    """Clip each example of one pass per group and sum. With `on_sums`, each layer's sums go to it
    as soon as they are formed (and are not kept in the result)."""
    with section("norms"):
        pf = clip_factors(recorded, config, row_mask)  # (without autocast, as the sums below)
    if pf is None:
        release(recorded)
        return ClippedPass({}, 0)
    sums: Sums = {}
    with section("clipped sums"), without_autocast():
        for part in clipped_sums(pf, config.grouping):
            if on_sums is None:
                sums.update(part)
            else:
                on_sums(part)
    release(recorded)
    return ClippedPass(sums, pf.nonfinite, pf.sq_norm, pf.over, pf.counted)


def release(recorded: Recording) -> None:
    """Drop the kept tensors of every call of a clipped pass."""
    for calls in recorded.values():
        for call in calls:
            call.release()

"""From one recorded pass (inputs and output gradients of every handled module) to the sum of
clipped per-example gradients: per-parameter squared norms, per-group factors, weighted sums."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch.utils._pytree import tree_map

from .clipping import ClipFunction
from .controller import Pass
from .grouping import Grouping
from .handlers import Handler
from .layers.base import Call, acc_dtype, to_acc, weighted_sum
from .layers.functional import batch_size
from .sections import section



@dataclass(frozen=True)
class LayerMethod:
    """How one handler contributes: its norms by the ghost trick or from explicit per-sample
    gradients, and its clipped sum by reusing those gradients or by book-keeping (a^T diag(C) g)."""

    ghost_norm: bool
    reuse: bool


EXPLICIT = LayerMethod(ghost_norm=False, reuse=True)
MethodChooser = Callable[[Handler, list[Call]], LayerMethod]


@dataclass
class ClippedPass:
    sums: dict[str, torch.Tensor]
    nonfinite: int


def _per_sample(handler: Handler, call: Call) -> dict[str, torch.Tensor]:
    """Per-example gradients of one call, rows of one example summed when the batch was flattened."""
    grads = handler.rule.per_sample_grads(handler.module, call, list(handler.params))
    k = call.rows_per_example
    if k == 1:
        return grads
    return {n: g.reshape(g.shape[0] // k, k, *g.shape[1:]).sum(1) for n, g in grads.items()}


def _clipped_sum(handler: Handler, call: Call, factors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    k = call.rows_per_example
    if k > 1:
        factors = {n: f.repeat_interleave(k) for n, f in factors.items()}
    return handler.rule.clipped_sum(handler.module, call, list(handler.params), factors)


def _zero_rows(call: Call, keep: torch.Tensor) -> Call:
    """The call with every tensor row of a dropped example set to zero."""
    keep = keep.repeat_interleave(call.rows_per_example)
    batch = keep.shape[0]

    def mask(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() > 0 and t.shape[0] == batch:
            return torch.where(keep.view(-1, *[1] * (t.dim() - 1)), t, torch.zeros((), dtype=t.dtype, device=t.device))
        return t

    grads = [mask(g) for g in call.output_grads]
    return Call(tree_map(mask, call.args), tree_map(mask, call.kwargs), grads, call.output_spec, call.rows_per_example, {})


@dataclass
class PassFactors:
    """One pass after its norms: each group's clipping factor per example, and what the sums need."""

    calls: dict[Handler, list[Call]]
    methods: dict[Handler, LayerMethod]
    explicit: dict[str, torch.Tensor]
    factors: torch.Tensor  # (groups, batch), already scaled back to the recorded gradients
    batch: int
    nonfinite: int


@torch.no_grad()
def clip_factors(
    recorded: Pass, grouping: Grouping, clip_fn: ClipFunction, loss_reduction: str, choose: MethodChooser,
    row_mask: torch.Tensor | None = None,
) -> PassFactors | None:
    """Per-example norms of every group and their clipping factors; None for an empty pass. With a
    mean-reduced loss the recorded gradients carry a 1/batch factor, undone so that each example's
    gradient is that of its own loss."""
    calls = {h: [c for c in cs if c.has_grads] for h, cs in recorded.items()}
    calls = {h: cs for h, cs in calls.items() if cs}
    if not calls:
        return None
    users: dict[str, int] = {}
    for handler in calls:
        for name in handler.params.values():
            users[name] = users.get(name, 0) + 1
    first = next(iter(calls.values()))[0]
    batch = batch_size(first) // first.rows_per_example
    if batch == 0:
        return None
    loss_scale = float(batch) if loss_reduction == "mean" else 1.0

    prepare = getattr(choose, "prepare", None)
    if prepare is not None:
        prepare(calls)
    methods: dict[Handler, LayerMethod] = {}
    for handler, cs in calls.items():
        shared = len(cs) > 1 or any(users[n] > 1 for n in handler.params.values())
        flattened = any(c.rows_per_example > 1 for c in cs)
        methods[handler] = EXPLICIT if shared or flattened else choose(handler, cs)

    sq_norms: dict[str, torch.Tensor] = {}
    explicit: dict[str, torch.Tensor] = {}

    def add_norm(name: str, value: torch.Tensor) -> None:
        sq_norms[name] = sq_norms[name] + value if name in sq_norms else value

    for handler, cs in calls.items():
        local = list(handler.params)
        for call in cs:
            if methods[handler].ghost_norm:
                for n, v in handler.rule.ghost_sq_norms(handler.module, call, local).items():
                    add_norm(handler.params[n], to_acc(v))
                continue
            for n, g in _per_sample(handler, call).items():
                name = handler.params[n]
                explicit[name] = explicit[name] + g if name in explicit else g
    for name, g in explicit.items():
        add_norm(name, torch.linalg.vector_norm(g.flatten(1), dim=1, dtype=acc_dtype(g.dtype)).square())

    group_sq = torch.stack(
        [sum((sq_norms[n] for n in names if n in sq_norms), torch.zeros(batch, device=_device(sq_norms)))
         for names in grouping.groups]
    )
    norms = group_sq.sqrt() * loss_scale
    factors = torch.stack([clip_fn(norms[m], r) for m, r in enumerate(grouping.thresholds)]) * loss_scale
    if row_mask is not None:  # padding rows of a fixed-shape batch contribute nothing
        keep = row_mask.to(factors.device)
        factors = factors * keep
        norms = torch.where(keep, norms, torch.zeros_like(norms))
    finite = torch.isfinite(norms).all(0)
    nonfinite = 0
    if not bool(finite.all()):
        nonfinite = int((~finite).sum())
        factors = torch.where(finite, factors, torch.zeros_like(factors))
        explicit = {n: _zero_rows(Call((g,), {}, [g]), finite).args[0] for n, g in explicit.items()}
        calls = {h: [_zero_rows(c, finite) for c in cs] for h, cs in calls.items()}
    return PassFactors(calls, methods, explicit, factors, batch, nonfinite)


@torch.no_grad()
def clipped_sums(pf: PassFactors, grouping: Grouping) -> Iterator[dict[str, torch.Tensor]]:
    """sum_i C_i g_i, layer by layer in the pass's order, each parameter once: from explicit
    gradients where kept (every use of a shared parameter is explicit), by book-keeping elsewhere."""

    def factor(name: str) -> torch.Tensor:
        return pf.factors[grouping.group_of[name]]

    done: set[str] = set()
    for handler, cs in pf.calls.items():
        names = [n for n in handler.params.values() if n not in done]
        done.update(names)
        if not names:
            continue
        method = pf.methods[handler]
        if method.reuse and not method.ghost_norm:
            yield {name: weighted_sum(factor(name), pf.explicit[name]) for name in names}
            continue
        sums: dict[str, torch.Tensor] = {}
        local_factors = {n: factor(g) for n, g in handler.params.items()}
        for call in cs:
            for n, s in _clipped_sum(handler, call, local_factors).items():
                name = handler.params[n]
                sums[name] = sums[name] + s if name in sums else s
        yield {name: sums[name] for name in names}  # in the handler's order, which every rank shares


def clip_pass(
    recorded: Pass, grouping: Grouping, clip_fn: ClipFunction, loss_reduction: str, choose: MethodChooser,
    row_mask: torch.Tensor | None = None, on_sums: Callable[[dict[str, torch.Tensor]], None] | None = None,
) -> ClippedPass:
    """Clip each example of one pass per group and sum. With `on_sums`, each layer's sums go to it
    as soon as they are formed (and are not kept in the result)."""
    with section("norms"):
        pf = clip_factors(recorded, grouping, clip_fn, loss_reduction, choose, row_mask)
    if pf is None:
        release(recorded)
        return ClippedPass({}, 0)
    sums: dict[str, torch.Tensor] = {}
    with section("clipped sums"):
        for part in clipped_sums(pf, grouping):
            if on_sums is None:
                sums.update(part)
            else:
                on_sums(part)
    release(recorded)
    return ClippedPass(sums, pf.nonfinite)


def release(recorded: Pass) -> None:
    """Drop the kept tensors of every call of a clipped pass."""
    for calls in recorded.values():
        for call in calls:
            call.release()


def _device(tensors: dict[str, torch.Tensor]) -> torch.device:
    return next(iter(tensors.values())).device if tensors else torch.device("cpu")

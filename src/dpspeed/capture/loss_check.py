"""Examples must not interact in the loss either: the checks, made at the first training step,
that the loss is a sum of terms each depending on one example's outputs.

The model-side check (`independence.py`) cannot see what the user computes from the model's
outputs. So the outputs of the first training forward pass are handed back as `WatchedTensor`s,
which follow the loss computation through every torch call, and three things are checked:
- a broadcast that expands an output against a tensor whose batch dimension is laid out
  differently (a (B, 1) output against (B,) targets, which compares every example with every
  other) is refused at the call that makes it;
- `cross_entropy` and `nll_loss` with `reduction="mean"` over targets weighted by class, or some
  of which are ignored (`ignore_index`) in numbers that differ between examples, divide by a
  count the whole batch sets, and are refused;
- when `backward()` is called on a watched loss, the part of the graph between the loss and the
  outputs is differentiated twice: for a loss that is a sum of per-example terms, the Hessian
  with respect to the outputs has no block linking two examples, so a Hessian-vector product
  with a probe on one example is exactly zero on every other example. A contrastive loss, a
  batch-mean penalty or a normalisation over the batch gives a non-zero there, and is refused.
  A loss computed inside the model is differentiated against the model's own outputs.
The same mean computed inside the model (a transformers model given labels) is refused while
the first training forward pass's independence check runs the model (`independence.py`). Not seen: such a mean computed by other code than torch's
two losses, and anything after the first step. After the check, torch calls on
watched tensors return plain tensors.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Callable, ContextManager

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

logger = logging.getLogger(__name__)

#: the calls that broadcast their tensor arguments against each other, element by element
_ELEMENTWISE = {
    torch.add, torch.sub, torch.mul, torch.div, torch.pow, torch.maximum, torch.minimum,
    torch.Tensor.add, torch.Tensor.sub, torch.Tensor.mul, torch.Tensor.div, torch.Tensor.pow,
    torch.Tensor.__add__, torch.Tensor.__radd__, torch.Tensor.__sub__, torch.Tensor.__rsub__,
    torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.Tensor.__truediv__, torch.Tensor.__rtruediv__,
    torch.Tensor.__pow__, F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss,
}

#: the losses whose mean divides by a count that the batch's targets set (kept or weighted targets)
TARGET_MEANS = {F.cross_entropy, F.nll_loss}

#: outputs with more elements are not checked (the check holds about three more copies of them)
MAX_CHECKED = 1 << 28

#: a value of the Hessian-vector product on another example, relative to the probed example's, that
#: counts as a link (for a per-example loss it is exactly zero)
TOLERANCE = 1e-6


def check_mean_denominator(func, args: tuple, kwargs: dict, rows: int | None) -> None:
    """Refuse cross_entropy or nll_loss averaged over the batch's targets when its denominator
    depends on the other examples: class weights, or targets left out by ignore_index in numbers
    that differ between the batch's `rows` examples (the same number for each, as a language
    model's shifted labels leave, divides every example's loss by the same count: no link)."""
    bound = inspect.signature(func).bind(*args, **kwargs)
    bound.apply_defaults()
    call = bound.arguments
    if call["reduction"] != "mean" or call["size_average"] is not None or call["reduce"] is not None:
        return
    target = call["target"]
    if call["weight"] is None:
        if target.is_floating_point():
            return
        left_out = target == call["ignore_index"]
        if not bool(left_out.any()):
            return
        if rows and target.numel() % rows == 0:
            per_example = left_out.reshape(rows, -1).sum(1)
            if bool((per_example == per_example[0]).all()):
                return
    why = "weights its targets by class" if call["weight"] is not None else (
        f"leaves out different numbers of each example's targets (ignore_index={call['ignore_index']})")
    raise ValueError(
        f"{func.__name__}(reduction='mean') {why}, so it divides by a count the whole batch sets and no "
        "example's gradient is its own: one example could move every other's. Take each example's own loss "
        "(reduction='none', then sum or average over that example's targets) and average those over the batch, "
        "or use reduction='sum' with loss_reduction='sum'"
    )


class MeanDenominatorCheck(TorchFunctionMode):
    """Applies `check_mean_denominator` to the losses a model computes itself (a transformers model
    given labels), while the model runs (the first training forward pass's independence check)."""

    def __init__(self, rows: int | None):
        super().__init__()
        self.rows = rows

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in TARGET_MEANS:
            check_mean_denominator(func, args, kwargs, self.rows)
        return func(*args, **kwargs)


class LossWatch:
    """One first training step's watch: the outputs to differentiate against, and the batch size."""

    def __init__(self, rows: int, paused: Callable[[], ContextManager], originals: list[torch.Tensor]):
        self.rows = rows
        self.paused = paused  # the recording's hooks ignore what the check's derivatives pass them
        self.watched: list[torch.Tensor] = []  # the outputs handed to the user
        #: the model's own output tensors, for a loss computed inside the model (empty for a sharded
        #: model: fully_shard's hooks on them would gather weights on this rank alone)
        self.originals = originals
        self.done = False

    def check_broadcast(self, func, args: tuple, kwargs: dict) -> None:
        """Refuse a broadcast that expands a watched tensor with one row per example against a tensor
        with one row per example laid out differently: example i then meets example j."""
        batched = [t for t in tree_flatten((args, kwargs))[0]
                   if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == self.rows]
        if len({t.dim() for t in batched}) < 2:
            return
        try:
            shape = torch.broadcast_shapes(*(t.shape for t in batched))
        except RuntimeError:
            return  # the call fails on its own
        if all(t.shape == shape for t in batched if isinstance(t, WatchedTensor)):
            return  # only the other operands are expanded (a per-position weight whose length is the batch's)
        shapes = " and ".join(str(tuple(t.shape)) for t in batched)
        raise ValueError(
            f"{getattr(func, '__name__', func)} broadcasts tensors of shapes {shapes} to {tuple(shape)}: their batch "
            f"dimensions ({self.rows} examples) do not line up, so every example meets every other in the loss, "
            "and no clipping bounds what one example then contributes. Give them the same shape (e.g. "
            "output.squeeze(-1), or target.unsqueeze(-1))"
        )

    def check_loss(self, loss: torch.Tensor) -> None:
        """Refuse a loss whose second derivative links two examples' outputs. Examples whose outputs
        are not finite (they are dropped by the clipping) are left out of the comparison."""
        self.done = True
        watched, originals, self.watched, self.originals = self.watched, self.originals, [], []  # no cycle
        if loss.dim() != 0 or not loss.requires_grad or not any(o.requires_grad for o in watched):
            return
        size = sum(o.numel() for o in watched)
        if size > MAX_CHECKED:
            logger.warning("dpspeed did not check that the loss keeps the examples apart: the model's outputs have "
                           "%d elements, and the check would hold about three more copies of them; make sure each "
                           "example's loss depends on its own outputs only", size)
            return
        finite = torch.stack([o.detach().reshape(o.shape[0], -1).isfinite().all(1) for o in watched]).all(0)
        if int(finite.sum()) < 2:
            return
        probed = int(finite.nonzero()[0])
        try:
            with self.paused():
                moved_rows = _hessian_products(loss, [watched, originals], probed)
        except RuntimeError as err:
            logger.warning("dpspeed could not check that the loss keeps the examples apart (its second derivative "
                           "failed: %s); make sure each example's loss depends on its own outputs only", err)
            return
        others = finite.clone()
        others[probed] = False
        for k, rows in enumerate(moved_rows):
            own, moved = float(rows[probed]), float(rows[others].max().nan_to_num(nan=float("inf")))
            if moved > TOLERANCE * own and moved > 0:
                raise ValueError(
                    f"the loss mixes the examples of a batch: its gradient for other examples moves with example "
                    f"{probed}'s output {k} (second derivative up to {moved:.3g}, against {own:.3g} for the example "
                    "itself). Each example's gradient would depend on the others, and no clipping bounds what one "
                    "example then contributes. Look for terms over the whole batch in the loss (a batch-mean "
                    "penalty, a normalisation over the batch, a contrastive loss) and compute them per example"
                )


def _hessian_products(loss: torch.Tensor, candidates: list[list[torch.Tensor]], probed: int) -> list[torch.Tensor]:
    """For H the loss's Hessian with respect to the first candidate outputs it depends on and v = 1
    on example `probed`'s outputs, 0 elsewhere: the largest |H·v| of each example (B,), float64;
    the graph is kept for the user's backward()."""
    for outputs in candidates:
        outputs = [o for o in outputs if o.requires_grad]
        grads = torch.autograd.grad(loss, outputs, create_graph=True, allow_unused=True)
        if any(g is not None for g in grads):
            break
    else:
        return []  # the loss does not use the outputs
    pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and g.requires_grad]
    if not pairs:
        raise RuntimeError("the gradient with respect to the outputs has no derivative: the loss is linear in them, "
                           "or computed by an autograd Function differentiable once")
    probes = []
    for o, _ in pairs:
        probe = torch.zeros_like(o)
        probe[probed] = 1.0
        probes.append(probe)
    products = torch.autograd.grad([g for _, g in pairs], [o for o, _ in pairs], grad_outputs=probes,
                                   allow_unused=True, retain_graph=True)
    return [p.detach().reshape(p.shape[0], -1).abs().amax(1).double()
            for p in products if p is not None and p[0].numel()]


class WatchedTensor(torch.Tensor):
    """A tensor of the first training step's loss computation (see the module's docstring)."""

    _watch: LossWatch

    def __reduce_ex__(self, protocol):
        """Saved as a plain tensor (the watch is the running engine's)."""
        with torch._C.DisableTorchFunctionSubclass():
            return self.as_subclass(torch.Tensor).__reduce_ex__(protocol)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.compiler.is_compiling():  # a compiled loss or step: not checked, and said so
            _unchecked_under_compile()
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        watch = next((t._watch for t in tree_flatten((args, kwargs))[0] if isinstance(t, WatchedTensor)), None)
        if watch is None or watch.done:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if func is torch.Tensor.backward:
            with torch._C.DisableTorchFunctionSubclass():
                watch.check_loss(args[0])
                return func(*args, **kwargs)
        if func in _ELEMENTWISE:
            watch.check_broadcast(func, args, kwargs)
        if func in TARGET_MEANS:
            check_mean_denominator(func, args, kwargs, watch.rows)
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
            return _watched(out, watch)


@torch.compiler.disable
def _unchecked_under_compile() -> None:
    global _told_compiled
    if not _told_compiled:
        _told_compiled = True
        logger.warning("dpspeed did not check that the loss keeps the examples apart: the loss is computed under "
                       "torch.compile; make sure each example's loss depends on its own outputs only (or let the "
                       "first step run the loss eagerly)")


_told_compiled = False


def _watched(tree: Any, watch: LossWatch) -> Any:
    leaves, spec = tree_flatten(tree)
    for i, leaf in enumerate(leaves):
        if type(leaf) is torch.Tensor and (leaf.is_floating_point() or leaf.is_complex()):
            leaves[i] = leaf.as_subclass(WatchedTensor)
            leaves[i]._watch = watch
        elif isinstance(leaf, WatchedTensor):
            leaf._watch = watch
    return tree_unflatten(leaves, spec)


def watch_loss(output: Any, rows: int, paused: Callable[[], ContextManager], sharded: bool) -> Any:
    """The model's output with its floating-point tensors watched down to the loss's backward();
    `paused()` is held while the check differentiates."""
    batched = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()
               and t.dim() > 0 and t.shape[0] == rows]
    watch = LossWatch(rows, paused, [] if sharded else batched)
    with torch._C.DisableTorchFunctionSubclass():
        watched = _watched(output, watch)
    watch.watched = [t for t in tree_flatten(watched)[0]
                     if isinstance(t, WatchedTensor) and t.dim() > 0 and t.shape[0] == rows]
    return watched

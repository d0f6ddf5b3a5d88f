"""The private optimizer: on every physical batch, clip and accumulate; on the last physical batch of
a logical batch, add Gaussian noise once to the sum, divide, and let the user's optimizer step."""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable

import torch
from torch.optim import Optimizer

from . import distributed, sharding
from .clipper import MethodChooser, clip_pass
from .clipping import ClipFunction
from .controller import Controller
from .grouping import Grouping
from .layers.base import acc_dtype, to_acc
from .sections import section

logger = logging.getLogger(__name__)


class DPOptimizer(Optimizer):
    """Wraps a torch optimizer; shares its param_groups and state, so LR schedulers work on it."""

    def __init__(
        self,
        optimizer: Optimizer,
        controller: Controller,
        grouping: Grouping,
        clip_fn: ClipFunction,
        choose: MethodChooser,
        noise_multiplier: float,
        expected_batch_size: float,
        loss_reduction: str,
        noise_generator: torch.Generator | None = None,
        two_pass: bool = False,
        process_group=None,
        shards: dict | None = None,
        shard_noise_generator: torch.Generator | None = None,
    ):
        self.original_optimizer = optimizer
        self.controller = controller
        self.grouping = grouping
        self.clip_fn = clip_fn
        self.choose = choose
        self.noise_multiplier = noise_multiplier
        self.expected_batch_size = expected_batch_size
        self.loss_reduction = loss_reduction
        self.noise_generator = noise_generator
        self.two_pass = two_pass  # ghost modes: the clipped sum arrives as autograd's .grad
        self.process_group = process_group  # the processes whose sums are added up (None: the world)
        #: parameters sharded by fully_shard: their sums are reduce-scattered as soon as they are formed
        self.shards = shards or {}
        self.shard_noise_generator = shard_noise_generator  # differs on every rank: one shard each
        self.param_groups = optimizer.param_groups
        self.defaults = optimizer.defaults
        self.state = optimizer.state
        self._optimizer_step_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict = OrderedDict()
        #: set by the DP data loader before each physical batch; True without one
        self.is_last_physical_batch = True
        #: set by the DP data loader for fixed-shape batches: False on padding rows
        self.row_mask: torch.Tensor | None = None
        self.summed: dict[str, torch.Tensor] = {}
        self.logical_steps = 0
        self.nonfinite_examples = 0
        self.on_logical_step: list[Callable[[], None]] = []
        self._granted: dict[str, tuple[torch.Tensor, int]] = {}  # the private gradients this optimizer set
        self._all_reduce: distributed.BucketedAllReduce | None = None

    def __repr__(self) -> str:
        return f"DPOptimizer({self.original_optimizer!r}, noise_multiplier={self.noise_multiplier})"

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the parameters' gradients and unconsumed recordings; clipped sums of earlier
        physical batches of the current logical batch are kept."""
        self.original_optimizer.zero_grad(set_to_none)
        self.controller.clear()

    def note_nonfinite(self, count: int) -> None:
        if count:
            self.nonfinite_examples += count
            logger.warning(
                "%d example(s) had a non-finite gradient and contributed nothing (%d so far)",
                count, self.nonfinite_examples,
            )

    def _add(self, name: str, s: torch.Tensor) -> None:
        if self._all_reduce is not None and name in self._all_reduce.started_names:
            raise RuntimeError(
                f"the clipped sum of {name!r} grew after its all-reduce had started: a forward or backward "
                "pass ran after the last physical batch's backward, before optimizer.step()"
            )
        self.summed[name] = self.summed[name] + s if name in self.summed else s

    def _reducer(self) -> distributed.BucketedAllReduce | None:
        """The bucketed all-reduce of the replicated parameters' sums; None in one process."""
        if self._all_reduce is None and distributed.active(self.process_group):
            replicated = {n: p for n, p in self.controller.params.items() if n not in self.shards}
            if replicated:
                self._all_reduce = distributed.BucketedAllReduce(replicated, self.process_group)
        return self._all_reduce

    def _start_final_buckets(self, released) -> None:
        """On the last physical batch, the sums that no pending recording adds to are final: their
        buckets' all-reduce starts now, during the backward pass."""
        if self.two_pass or not self.is_last_physical_batch or self._reducer() is None:
            return
        pending = {n for recorded in self.controller.passes for h in recorded for n in h.params.values()}
        names = {n for h in released for n in h.params.values() if n not in self.shards} - pending
        with section("all-reduce"):
            self._all_reduce.final(names, self.summed)

    def accumulate(self) -> None:
        """Clip the examples of every recorded pass and add them to the running sums."""
        if self.two_pass:
            if self.controller.take_passes():
                raise RuntimeError(
                    "the ghost clipping modes need the criterion returned by make_private: "
                    "loss = criterion(model(x), y); loss.backward()"
                )
            for name, p in self.controller.params.items():
                if p.grad is not None:
                    self._add(name, to_acc(p.grad))
                    p.grad = None
            return
        self._refuse_autograd_gradients()
        for recorded in self.controller.take_passes():  # at the step: the buckets start in finish()
            self.clip_and_add(recorded, self.grouping, start_buckets=False)

    def _refuse_autograd_gradients(self) -> None:
        """Invariant: only private gradients reach the optimizer. A parameter .grad that this
        optimizer did not set (or that changed since) was computed by autograd from a forward pass
        that ran without dpspeed's hooks, so no clipping happened: refuse it loudly."""
        for name, p in self.controller.params.items():
            if p.grad is None:
                continue
            granted = self._granted.get(name)
            if granted is None or p.grad is not granted[0] or p.grad._version != granted[1]:
                raise RuntimeError(
                    f"parameter {name!r} received a gradient from autograd: the forward pass ran without "
                    "dpspeed's hooks, so no example was clipped (a torch.compile graph compiled for another "
                    "copy of the model reused without the hooks, or a call that bypasses module hooks). "
                    "Compile only after make_private and only the private model, or run it uncompiled"
                )

    def clip_and_add(self, recorded, grouping: Grouping, start_buckets: bool = True) -> None:
        """Clip one recorded pass (or a released part of one) and add it to the running sums; on
        the last physical batch, start the all-reduce of buckets whose sums are now final."""
        if not self.shards:
            clipped = clip_pass(recorded, grouping, self.clip_fn, self.loss_reduction, self.choose, self.row_mask)
            for name, s in clipped.sums.items():
                self._add(name, s)
        else:
            clipped = self._clip_and_reduce_to_shards(recorded, grouping)
        self.note_nonfinite(clipped.nonfinite)
        if start_buckets:
            self._start_final_buckets(recorded)

    def _clip_and_reduce_to_shards(self, recorded, grouping: Grouping):
        """Reduce-scatter each layer's sums of sharded parameters as soon as they are formed, keeping
        only this rank's shard. Every rank goes through the pass's layers in the same order, with
        zeros where it has no examples, so the collectives match."""
        order = dict.fromkeys(n for h, calls in recorded.items() if any(c.has_grads for c in calls)
                              for n in h.params.values() if n in self.shards)
        pending = iter(order)

        def reduce(name: str, full: torch.Tensor) -> None:
            with section("reduce-scatter"):
                self._add(name, sharding.reduce_to_shard(full, self.shards[name]))

        def on_sums(part: dict[str, torch.Tensor]) -> None:
            for name, s in part.items():
                if name not in self.shards:
                    self._add(name, s)
                    continue
                if next(pending, None) != name:
                    raise RuntimeError(f"the clipped sum of {name!r} came out of order; ranks would not match")
                reduce(name, s)
            part.clear()  # the full sums go as soon as they are scattered

        clipped = clip_pass(recorded, grouping, self.clip_fn, self.loss_reduction, self.choose, self.row_mask, on_sums)
        for name in pending:  # no examples here: zeros, for the other ranks' collectives
            param = self.shards[name]
            reduce(name, torch.zeros(param.shape, dtype=acc_dtype(param.dtype), device=sharding.compute_device(param)))
        return clipped

    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.accumulate()
        if self.is_last_physical_batch:
            self._privatise_and_step()
        return loss

    def _privatise_and_step(self) -> None:
        std = self.noise_multiplier * self.grouping.total_threshold
        if self._reducer() is not None:
            with section("all-reduce"):
                self.summed.update(self._all_reduce.finish(self.summed))
        with section("noise"):
            for name, p in self.controller.params.items():
                sharded = name in self.shards
                total = self.summed.pop(name, None)  # owned here: updated in place
                if total is None:
                    total = sharding.zeros_for_shard(p, acc_dtype(p.dtype)) if sharded else torch.zeros_like(p, dtype=acc_dtype(p.dtype))
                if std > 0:
                    generator = self.shard_noise_generator if sharded else self.noise_generator
                    noise = torch.randn(total.shape, generator=generator, device=total.device, dtype=total.dtype)
                    total.add_(noise, alpha=std)
                    del noise
                if self.loss_reduction == "mean":
                    total.div_(self.expected_batch_size)
                p.grad = sharding.as_sharded_grad(total, p) if sharded else total.to(p.dtype)
        with section("update"):
            self.original_optimizer.step()
        self._granted = {n: (p.grad, p.grad._version) for n, p in self.controller.params.items() if p.grad is not None}
        self.summed = {}
        self.logical_steps += 1
        for callback in self.on_logical_step:
            callback()

    def add_param_group(self, param_group: dict) -> None:
        raise RuntimeError("add parameter groups before make_private: new parameters would not be privatised")

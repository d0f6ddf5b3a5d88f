"""The private optimizer. One logical batch runs through named phases:

- `begin_physical_batch(last, row_mask)` — told by the data loader before each physical batch;
- `accumulate` — at every `step()`: clip the recordings and add them to float32 (float64 for
  float64 models) running sums
  (early release may already have clipped parts of a pass during its backward pass);
- on the last physical batch: `reduce` (add the ranks' sums up), `add_noise` (Gaussian noise once,
  to the sum), `scale` (divide by the expected batch size for a mean-reduced loss), then the
  gradients are set and the user's optimizer steps.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable

import torch
from torch.optim import Optimizer

from .capture.hooks import Controller
from .capture.records import Recording
from .clipping.config import ClippingConfig
from .clipping.pipeline import ClippedPass, clip_pass
from .clipping.two_pass import autograd_sums
from .layers.precision import acc_dtype
from .noise import NoiseSource, SecureNoiseSource
from .parallel import data_parallel, fsdp
from .parallel.topology import Topology
from .profiling import section

logger = logging.getLogger(__name__)


class _GrantedGradients:
    """Invariant: only private gradients reach the optimizer. Remembers the gradients this
    optimizer set, so that any other parameter .grad (autograd's, from a forward pass that ran
    without dpspeed's hooks, or of a parameter made trainable after make_private) is refused loudly."""

    def __init__(self) -> None:
        self._granted: dict[str, tuple[torch.Tensor, int]] = {}

    @staticmethod
    def refuse_late_parameters(param_groups: list[dict], private: dict[str, torch.nn.Parameter]) -> None:
        """A parameter of the optimizer that make_private did not privatise (frozen then, unfrozen
        or added to a parameter group since) would be stepped with its raw gradient."""
        known = {id(p) for p in private.values()}
        for group in param_groups:
            for p in group["params"]:
                if p.grad is not None and id(p) not in known:
                    raise RuntimeError(
                        f"a parameter of shape {tuple(p.shape)} has a gradient but was not trainable in the model "
                        "when make_private was called (unfrozen, or added to the optimizer, since): it would be "
                        "updated with its raw gradient, neither clipped nor noised. Make it trainable before "
                        "make_private (engine.detach(), then make_private again)"
                    )

    def grant(self, params: dict[str, torch.nn.Parameter]) -> None:
        self._granted = {n: (p.grad, p.grad._version) for n, p in params.items() if p.grad is not None}

    def refuse_others(self, params: dict[str, torch.nn.Parameter]) -> None:
        for name, p in params.items():
            if p.grad is None:
                continue
            granted = self._granted.get(name)
            if granted is None or p.grad is not granted[0] or p.grad._version != granted[1]:
                raise RuntimeError(
                    f"parameter {name!r} received a gradient from autograd, which no example's clipping bounds. "
                    "Either a term of the loss uses the parameters themselves (a weight penalty such as "
                    "lambda * w.square().sum(): use the optimizer's weight_decay instead, which looks at no data), "
                    "or the forward pass ran without dpspeed's hooks (a call that bypasses module hooks, such as "
                    "model.forward(x) instead of model(x), or another copy of the model), or (ghost, mix-ghost) a "
                    "loss other than the criterion make_private returned was backpropagated: put every term of the "
                    "loss into that criterion's per-example losses"
                )


#: the key that marks the param groups of a private optimizer's checkpoint
PRIVATE_MARK = "dpspeed_private"


class DPOptimizer(Optimizer):
    """Wraps a torch optimizer; shares its param_groups and state, so LR schedulers work on it.

    Callback: `on_logical_step(f)`: f() after every step of the user's optimizer."""

    #: torch.amp.GradScaler hands its scale to such an optimizer's step (which refuses it, clearly)
    _step_supports_amp_scaling = True

    def __init__(
        self,
        optimizer: Optimizer,
        controller: Controller,
        clipping: ClippingConfig,
        noise: NoiseSource | SecureNoiseSource,
        noise_multiplier: float,
        expected_batch_size: float,
        topology: Topology | None = None,
    ):
        self.original_optimizer = optimizer
        self.controller = controller
        self.clipping = clipping
        self.noise = noise
        self.noise_multiplier = noise_multiplier
        self.expected_batch_size = expected_batch_size
        self.topology = topology or Topology()
        self.param_groups = optimizer.param_groups
        self.defaults = optimizer.defaults
        self.state = optimizer.state
        self._optimizer_step_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict = OrderedDict()
        self.is_last_physical_batch = True
        self.row_mask: torch.Tensor | None = None  # fixed-shape batches: False on padding rows
        self._announced = False  # the data loader announced a physical batch not stepped yet
        self.summed: dict[str, torch.Tensor] = {}
        self.logical_steps = 0
        self.nonfinite_examples = 0
        self.noise_only_steps = 0  # logical batches whose sums were not finite
        self._on_logical_step: list[Callable[[], None]] = []
        self._before_logical_step: list[Callable[[], None]] = []
        #: this logical batch's recorded passes and, per example of each, [squared norm, over a
        #: threshold, counted], summed over the pass's released parts; only while metrics are watched
        self.step_norms: list[tuple[Recording, list[torch.Tensor]]] | None = None
        self._granted = _GrantedGradients()
        self._all_reduce: data_parallel.BucketedAllReduce | None = None
        #: the engine's privacy state (save, restore, and what to do without it): in every checkpoint
        #: of this optimizer, so that resuming the optimizer cannot leave the accountant behind
        self.privacy_state: tuple[Callable[[], dict], Callable[[dict], None], Callable[[], None]] | None = None

    def __repr__(self) -> str:
        return f"DPOptimizer({self.original_optimizer!r}, noise_multiplier={self.noise_multiplier})"

    @property
    def max_grad_norm(self) -> float:
        """What one example's clipped gradient can contribute at most: the norm of the groups'
        thresholds (max_grad_norm itself under all-layer clipping), which the noise is scaled to."""
        return self.clipping.grouping.total_threshold

    def on_logical_step(self, callback: Callable[[], None]) -> None:
        """Call `callback()` after each logical step (noise added, parameters updated)."""
        self._on_logical_step.append(callback)

    def before_logical_step(self, callback: Callable[[], None]) -> None:
        """Call `callback()` before each logical step releases anything; it may raise to refuse it."""
        self._before_logical_step.append(callback)

    # ----------------------------------------------------------------------------- physical batches
    def begin_physical_batch(self, last: bool, row_mask: torch.Tensor | None = None, starting: bool = False,
                             rows: int | None = None) -> None:
        """The next physical batch: whether it ends its logical batch, which of its rows are real
        examples (None: all), whether it starts a new pass over the data loader, and how many rows
        it has (None: unknown; the first forward pass tells). Within a pass,
        every physical batch must be stepped; a logical batch left unfinished by a pass broken off
        is dropped when the next pass starts, never carried into it."""
        if starting and (self._announced or self.summed or self.controller.recordings):
            logger.warning("a logical batch was left unfinished (the loop over the data loader was broken off): "
                           "its examples are dropped; no step was taken or accounted for them")
            self.discard_logical_batch()
        if self._announced:
            raise RuntimeError(
                "the previous physical batch was not stepped: call optimizer.step() after every batch the data "
                "loader returned by make_private yields; it groups them into logical batches itself"
            )
        self.controller.new_physical_batch(rows)
        self.is_last_physical_batch, self.row_mask, self._announced = last, row_mask, True

    # ----------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """The wrapped optimizer's state dict, with the engine's privacy state under "dpspeed" and its
        param groups marked (PRIVATE_MARK), so that loading it into a torch optimizer (which drops the
        privacy state) before make_private leaves epsilon refused until the state is restored."""
        state = self.original_optimizer.state_dict()
        if self.privacy_state is not None:
            state["dpspeed"] = self.privacy_state[0]()
            for group in state["param_groups"]:  # kept by a torch optimizer that loads this: make_private sees it
                group[PRIVATE_MARK] = True
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the wrapped optimizer and, from a checkpoint of this optimizer, the engine's
        privacy state; a state dict without it (a non-private optimizer's) leaves epsilon refused
        until the engine's state is restored."""
        state_dict = dict(state_dict)
        privacy = state_dict.pop("dpspeed", None)
        self.original_optimizer.load_state_dict(state_dict)
        self.param_groups, self.state = self.original_optimizer.param_groups, self.original_optimizer.state
        if self.privacy_state is not None:
            if privacy is not None:
                self.privacy_state[1](privacy)
            else:
                self.privacy_state[2]()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the parameters' gradients and what backward passes recorded; a forward pass whose
        backward is still to come (Lightning zeroes there), and the clipped sums of earlier physical
        batches of the current logical batch, are kept."""
        self.original_optimizer.zero_grad(set_to_none)
        if not set_to_none:
            self.grant_gradients()  # zeros, in place: no example's gradient
        self.controller.clear(keep_forward=True)

    def discard_logical_batch(self) -> None:
        """Forget the clipped sums and recordings of the current logical batch (after a failed step);
        the two-pass modes' sums, in .grad, too."""
        self.summed = {}
        if self.clipping.two_pass:
            for p in self.controller.params.values():
                p.grad = None
        self._announced = False
        self.controller.clear()
        if self.step_norms is not None:
            self.step_norms = []
        if self._all_reduce is not None:
            self._all_reduce.reset()

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

    def accumulate(self) -> None:
        """Clip the examples of every recording and add them to the running sums."""
        self._granted.refuse_late_parameters(self.param_groups, self.controller.params)
        if self.clipping.two_pass:
            if self.controller.take_recordings():
                raise RuntimeError(
                    "the ghost clipping modes need the criterion returned by make_private: "
                    "loss = criterion(model(x), y); loss.backward()"
                )
            self.refuse_unclipped_gradients()  # only the second passes' sums are in .grad
            for name, s in autograd_sums(self.controller.params).items():
                self._add(name, s)
            return
        self.refuse_unclipped_gradients()
        for recorded in self.controller.take_recordings():  # at the step: the buckets start in reduce()
            self.clip_and_add(recorded, self.clipping, start_buckets=False)

    def refuse_unclipped_gradients(self) -> None:
        """Raise where a parameter holds a gradient that no example's clipping bounds."""
        self._granted.refuse_others(self.controller.params)

    def grant_gradients(self) -> None:
        """The parameters' gradients are clipped sums (the two-pass modes' second backward pass)."""
        self._granted.grant(self.controller.params)

    def clip_and_add(self, recorded: Recording, clipping: ClippingConfig, start_buckets: bool = True,
                     source: Recording | None = None) -> None:
        """Clip one recorded pass (or a released part of `source`, a pass) and add it to the running
        sums; on the last physical batch, start the all-reduce of buckets whose sums are now final."""
        def clip(on_sums=None) -> ClippedPass:
            return clip_pass(recorded, clipping, self.row_mask, on_sums)

        if self.topology.shards:
            clipped = fsdp.clip_with_shards(recorded, self.topology.shards, clip, self._add)
        else:
            clipped = clip()
            for name, s in clipped.sums.items():
                self._add(name, s)
        self.note_nonfinite(clipped.nonfinite)
        if self.step_norms is not None and clipped.sq_norm is not None:
            self._note_norms(source if source is not None else recorded, clipped)
        if start_buckets:
            self._start_final_buckets(recorded)

    def _note_norms(self, source: Recording, clipped) -> None:
        """Add a released part's per-example numbers to its pass's (the parts hold disjoint groups)."""
        for seen, numbers in self.step_norms:
            if seen is source:
                numbers[0] = numbers[0] + clipped.sq_norm
                numbers[1] = numbers[1] | clipped.over
                numbers[2] = numbers[2] & clipped.counted
                return
        self.step_norms.append((source, [clipped.sq_norm, clipped.over, clipped.counted]))

    # ----------------------------------------------------------------------------- across processes
    def _reducer(self) -> data_parallel.BucketedAllReduce | None:
        """The bucketed all-reduce of the replicated parameters' sums; None in one process."""
        if self._all_reduce is None and self.topology.distributed:
            replicated = {n: p for n, p in self.controller.params.items() if n not in self.topology.shards}
            if replicated:
                self._all_reduce = data_parallel.BucketedAllReduce(replicated, self.topology.group)
        return self._all_reduce

    def _start_final_buckets(self, released: Recording) -> None:
        """On the last physical batch, the sums that no pending recording adds to are final: their
        buckets' all-reduce starts now, during the backward pass."""
        if self.clipping.two_pass or not self.is_last_physical_batch or self._reducer() is None:
            return
        pending = {n for recorded in self.controller.recordings for b in recorded for n in b.params.values()}
        names = {n for b in released for n in b.params.values() if n not in self.topology.shards} - pending
        with section("all-reduce"):
            self._all_reduce.final(names, self.summed)

    def reduce(self) -> None:
        """Add up the replicated parameters' sums of all ranks (sharded ones were reduce-scattered
        as they were formed)."""
        if self._reducer() is not None:
            with section("all-reduce"):
                self.summed.update(self._all_reduce.finish(self.summed))

    # ----------------------------------------------------------------------------- the logical step
    def _complete_sums(self) -> None:
        """Give every parameter a sum, in the parameters' order (which every rank shares, so that
        each draws the same noise for the same parameter): zeros where no example reached it. (At
        most what a logical batch that reached every parameter holds.)"""
        summed = {}
        for name, p in self.controller.params.items():
            total = self.summed.pop(name, None)
            if total is None:
                dtype = acc_dtype(p.dtype)
                sharded = name in self.topology.shards
                total = fsdp.zeros_for_shard(p, dtype) if sharded else torch.zeros_like(p, dtype=dtype)
            summed[name] = total
        self.summed = summed

    def add_noise(self) -> None:
        """N(0, (sigma * ||R||)^2) once per coordinate of the sum."""
        std = self.noise_multiplier * self.clipping.grouping.total_threshold
        self.noise.new_step()
        if std > 0:
            shards = self.topology.shards
            self.noise.add_to([s for n, s in self.summed.items() if n not in shards], std)
            self.noise.add_to([s for n, s in self.summed.items() if n in shards], std, sharded=True)

    def scale(self) -> None:
        """A mean-reduced loss: divide by the expected batch size, not the realised one."""
        if self.clipping.loss_reduction == "mean" and self.summed:
            torch._foreach_div_(list(self.summed.values()), self.expected_batch_size)

    def _set_gradients(self) -> None:
        for name, p in self.controller.params.items():
            total = self.summed.pop(name)
            p.grad = fsdp.as_sharded_grad(total, p) if name in self.topology.shards else total.to(p.dtype)

    def step(self, closure: Callable[[], float] | None = None):
        if getattr(self, "grad_scale", None) is not None:
            raise RuntimeError(
                "torch.amp.GradScaler is not supported: a scaled loss scales every example's gradient, so "
                "clipping to max_grad_norm would clip at max_grad_norm / scale. Train under bf16 autocast (it "
                "needs no loss scaling) or in float32, and call optimizer.step() directly"
            )
        if not self._announced:
            raise RuntimeError(
                "optimizer.step() on a batch that the data loader returned by make_private did not yield (does "
                "the loop run over the original loader?): the privacy accounting assumes dpspeed's Poisson batches"
            )
        if self.is_last_physical_batch:
            try:
                for check in self._before_logical_step:
                    check()
            except BaseException:  # refused: nothing of this batch stays (the two-pass modes' sums are in p.grad)
                self.discard_logical_batch()
                for p in self.controller.params.values():
                    p.grad = None
                raise
        self._announced = False
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.accumulate()
        if self.is_last_physical_batch:
            self.reduce()
            if not self._sums_are_finite():
                self._drop_the_sums()
            with section("noise"):
                self._complete_sums()
                self.add_noise()
                self.scale()
                self._set_gradients()
            with section("update"):
                self.original_optimizer.step()
            self.grant_gradients()
            self.summed = {}
            self.logical_steps += 1
            for callback in self._on_logical_step:
                callback()
        return loss

    def _sums_are_finite(self) -> bool:
        """One fused check per device and dtype of every sum (and, for a sharded model, of every
        rank's shards)."""
        found = torch.zeros(1, dtype=torch.float32, device=self.topology.device)
        kinds: dict[tuple, list[torch.Tensor]] = {}
        for s in self.summed.values():
            kinds.setdefault((s.device, s.dtype), []).append(s)
        for (device, _), sums in kinds.items():
            flag = torch.zeros(1, dtype=torch.float32, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(sums, flag, torch.ones(1, dtype=torch.float32, device=device))
            found += flag.to(found.device)
        if self.topology.shards and self.topology.distributed:
            torch.distributed.all_reduce(found, op=torch.distributed.ReduceOp.MAX, group=self.topology.group)
        return not bool(found.item())

    def _drop_the_sums(self) -> None:
        """This logical step releases noise only, as for an empty batch, and is accounted: skipping it
        would tell an observer that something unusual was sampled."""
        self.noise_only_steps += 1
        logger.warning("the clipped sums of this logical batch are not finite (an overflow): this step adds noise "
                       "only (%d so far)", self.noise_only_steps)
        self.summed = {}

    def add_param_group(self, param_group: dict) -> None:
        raise RuntimeError("add parameter groups before make_private: new parameters would not be privatised")

"""The controller: hooks on a user's model that record what the clipping needs, and take
everything off again on detach. The model object is never wrapped or replaced.

While the model runs forward, its trainable parameters do not require gradients, so autograd
computes activation gradients only and never a non-private weight gradient; the clipped sums
computed from the recorded tensors take the weight gradients' place. On the first forward call
the model is traced once (`trace.py`) to bind each parameter to the module that uses it
(`bindings.py`); from then on every bound module's calls are recorded in a `Recording` per pass,
and their output gradients arrive in the backward pass.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ..layers.functional import FunctionalRule
from .copies import PrivateHook
from ..layers.param_ops import ParameterOpRule
from ..layers.rule import LayerRule
from ..parallel.fsdp import is_sharded
from .bindings import bind_parameters, owner_of
from .independence import check_examples_independent
from .loss_check import watch_loss
from .op_taps import OpTaps
from .own_forward import OwnForward
from .records import Binding, Call, OpUse, Recording, TapSpec
from .trace import trace_uses


def _batch_of(args: tuple, kwargs: dict) -> int | None:
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() > 0:  # the first leaf, without flattening
        return args[0].shape[0]
    for leaf in tree_flatten((args, kwargs))[0]:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return leaf.shape[0]
    return None


def _broadcaster(args: tuple, kwargs: dict, batch: int):
    """For a module called on inputs that do not come from the batch (position ids): a function
    giving each tensor of the call a batch dimension, so that its output gradient stays per
    example; None when the inputs already have one row per example (a buffer expanded to the batch).

    Inputs of leading size 1 are expanded, 1-d inputs get a batch dimension in front, inputs with
    `batch` rows are taken as per example, and anything else gets a batch dimension in front.
    """
    first = next((t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.dim() > 0), None)
    if first is None or (first.dim() > 1 and first.shape[0] == batch and batch != 1):
        return None
    leading_one = first.dim() > 1 and first.shape[0] == 1

    def expand(t):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return t
        if leading_one:
            return t.expand(batch, *t.shape[1:])
        return t.unsqueeze(0).expand(batch, *t.shape)

    return expand


def _bound_inside(binding: Binding, bindings: list[Binding]) -> list[tuple[nn.Module, str]]:
    """The uses of `binding`'s parameters by modules inside its module with a binding of their own
    (a tied embedding's lookup), as (that module, its name for the parameter)."""
    inside = {id(m) for m in binding.module.modules()} - {id(binding.module)}
    mine = set(binding.params.values())
    return [(other.module, local) for other in bindings if other is not binding and id(other.module) in inside
            for local, name in other.params.items() if name in mine]


class Controller:
    """Hooks on a model that record what the clipping needs; the model object is never replaced.

    Callbacks: `on_trace(f)`: f(order of first use) once the first forward pass has been traced;
    `on_grad(f)`: f(binding, call) as each output gradient of a recorded call arrives."""

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter], *, param_grads: bool = False):
        self.model = model
        self.params = params
        self.param_grads = param_grads  # True: leave autograd's parameter gradients on (two-pass ghost)
        self._slots = [(p, *owner_of(model, n)) for n, p in params.items()]
        self.bindings: list[Binding] = []
        self.recordings: list[Recording] = []  # one per physical batch, until clipped
        self._batch_recording: Recording | None = None  # the current physical batch's whole-batch passes'
        self._current: Recording | None = None  # where the pass now running records
        self._batch_rows: int | None = None
        self._parts, self._part_rows = 0, None  # passes over parts of the current physical batch, the last one's rows
        self._gradients_arrived = False  # in the current physical batch
        self._kept_by_zero_grad = False  # passes zero_grad kept for a backward still to come
        self._told_rows: int | None = None  # the physical batch's size as the loader told it
        self._independence_checked = False
        self._watch_rows: int | None = None  # the first training pass's batch: its output is watched to the loss
        self._sharded = any(is_sharded(p) for p in params.values())
        self.first_use_order: list[str] = list(params)
        self.traced = False
        self._paused = False
        self._root_hooks: list = []
        self._binding_hooks: list = []
        self._anchors: dict[torch.device, torch.Tensor] = {}
        self._on_trace: list[Callable[[list[str]], None]] = []
        self._on_grad: list[Callable[[Binding, Call], None]] = []
        self._unbatched: set[int] = set()
        self._root_taps: OpTaps | None = None
        self._pass_batch: int | None = None
        self._tapped: list[torch.Tensor] = []  # the recorded outputs, kept for the two-pass modes
        self._shared: dict[int, dict] = {}

    # ----------------------------------------------------------------------------- attach/detach
    def attach(self) -> None:
        # bound now to refuse unsupported layers early; their hooks go in after the first trace
        self.bindings = bind_parameters(self.model, self.params, None, self._fallback)
        # a model that is itself such a layer needs its forward routed before its first call fetches it
        self._binding_hooks = [OwnForward(b.module, self._make_recorded_forward(b)) for b in self.bindings
                               if b.module is self.model and b.rule.records_inside]
        self._root_hooks = [
            # first: under fully_shard, parameters stop requiring gradients before they are gathered
            self.model.register_forward_pre_hook(PrivateHook(self._root_pre_hook), with_kwargs=True, prepend=True),
            self.model.register_forward_hook(PrivateHook(self._root_post_hook), with_kwargs=True, always_call=True),
        ]

    def detach(self) -> None:
        for handle in self._root_hooks + self._binding_hooks:
            handle.remove()
        self._root_hooks, self._binding_hooks = [], []
        self._set_requires_grad(True)
        self.recordings.clear()
        self.bindings = []

    def on_trace(self, callback: Callable[[list[str]], None]) -> None:
        self._on_trace.append(callback)

    def on_grad(self, callback: Callable[[Binding, Call], None]) -> None:
        self._on_grad.append(callback)

    def _fallback(self, direct: bool) -> LayerRule:
        return ParameterOpRule(self.paused) if direct else FunctionalRule(self.paused)

    def _install(self, bindings: list[Binding]) -> None:
        for handle in self._binding_hooks:
            handle.remove()
        self.bindings = bindings
        self._binding_hooks = []
        self._root_taps = None
        for b in bindings:
            sharded = any(is_sharded(self.params[n]) for n in b.params.values())
            if isinstance(b.rule, FunctionalRule) and sharded:
                raise ValueError(
                    f"{type(b.module).__name__} at '{b.name or '<root>'}' needs the torch.func fallback, which "
                    "replays the module with its full weights; that is not supported under fully_shard. Give "
                    "it a rule, or keep its parameters out of the sharded modules"
                )
            if isinstance(b.rule, FunctionalRule) and any(isinstance(m, nn.RNNBase) for m in b.module.modules()):
                raise ValueError(
                    f"{type(b.module).__name__} at '{b.name or '<root>'}' uses {sorted(b.params.values())} in its own "
                    "code and needs the torch.func fallback, which replays it one example at a time; the recurrent "
                    "layer inside it cannot be replayed so. Use those parameters through a module of their own (an "
                    "nn.Linear head instead of F.linear(x, embed.weight)), or register a rule for it"
                )
            if isinstance(b.rule, FunctionalRule):
                b.rule.bound_inside = _bound_inside(b, bindings)
            if isinstance(b.rule, ParameterOpRule):
                taps = OpTaps(b, lambda use, leaves, b=b: self._on_op_use(b, use, leaves), self._recording, sharded)
                self._binding_hooks += taps.install()
                if b.module is self.model:
                    self._root_taps = taps
            elif b.rule.records_inside:
                self._binding_hooks.append(OwnForward(b.module, self._make_recorded_forward(b)))
            else:
                self._binding_hooks.append(b.module.register_forward_hook(PrivateHook(self._make_tap(b)), with_kwargs=True))

    @contextlib.contextmanager
    def paused(self):
        """Run the model without recording (the fallback's replays, the trace)."""
        previous, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = previous

    def _set_requires_grad(self, flag: bool) -> None:
        """Set it on the parameters, and on the gathered tensors fully_shard may have put in their place."""
        for p, module, local in self._slots:
            p.requires_grad_(flag)
            current = module._parameters.get(local)
            if current is not None and current is not p:
                current.requires_grad_(flag)

    # ----------------------------------------------------------------------------- forward hooks
    def _trace(self, args: tuple, kwargs: dict) -> None:
        """Bind every parameter to the modules that use it, from one traced forward pass."""
        with self.paused():
            uses = trace_uses(self.model, self.params, args, kwargs)
        self.first_use_order = uses.order + [n for n in self.params if n not in uses.order]
        self._unbatched = uses.unbatched_calls
        self._install(bind_parameters(self.model, self.params, uses, self._fallback))
        self.traced = True
        for callback in self._on_trace:
            callback(self.first_use_order)

    @torch.compiler.disable  # hooks record with Python side effects: keep them out of compiled graphs
    def _root_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._paused:
            return
        just_traced = not self.traced
        if just_traced:
            self._trace(args, kwargs)
        rows = _batch_of(args, kwargs)
        # checked at the first training forward pass (an evaluation pass may run another model: eval());
        # a sharded model's ranks at their first together (the check gathers weights)
        training = torch.is_grad_enabled() and module.training
        if not self._independence_checked and training and (self._sharded or (rows or 0) >= 2):
            self._independence_checked = True
            watched = [(b.name, b.module) for b in self.bindings  # the layers whose input rows are mapped to examples
                       if not b.rule.records_inside and not isinstance(b.rule, ParameterOpRule)]
            with self.paused():
                check_examples_independent(self.model, args, kwargs, rows or 0, watched)
            self._watch_rows = rows
        if torch.is_grad_enabled():
            self._begin_pass(rows)
            if not self.param_grads:
                self._set_requires_grad(False)
        if just_traced and self._root_taps is not None:
            self._root_taps.enter(module, args, kwargs)  # hooks added during this call do not run in it

    def _begin_pass(self, rows: int | None) -> None:
        """A recorded forward pass. A pass over all of the physical batch's rows records into the
        batch's one whole-batch recording: several such passes (two views of each example) are
        clipped together, row i being example i in each. A pass over part of the batch (a loop over
        examples or micro-batches, disjoint parts) gets a recording of its own. The two kinds are
        not mixed in one physical batch, since dpspeed could not tell which rows are which."""
        if self._kept_by_zero_grad:  # zero_grad, then a new pass before any backward: the kept one gets none
            self._discard_kept_passes()
        self._pass_batch = rows
        self._shared = {}  # inputs of this pass stay alive in its calls: their ids are unique
        if self._batch_rows is None:
            self._batch_rows = rows  # no loader told the batch's size: the first pass's
        whole = rows == self._batch_rows
        if (whole and self._parts) or (not whole and self._batch_recording is not None):
            part = self._part_rows if whole else rows
            raise RuntimeError(
                f"forward passes over all of a physical batch ({self._batch_rows} rows) and over part of it "
                f"({part} rows) in one step: dpspeed could not tell which rows are the same example. Pass all "
                "rows every time (views of each example), or only disjoint parts (a loop over examples)"
            )
        if not whole:
            self._parts, self._part_rows = self._parts + 1, rows
            self.recordings.append({})
            self._current = self.recordings[-1]
            return
        if self._batch_recording is not None and self._gradients_arrived:
            raise RuntimeError(
                "a forward pass after a backward pass in the same physical batch: each example would be clipped "
                "once per pass. Add the losses of all passes and call backward() once, then optimizer.step()"
            )
        if self._batch_recording is None:
            self._batch_recording = {}
            self.recordings.append(self._batch_recording)
        self._current = self._batch_recording

    def new_physical_batch(self, rows: int | None = None) -> None:
        """The next forward pass starts a new physical batch, of `rows` examples (None: unknown)."""
        self._batch_recording, self._current, self._batch_rows, self._told_rows = None, None, rows, rows
        self._gradients_arrived, self._parts, self._part_rows, self._kept_by_zero_grad = False, 0, None, False

    def _discard_kept_passes(self) -> None:
        """Drop the passes recorded before zero_grad (a forward pass outside torch.no_grad whose
        backward never came); a gradient that reaches them later is refused."""
        for recording in self.recordings:
            for calls in recording.values():
                for call in calls:
                    call.discarded = True
        self.recordings, self._tapped = [], []
        self.new_physical_batch(self._told_rows)

    @torch.compiler.disable
    def _root_post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output):
        if self._paused:
            return None
        if not self.param_grads:
            self._set_requires_grad(True)
        rows, self._watch_rows = self._watch_rows, None
        return watch_loss(output, rows, self.paused, self._sharded) if rows is not None and rows >= 2 else None

    def _anchor(self, device: torch.device) -> torch.Tensor:
        """A zero that requires grad: added to an output that would otherwise not need a gradient."""
        if device not in self._anchors:
            self._anchors[device] = torch.zeros((), device=device, requires_grad=True)
        anchor = self._anchors[device]
        anchor.grad = None
        return anchor

    def _tap_leaves(self, binding: Binding, call: Call, leaves: list, rows: int | None, broadcast=None) -> list:
        """Hook the gradient of every output leaf with one row per example (or per flattened row)."""
        indices, shapes = [], []
        for i, leaf in enumerate(leaves):
            if not (isinstance(leaf, torch.Tensor) and leaf.is_floating_point()):
                continue
            if broadcast is not None:
                leaf = leaves[i] = broadcast(leaf)
            if leaf.dim() == 0 or leaf.shape[0] != rows:
                if leaf.requires_grad:
                    raise RuntimeError(
                        f"{type(binding.module).__name__} at '{binding.name}' returns a tensor without the batch "
                        f"dimension (shape {tuple(leaf.shape)}); the per-sample gradients of "
                        f"{sorted(binding.params.values())} cannot be computed exactly"
                    )
                continue
            if not leaf.requires_grad:
                leaf = leaves[i] = leaf + self._anchor(leaf.device)
            if self.param_grads:
                self._tapped.append(leaf)
            slot = len(call.output_grads)
            call.output_grads.append(None)
            leaf.register_hook(lambda g, call=call, slot=slot: self._arrived(binding, call, slot, g))
            indices.append(i)
            shapes.append((leaf.shape, leaf.dtype, leaf.device))
        call.output_spec = TapSpec(indices, shapes)
        self._current.setdefault(binding, []).append(call)
        return leaves

    def _arrived(self, binding: Binding, call: Call, slot: int, grad: torch.Tensor) -> None:
        if self._paused:
            return  # a derivative taken by a check, not the training's backward pass
        if not self.param_grads and (call.released or call.per_sample is not None or call.output_grads[slot] is not None):
            raise RuntimeError(
                "a second backward pass through the same forward pass: its gradients would reach no clipped sum. "
                "Add the losses and call backward() once per forward pass"
            )
        if call.discarded:
            raise RuntimeError(
                "a backward pass through a forward pass made before optimizer.zero_grad() and followed by another "
                "forward pass: dpspeed dropped it as a pass whose backward would not come. Run forward passes that "
                "are not trained on under torch.no_grad(), and zero_grad before the forward pass or just after it")
        self._gradients_arrived, self._kept_by_zero_grad = True, False
        if self._shared:  # the pass's forward is over: what its calls share goes with them (released, not kept here)
            self._shared = {}
        call.output_grads[slot] = grad
        for callback in self._on_grad:
            callback(binding, call)

    def _rows_per_example(self, binding: Binding, rows: int | None, examples: int | None) -> int:
        if rows is None or not examples:
            return 1
        if rows % examples:
            raise RuntimeError(
                f"{type(binding.module).__name__} at '{binding.name}' got {rows} rows for a batch of {examples} "
                "examples; dpspeed cannot tell which rows belong to which example"
            )
        return rows // examples

    def _recording(self) -> bool:
        return not self._paused and torch.is_grad_enabled() and bool(self.recordings)

    def _make_tap(self, binding: Binding):
        @torch.compiler.disable
        def tap(module: nn.Module, args: tuple, kwargs: dict, output):
            if not self._recording():
                return None
            examples = self._pass_batch
            broadcast = None
            if id(module) in self._unbatched and examples is not None:
                broadcast = _broadcaster(args, kwargs, examples)
                if broadcast is not None:
                    args, kwargs = tree_map(broadcast, (args, kwargs))
            rows = _batch_of(args, kwargs)
            call = Call(args, kwargs, rows_per_example=self._rows_per_example(binding, rows, examples or rows))
            if args and isinstance(args[0], torch.Tensor):
                call.shared = self._shared.setdefault(id(args[0]), {})
            if isinstance(output, torch.Tensor):
                return self._tap_leaves(binding, call, [output], rows, broadcast)[0]
            leaves, spec = tree_flatten(output)
            return tree_unflatten(self._tap_leaves(binding, call, leaves, rows, broadcast), spec)

        return tap

    def _make_recorded_forward(self, binding: Binding):
        """The forward of a module whose rule records inside it: the rule's while recording, the
        module's own otherwise (evaluation, no_grad, the checks' replays)."""

        @torch.compiler.disable
        def forward(own: Callable, args: tuple, kwargs: dict):
            if not self._recording():
                return own(*args, **kwargs)

            def tap(inputs: tuple, leaves: list, info: dict | None = None) -> None:
                rows = inputs[0].shape[0]
                call = Call(inputs, kwargs=info or {},
                            rows_per_example=self._rows_per_example(binding, rows, self._pass_batch or rows))
                self._tap_leaves(binding, call, leaves, rows)

            return binding.rule.record_forward(binding.module, args, kwargs, tap)

        return forward

    def _on_op_use(self, binding: Binding, use: OpUse, leaves: list) -> list:
        """Tap the output of an op that combined a bound module's bare parameters with the batch."""
        rows = next((t.shape[0] for t in leaves if isinstance(t, torch.Tensor) and t.dim() > 0), None)
        use.rows_per_example = self._rows_per_example(binding, rows, self._pass_batch or rows)
        return self._tap_leaves(binding, use, leaves, rows)

    # ----------------------------------------------------------------------------- consumption
    def take_recordings(self) -> list[Recording]:
        """The recordings that received gradients; forgets everything recorded so far."""
        done = [r for r in self.recordings if any(c.has_grads for calls in r.values() for c in calls)]
        self._tapped = []
        self.recordings = []
        self.new_physical_batch()
        return done

    @property
    def recordings_taken(self) -> bool:
        """Whether a backward pass already took this physical batch's recordings."""
        return self._gradients_arrived

    def take_recordings_now(self) -> list[Recording]:
        """Every recording, before any gradient has arrived (the two-pass modes); forgets them. No
        further forward pass joins this physical batch."""
        recordings, self.recordings = self.recordings, []
        self._gradients_arrived, self._shared = True, {}
        return recordings

    def take_tapped(self) -> list[torch.Tensor]:
        tapped, self._tapped = self._tapped, []
        return tapped

    def clear(self, keep_forward: bool = False) -> None:
        """Forget the recordings; the physical batch's size stays known. `keep_forward` (zero_grad):
        keep them while no gradient of this physical batch has arrived, since zero_grad between a
        forward pass and its backward is valid PyTorch and must not drop the batch."""
        if keep_forward and not self._gradients_arrived:
            self._kept_by_zero_grad = bool(self.recordings)
            return
        self.recordings = []
        self._tapped = []
        self.new_physical_batch(self._told_rows)

"""Attach to a user's model without wrapping it: record each handled module's inputs in the forward
pass and its output gradients in the backward pass, and take everything off again on detach.

While the model runs forward, its trainable parameters do not require gradients, so autograd
computes activation gradients only and never a non-private weight gradient; the clipped sums
computed from the recorded tensors take the weight gradients' place.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .handlers import Handler, build_handlers, owner_of
from .layers.base import Call, LayerRule
from .layers.functional import FunctionalRule
from .layers.param_ops import OpTapRecorder, OpUse, ParameterOpRule
from .layers.registry import RULE_TYPES
from .sharding import is_sharded
from .trace import trace_uses



@dataclass
class TapSpec:
    """Which leaves of a module's output were tapped, with their shapes (for zero gradients)."""

    indices: list[int]
    shapes: list[tuple[torch.Size, torch.dtype, torch.device]]


Pass = dict[Handler, list[Call]]


def _batch_of(args: tuple, kwargs: dict) -> int | None:
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


class Controller:
    """Hooks on a model that record what the clipping needs; the model object is never replaced."""

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter], *, param_grads: bool = False):
        self.model = model
        self.params = params
        self.param_grads = param_grads  # True: leave autograd's parameter gradients on (two-pass ghost)
        self._slots = [(p, *owner_of(model, n)) for n, p in params.items()]
        self.handlers: list[Handler] = []
        self.passes: list[Pass] = []
        self.first_use_order: list[str] = list(params)
        self.traced = False
        self._paused = False
        self._root_hooks: list = []
        self._handler_hooks: list = []
        self._anchors: dict[torch.device, torch.Tensor] = {}
        self._on_trace: list = []
        self._unbatched: set[int] = set()
        self._root_enter = None
        self._pass_batch: int | None = None
        self._tapped: list[torch.Tensor] = []  # the recorded outputs, kept for the two-pass modes
        self._shared: dict[int, dict] = {}
        self.on_grad = None  # called with (handler, call) as each output gradient arrives

    # ----------------------------------------------------------------------------- attach/detach
    def attach(self) -> None:
        # built now to refuse unsupported layers early; their hooks go in after the first trace
        self.handlers = build_handlers(self.model, self.params, None, self._fallback)
        self._root_hooks = [
            # first: under fully_shard, parameters stop requiring gradients before they are gathered
            self.model.register_forward_pre_hook(self._root_pre_hook, with_kwargs=True, prepend=True),
            self.model.register_forward_hook(self._root_post_hook, with_kwargs=True, always_call=True),
        ]

    def detach(self) -> None:
        for handle in self._root_hooks + self._handler_hooks:
            handle.remove()
        self._root_hooks, self._handler_hooks = [], []
        self._set_requires_grad(True)
        self.passes.clear()
        self.handlers = []

    def on_trace(self, callback) -> None:
        """Call `callback(controller)` once the first forward pass has been traced."""
        self._on_trace.append(callback)

    def _fallback(self, direct: bool) -> LayerRule:
        return ParameterOpRule(self.paused) if direct else FunctionalRule(self.paused)

    def _install(self, handlers: list[Handler]) -> None:
        for handle in self._handler_hooks:
            handle.remove()
        self.handlers = handlers
        self._handler_hooks = []
        self._root_enter = None
        for h in handlers:
            if isinstance(h.rule, FunctionalRule) and any(is_sharded(self.params[n]) for n in h.params.values()):
                raise ValueError(
                    f"{type(h.module).__name__} at '{h.name or '<root>'}' needs the torch.func fallback, which "
                    "replays the module with its full weights; that is not supported under fully_shard. Give "
                    "it a rule, or keep its parameters out of the sharded modules"
                )
            if isinstance(h.rule, ParameterOpRule):
                self._handler_hooks += self._make_op_recording(h)
            else:
                self._handler_hooks.append(h.module.register_forward_hook(self._make_tap(h), with_kwargs=True))

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
    @torch.compiler.disable  # hooks record with Python side effects: keep them out of compiled graphs
    def _root_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._paused:
            return
        just_traced = not self.traced
        if just_traced:
            with self.paused():
                uses = trace_uses(self.model, self.params, args, kwargs)
            self.first_use_order = uses.order + [n for n in self.params if n not in uses.order]
            self._unbatched = uses.unbatched_calls
            self._install(build_handlers(self.model, self.params, uses, self._fallback))
            self.traced = True
            for callback in self._on_trace:
                callback(self)
        if torch.is_grad_enabled():
            self._pass_batch = _batch_of(args, kwargs)
            self._shared = {}  # inputs of this pass stay alive in its calls: their ids are unique
            self.passes.append({})
            if not self.param_grads:
                self._set_requires_grad(False)
        if just_traced and self._root_enter is not None:
            self._root_enter(module, args, kwargs)  # hooks added during this call do not run in it

    @torch.compiler.disable
    def _root_post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        if not self._paused and not self.param_grads:
            self._set_requires_grad(True)

    def _anchor(self, device: torch.device) -> torch.Tensor:
        """A zero that requires grad: added to an output that would otherwise not need a gradient."""
        if device not in self._anchors:
            self._anchors[device] = torch.zeros((), device=device, requires_grad=True)
        anchor = self._anchors[device]
        anchor.grad = None
        return anchor

    def _tap_leaves(self, handler: Handler, call: Call, leaves: list, rows: int | None, broadcast=None) -> list:
        """Hook the gradient of every output leaf with one row per example (or per flattened row)."""
        indices, shapes = [], []
        for i, leaf in enumerate(leaves):
            if not (isinstance(leaf, torch.Tensor) and leaf.is_floating_point()):
                continue
            if broadcast is not None:
                leaf = leaves[i] = broadcast(leaf)
            if leaf.dim() == 0 or leaf.shape[0] != rows:
                if leaf.requires_grad and not isinstance(handler.rule, RULE_TYPES):
                    raise RuntimeError(
                        f"{type(handler.module).__name__} at '{handler.name}' returns a tensor without the batch "
                        f"dimension (shape {tuple(leaf.shape)}); the per-sample gradients of "
                        f"{sorted(handler.params.values())} cannot be computed exactly"
                    )
                continue
            if not leaf.requires_grad:
                leaf = leaves[i] = leaf + self._anchor(leaf.device)
            if self.param_grads:
                self._tapped.append(leaf)
            slot = len(call.output_grads)
            call.output_grads.append(None)
            leaf.register_hook(lambda g, call=call, slot=slot: self._arrived(handler, call, slot, g))
            indices.append(i)
            shapes.append((leaf.shape, leaf.dtype, leaf.device))
        call.output_spec = TapSpec(indices, shapes)
        self.passes[-1].setdefault(handler, []).append(call)
        return leaves

    def _arrived(self, handler: Handler, call: Call, slot: int, grad: torch.Tensor) -> None:
        call.output_grads[slot] = grad
        if self.on_grad is not None:
            self.on_grad(handler, call)

    def _rows_per_example(self, handler: Handler, rows: int | None, examples: int | None) -> int:
        if rows is None or not examples:
            return 1
        if rows % examples:
            raise RuntimeError(
                f"{type(handler.module).__name__} at '{handler.name}' got {rows} rows for a batch of {examples} "
                "examples; dpspeed cannot tell which rows belong to which example"
            )
        return rows // examples

    def _recording(self) -> bool:
        return not self._paused and torch.is_grad_enabled() and bool(self.passes)

    def _make_tap(self, handler: Handler):
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
            call = Call(args, kwargs, rows_per_example=self._rows_per_example(handler, rows, examples or rows))
            if args and isinstance(args[0], torch.Tensor):
                call.shared = self._shared.setdefault(id(args[0]), {})
            leaves, spec = tree_flatten(output)
            return tree_unflatten(self._tap_leaves(handler, call, leaves, rows, broadcast), spec)

        return tap

    def _make_op_recording(self, handler: Handler) -> list:
        """Hooks that record the ops using a module's bare parameters while its forward runs."""
        modes: list[OpTapRecorder] = []
        sharded = any(is_sharded(self.params[n]) for n in handler.params.values())

        def on_use(use: OpUse, leaves: list) -> list:
            rows = next((t.shape[0] for t in leaves if isinstance(t, torch.Tensor) and t.dim() > 0), None)
            use.rows_per_example = self._rows_per_example(handler, rows, self._pass_batch or rows)
            return self._tap_leaves(handler, use, leaves, rows)

        @torch.compiler.disable
        def enter(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self._recording():
                inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
                # looked up now: fully_shard puts gathered tensors in the module while it runs
                current = {n: module.get_parameter(n) for n in handler.params}
                # and frees them after: a sharded module's replay needs copies of the values used
                values = {n: p.detach().clone() for n, p in current.items()} if sharded else None
                modes.append(OpTapRecorder({id(p): n for n, p in current.items()}, inputs, on_use, values))
                modes[-1].__enter__()
            else:
                modes.append(None)

        @torch.compiler.disable
        def leave(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            mode = modes.pop() if modes else None
            if mode is not None:
                mode.__exit__(None, None, None)

        @torch.compiler.disable
        def child_enter(child: nn.Module, args: tuple, kwargs: dict) -> None:
            if modes and modes[-1] is not None:
                modes[-1].suspend()

        @torch.compiler.disable
        def child_leave(child: nn.Module, args: tuple, kwargs: dict, output) -> None:
            if modes and modes[-1] is not None:
                modes[-1].resume((args, kwargs), output)

        if handler.module is self.model:
            self._root_enter = enter
        hooks = [
            handler.module.register_forward_pre_hook(enter, with_kwargs=True),
            handler.module.register_forward_hook(leave, with_kwargs=True, always_call=True),
        ]
        if handler.own_code_only:
            # every submodule, not only children: a parent may call its grandchildren (for layer in self.blocks)
            for child in list(handler.module.modules())[1:]:
                # first: a fully_shard submodule gathers its weights in its own pre-hook, unwatched
                hooks.append(child.register_forward_pre_hook(child_enter, with_kwargs=True, prepend=True))
                hooks.append(child.register_forward_hook(child_leave, with_kwargs=True, always_call=True))
        return hooks

    # ----------------------------------------------------------------------------- consumption
    def take_passes(self) -> list[Pass]:
        """The recorded passes that received gradients; forgets everything recorded so far."""
        done = [p for p in self.passes if any(c.has_grads for calls in p.values() for c in calls)]
        self._tapped = []
        self.passes = []
        return done

    def take_passes_now(self) -> list[Pass]:
        """Every recorded pass, before any gradient has arrived (the two-pass modes); forgets them."""
        passes, self.passes = self.passes, []
        return passes

    def take_tapped(self) -> list[torch.Tensor]:
        tapped, self._tapped = self._tapped, []
        return tapped

    def clear(self) -> None:
        self.passes = []
        self._tapped = []

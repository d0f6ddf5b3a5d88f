"""Find which module uses each parameter, by running the model once and watching every torch call.

Ownership is not use: nn.MultiheadAttention uses its child out_proj's weight in its own forward,
a language model uses one embedding matrix in two modules, a ViT adds its bare pos_embed in the
root's forward. A parameter is handled by the innermost module that is running when it is used
and that contains it.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .provenance import BatchProvenance, tensors


@dataclass
class ParameterUses:
    """For each parameter name, the modules that use it, and the order of first use; and the
    modules called on inputs that do not come from the model's batched inputs (position ids)."""

    users: dict[str, list[nn.Module]] = field(default_factory=lambda: defaultdict(list))
    order: list[str] = field(default_factory=list)
    unbatched_calls: set[int] = field(default_factory=set)  # ids of such modules
    #: parameter -> modules that used it in their own code (no child running), at every use
    direct_users: dict[str, list[nn.Module]] = field(default_factory=dict)
    #: (id of a user, parameter) -> the parameter's name inside that user
    local_names: dict[tuple[int, str], str] = field(default_factory=dict)
    #: ids of unbatched calls whose outputs cannot be given a batch dimension in place: the model
    #: itself computes their parameters' gradients (what they compute may flow anywhere in it,
    #: as T5's position bias, made in the first layer, flows into every other)
    lifted: set[int] = field(default_factory=set)


def _cannot_broadcast(args: tuple, kwargs: dict, batch: int | None) -> bool:
    """Whether an unbatched call's output cannot take a batch dimension in place: its first input
    has two or more dimensions, the first neither 1 (expanded to the batch) nor the batch already
    laid out by an expansion (stride 0). T5's relative position buckets (T, T) are such an input:
    a dimension put in front would change the output's rank under the model's code, and a T equal
    to the batch size would pass for one row per example."""
    first = next((t for t in tensors((args, kwargs)) if t.dim() > 0), None)
    if first is None or first.dim() < 2 or first.shape[0] == 1:
        return False
    return not (first.shape[0] == batch and first.stride(0) == 0)


def _local_names(module: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in module.named_parameters(remove_duplicate=False)}


class _UseRecorder(TorchFunctionMode):
    """Records, at every torch call, which running module uses which parameter, and follows the
    batch through the calls."""

    def __init__(self, params: dict[int, str], stack: list[nn.Module], uses: ParameterUses,
                 provenance: BatchProvenance):
        super().__init__()
        self.params, self.stack, self.uses, self.provenance = params, stack, uses, provenance
        self._contents: dict[nn.Module, dict[int, str]] = {}

    def forget_contents(self) -> None:
        """Look the modules' parameters up again (they change while fully_shard modules run)."""
        self._contents.clear()

    def _user(self, param_id: int) -> nn.Module | None:
        for module in reversed(self.stack):
            if module not in self._contents:
                self._contents[module] = _local_names(module)
            if param_id in self._contents[module]:
                return module
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not tensors(out):
            return out  # .shape, .dim() and the like are not uses
        self.provenance.follow((args, kwargs), out)
        for leaf in tree_flatten((args, kwargs))[0]:
            name = self.params.get(id(leaf)) if isinstance(leaf, torch.Tensor) else None
            if name is None:
                continue
            if name not in self.uses.users:
                self.uses.order.append(name)
            user = self._user(id(leaf))
            if user is not None and user not in self.uses.users[name]:
                self.uses.users[name].append(user)
                self.uses.local_names[id(user), name] = self._contents[user][id(leaf)]
            direct = self.uses.direct_users.setdefault(name, [self.stack[-1]] if self.stack else [])
            if not self.stack or self.stack[-1] not in direct:
                self.uses.direct_users[name] = []  # used inside a child at least once
        return out


@contextlib.contextmanager
def replayable(model: nn.Module) -> Iterator[Callable[[], None]]:
    """Run the model without leaving a trace: yields `rewind()`, which puts the random state and the
    model's buffers (a spectral norm's power iteration) back as they were on entry; on exit both
    are restored."""
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    with torch.random.fork_rng(devices=devices):
        cpu_state = torch.get_rng_state()
        cuda_states = [torch.cuda.get_rng_state(d) for d in devices]

        def rewind() -> None:
            torch.set_rng_state(cpu_state)
            for d, state in zip(devices, cuda_states):
                torch.cuda.set_rng_state(state, d)
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)

        try:
            yield rewind
        finally:
            rewind()


def trace_uses(model: nn.Module, params: dict[str, nn.Parameter], args: tuple, kwargs: dict) -> ParameterUses:
    """Run `model(*args, **kwargs)` once without gradients, the random state and the buffers restored
    after.

    Tensors computed from the model's inputs are followed through every torch call, to tell which
    modules see batched inputs."""
    uses = ParameterUses()
    stack: list[nn.Module] = []
    handles = []

    names = {id(p): n for n, p in params.items()}
    slots = {(id(m), local): names[id(p)] for m in model.modules()
             for local, p in m.named_parameters(recurse=False) if id(p) in names}

    def enter(module: nn.Module, args: tuple, kwargs: dict) -> None:
        # fully_shard puts gathered tensors in place of the parameters while a module runs
        for local, p in module.named_parameters(recurse=False):
            if (id(module), local) in slots:
                recorder.params[id(p)] = slots[id(module), local]
                provenance.keep([p])
        recorder.forget_contents()
        stack.append(module)
        if module is not model and not provenance.is_batched((args, kwargs)):
            uses.unbatched_calls.add(id(module))
            if _cannot_broadcast(args, kwargs, batch):
                uses.lifted.add(id(module))

    def leave(module: nn.Module, args: tuple, output) -> None:
        stack.pop()
        recorder.forget_contents()

    provenance = BatchProvenance(tensors((args, kwargs)))
    batch = next((t.shape[0] for t in tensors((args, kwargs)) if t.dim() > 0), None)
    recorder = _UseRecorder(dict(names), stack, uses, provenance)
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(enter, with_kwargs=True))
        handles.append(module.register_forward_hook(leave, always_call=True))
    try:
        with replayable(model), torch.no_grad(), recorder:
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return uses

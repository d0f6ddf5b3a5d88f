"""One way of training the benchmark model (non-private, a dpspeed mode, or Opacus as a peer) and
its physical step: forward, backward and optimizer.step()."""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ..engine import PrivacyEngine
from ..clipping.groups import ClippingStyle
from ..profiling import section
from .search import free_memory
from .workload import logits

NON_PRIVATE = "non-private"
PRECISIONS = ("fp32", "tf32", "bf16")


def check_precision(name: str) -> None:
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; use one of {PRECISIONS}")


@contextlib.contextmanager
def tensor_cores(name: str) -> Iterator[None]:
    """TF32 matmuls and convolutions for the whole step (forward, backward, clipping) under `tf32`;
    off otherwise."""
    check_precision(name)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = name == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def autocast(name: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for the forward pass under `bf16`; nothing otherwise."""
    check_precision(name)
    return torch.autocast(device.type, dtype=torch.bfloat16) if name == "bf16" else contextlib.nullcontext()


def _placeholder_loader() -> DataLoader:
    """make_private wants a data loader for the sampling rate; timing feeds batches directly."""
    return DataLoader(TensorDataset(torch.zeros(512, 1)), batch_size=64)


class Setup:
    """A private copy of the model with its optimizer and criterion, ready to step."""

    def __init__(self, base: nn.Module, label: str, style: ClippingStyle = "all-layer", sigma: float = 1.0,
                 process_group=None, compiled: bool = False):
        """`process_group`: train data-parallel over these processes (DistributedDataParallel for
        non-private training, dpspeed's own all-reduce for its modes). `compiled`: the forward pass
        through torch.compile (after make_private; Opacus's setups are not compiled)."""
        self.label = label
        self.compiled = compiled and not label.startswith("opacus-")
        self._forward: nn.Module | None = None
        self.model = copy.deepcopy(base)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-4, momentum=0.9)
        self.criterion = nn.CrossEntropyLoss()
        self.engine = None
        if label == NON_PRIVATE:
            if process_group is not None:
                self.model = nn.parallel.DistributedDataParallel(self.model, process_group=process_group)
            return
        if label.startswith("opacus-"):
            self._opacus(label.removeprefix("opacus-"), sigma)
            return
        self.engine = PrivacyEngine()
        self.model, self.optimizer, self.criterion, _ = self.engine.make_private(
            module=self.model, optimizer=self.optimizer, data_loader=_placeholder_loader(), noise_multiplier=sigma,
            max_grad_norm=1.0, criterion=self.criterion, clipping_mode=label, clipping_style=style,
            process_group=process_group,
        )

    @property
    def forward_model(self) -> nn.Module:
        """What the step calls: the model, or its torch.compile wrapper (made at the first step)."""
        if self._forward is None:
            if self.compiled:
                # a graph compiled for another setup's copy of the model (without dpspeed's hooks, or
                # with another mode's) must not be reused: each setup compiles afresh
                torch._dynamo.reset()
                # every batch size is a new shape: past dynamo's default of 8 compilations per
                # function it would fall back to eager silently
                torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self._forward = torch.compile(self.model) if self.compiled else self.model
        return self._forward

    @property
    def private(self) -> bool:
        return self.label != NON_PRIVATE

    def _opacus(self, grad_sample_mode: str, sigma: float) -> None:
        from opacus import PrivacyEngine as OpacusEngine

        engine = OpacusEngine()
        made = engine.make_private(module=self.model, optimizer=self.optimizer, data_loader=_placeholder_loader(),
                                   noise_multiplier=sigma, max_grad_norm=1.0, grad_sample_mode=grad_sample_mode,
                                   criterion=self.criterion, poisson_sampling=False)
        self.model, self.optimizer = made[0], made[1]
        if len(made) == 4:  # ghost clipping returns its criterion
            self.criterion = made[2]

    def _last_physical(self, last: bool) -> None:
        if self.label.startswith("opacus-"):
            self.optimizer.signal_skip_step(do_skip=not last)
        elif self.private:
            self.optimizer.begin_physical_batch(last)

    def step(self, x: torch.Tensor, y: torch.Tensor, precision_name: str, last: bool = False) -> None:
        """One physical batch. With last=False it only accumulates (a private setup clips and adds
        to its sums; non-private training adds to .grad without synchronising); with last=True it
        also ends the logical batch: all-reduce, noise (private) and the update."""
        self._last_physical(last)
        wrapped = isinstance(self.model, nn.parallel.DistributedDataParallel)
        with tensor_cores(precision_name):
            with self.model.no_sync() if wrapped and not last else contextlib.nullcontext():
                with section("forward"), autocast(precision_name, x.device):
                    loss = self.criterion(logits(self.forward_model(x)), y)
                with section("backward"):
                    loss.backward()
            if self.private:
                with section("step"):
                    self.optimizer.step()
            elif last:
                with section("update"):
                    self.optimizer.step()
        if self.private or last:
            self.optimizer.zero_grad(set_to_none=True)

    def reset(self) -> None:
        """Drop the gradients and sums a failed step left behind (after an out-of-memory error);
        free_memory() then gives their memory back."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.engine is not None:
            self.engine.optimizer.discard_logical_batch()
        if self.label.startswith("opacus-"):  # its hooks count forwards and stack activations
            for module in self.model.modules():
                if hasattr(module, "activations"):
                    module.activations = []
            for p in self.model.parameters():
                p.grad_sample, p._forward_counter = None, 0

    def close(self) -> None:
        if self.engine is not None:
            self.engine.detach()
        self.model = self.optimizer = self.criterion = self.engine = self._forward = None
        free_memory()

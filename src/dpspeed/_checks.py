"""make_private's argument checks, run before anything is attached, so that a refused call leaves
the model exactly as it was. The stages made from the arguments check what is theirs as they are
made (`ClippingConfig.create`: modes, styles, thresholds; `Topology.of`: the mesh and the process
group; `sampling.check_batching`: the physical batches); this module checks the rest and how the
pieces fit together."""

from __future__ import annotations

import math
import warnings
from typing import Container

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from .clipping.config import ClippingConfig
from .fix import validate
from .optimizer import DPOptimizer
from .parallel.topology import Topology
from .sampling import check_batching, population


def trainable_parameters(module: nn.Module, attached: Container[nn.Module]) -> dict[str, nn.Parameter]:
    """The module's trainable parameters by name, after checking the module can be made private."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if module in attached:
        raise ValueError("make_private was already called on this model; call engine.detach() first")
    problems = validate(module)
    if problems:
        listed = "\n".join(f"- {p}" for p in problems)
        raise ValueError(f"the model cannot be made private as it is ({len(problems)} problem(s)):\n{listed}")
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def check_arguments(*, module: nn.Module, optimizer: Optimizer, data_loader: DataLoader, criterion: nn.Module | None,
                    noise_multiplier: float, clipping: ClippingConfig, topology: Topology,
                    max_physical_batch_size: int | None, fixed_physical_batch: bool, poisson_sampling: bool) -> None:
    """make_private's arguments beyond the model, together."""
    check_optimizer(optimizer, module)
    check_loader(data_loader, max_physical_batch_size, fixed_physical_batch)
    check_criterion(criterion, clipping.loss_reduction)
    check_noise(noise_multiplier)
    check_clipping(clipping, criterion)
    check_topology(topology, clipping, poisson_sampling, data_loader)


def check_optimizer(optimizer: Optimizer, module: nn.Module) -> None:
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(optimizer, DPOptimizer):
        raise ValueError("this optimizer is already private; pass the original optimizer")
    in_model = {id(p) for p in module.parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in in_model:
                raise ValueError(
                    f"the optimizer holds a parameter of shape {tuple(p.shape)} that is not in the model; "
                    "build the optimizer from model.parameters()"
                )


def check_loader(data_loader: DataLoader, max_physical_batch_size: int | None = None,
                 fixed_physical_batch: bool = False) -> None:
    if not isinstance(data_loader, DataLoader):
        raise TypeError(f"data_loader must be a torch DataLoader, got {type(data_loader).__name__}")
    check_batching(data_loader.dataset, max_physical_batch_size, fixed_physical_batch)
    if len(data_loader.dataset) == 0:
        raise ValueError("the data loader's data set is empty")
    if data_loader.batch_size is None:
        raise ValueError("the data loader needs a batch_size: it is the expected logical batch size")


def check_criterion(criterion: nn.Module | None, loss_reduction: str) -> None:
    """The loss must be the mean (or sum) over the batch of each example's own loss."""
    if getattr(criterion, "weight", None) is not None and getattr(criterion, "reduction", None) == "mean":
        raise ValueError(
            f"{type(criterion).__name__}(weight=..., reduction='mean') divides by the total weight of the batch's "
            "targets, which depends on the other examples, so no example's gradient is its own: use "
            "reduction='sum' and loss_reduction='sum' (and scale the learning rate)"
        )
    reduction = getattr(criterion, "reduction", None)
    if reduction is not None and reduction != loss_reduction:
        raise ValueError(
            f"the criterion reduces by {reduction!r} but loss_reduction={loss_reduction!r}; make them agree"
        )


def check_noise(noise_multiplier: float) -> None:
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier}")
    if noise_multiplier == 0:
        warnings.warn("noise_multiplier=0: no noise is added, so the training is not private (epsilon is infinite)",
                      stacklevel=4)


def check_clipping(clipping: ClippingConfig, criterion: nn.Module | None) -> None:
    """The two-pass modes need the criterion and one clipping group."""
    if clipping.two_pass and criterion is None:
        raise ValueError(
            f"clipping_mode={clipping.mode!r} makes two backward passes through the criterion: pass "
            "criterion= to make_private and use the one it returns"
        )
    if clipping.two_pass and len(clipping.grouping.groups) > 1:
        raise ValueError(
            f"clipping_mode={clipping.mode!r} reweights the loss with one factor per example, so it "
            "supports all-layer clipping only; use a bk mode for group-wise clipping"
        )


def check_topology(topology: Topology, clipping: ClippingConfig, poisson_sampling: bool, data_loader: DataLoader) -> None:
    """What training over several processes, or a sharded model, supports."""
    if topology.shards and clipping.two_pass:
        raise ValueError(
            f"clipping_mode={clipping.mode!r} takes the clipped sum from autograd's weight gradients, which "
            "fully_shard reduce-scatters by its own rules; use a bk mode (or auto) with a sharded model"
        )
    if topology.distributed and not poisson_sampling:
        raise ValueError("across processes dpspeed needs poisson_sampling=True (each rank samples its shard)")
    examples = population(data_loader) if poisson_sampling else torch.arange(len(data_loader.dataset))
    topology.check_same_data(examples, data_loader.batch_size)

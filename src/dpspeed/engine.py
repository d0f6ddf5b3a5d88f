"""PrivacyEngine: makes a model, optimizer and data loader differentially private, Opacus-style,
without wrapping the model. make_private wires the stages together:
validate → sampling → capture → clipping → optimizer → accounting."""

from __future__ import annotations

import logging
import warnings
import weakref
from typing import Sequence

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from . import _checks
from .accounting import Accountant, noise_for_epsilon
from .capture.hooks import Controller
from .clipping.config import ClippingConfig
from .clipping.early_release import EarlyRelease
from .clipping.groups import ClippingStyle, Grouping
from .clipping.planner import LayerPlan, Planner
from .clipping.two_pass import DPLoss
from .noise import NoiseSource
from .optimizer import DPOptimizer
from .parallel.topology import Topology
from .sampling import DPDataLoader, PoissonBatchSampler, loader_options

logger = logging.getLogger(__name__)

_ATTACHED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
NOT_POISSON_WARNING = (
    "poisson_sampling=False: the reported epsilon assumes Poisson sampling, which these batches "
    "are not; it is not a guarantee for this run"
)


def _private_loader(data_loader: DataLoader, topology: Topology, seed: int | None, poisson_sampling: bool,
                    max_physical_batch_size: int | None, fixed_physical_batch: bool) -> DPDataLoader:
    """The user's loader made private: Poisson-sampled logical batches (each rank its shard of the
    data set), split into physical batches; or the user's own batches when poisson_sampling=False."""
    if poisson_sampling:
        rate = data_loader.batch_size / len(data_loader.dataset)
        logical = PoissonBatchSampler(len(data_loader.dataset), rate, steps=len(data_loader), seed=seed,
                                      rank=topology.rank, world_size=topology.world)
    else:
        logical = data_loader.batch_sampler
    return DPDataLoader(data_loader.dataset, logical, max_physical_batch_size=max_physical_batch_size,
                        fixed_physical_batch=fixed_physical_batch, common_count=topology.physical_batch_counter(),
                        **loader_options(data_loader))


def _wire(optimizer: DPOptimizer, loader: DPDataLoader) -> Controller:
    """Connect the stages: the loader tells the optimizer of each physical batch, the controller
    tells the clipping config the order of first use and (one-pass modes) early release of each
    arriving gradient, and early release hands completed units to the optimizer."""
    controller, clipping = optimizer.controller, optimizer.clipping
    loader.on_physical_batch(optimizer.begin_physical_batch)
    controller.on_trace(clipping.follow_first_use)
    if not clipping.two_pass:
        controller.on_grad(EarlyRelease(controller, clipping, optimizer.clip_and_add).gradient_arrived)
    return controller


class PrivacyEngine:
    """Opacus-compatible entry point: make_private, make_private_with_epsilon, get_epsilon, detach."""

    def __init__(self, accountant: str = "pld", secure_mode: bool = False):
        if secure_mode:
            raise ValueError("secure_mode (a cryptographic noise source) is not supported")
        self.accountant = Accountant(accountant)
        self.controller: Controller | None = None
        self.optimizer: DPOptimizer | None = None
        self.data_loader: DPDataLoader | None = None
        self.clipping: ClippingConfig | None = None
        self.poisson_sampling = True
        self.sample_rate: float | None = None
        self._module: nn.Module | None = None

    # ------------------------------------------------------------------------------------ setup
    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer: Optimizer,
        data_loader: DataLoader,
        noise_multiplier: float,
        max_grad_norm: float | Sequence[float],
        criterion: nn.Module | None = None,
        clipping_mode: str = "auto",
        clipping_style: ClippingStyle = "all-layer",
        clipping_fn: str = "abadi",
        loss_reduction: str = "mean",
        max_physical_batch_size: int | None = None,
        fixed_physical_batch: bool = False,
        poisson_sampling: bool = True,
        noise_generator: torch.Generator | None = None,
        seed: int | None = None,
        memory_budget: int | None = None,
        process_group=None,
    ):
        """Attach to `module` and return (module, optimizer, criterion, data_loader), or
        (module, optimizer, data_loader) without a criterion. The module is the same object.

        `memory_budget` (bytes) bounds the explicit per-example gradients the `auto` planner may
        hold at once (default: a quarter of the GPU's memory; no limit on the CPU).
        `process_group`: under torch.distributed, the processes that train together (default: all)."""
        if self.controller is not None:
            raise ValueError("this PrivacyEngine is already attached; use one engine per model")
        params = _checks.trainable_parameters(module, _ATTACHED)
        topology = Topology.of(params, process_group)
        clipping = ClippingConfig.create(clipping_mode, clipping_style, clipping_fn, loss_reduction, max_grad_norm,
                                         list(params), memory_budget)
        _checks.check_arguments(module=module, optimizer=optimizer, data_loader=data_loader, criterion=criterion,
                                noise_multiplier=noise_multiplier, clipping=clipping, topology=topology,
                                max_physical_batch_size=max_physical_batch_size,
                                fixed_physical_batch=fixed_physical_batch, poisson_sampling=poisson_sampling)
        seed = topology.shared_seed(seed)
        loader = _private_loader(data_loader, topology, seed, poisson_sampling, max_physical_batch_size,
                                 fixed_physical_batch)
        noise = NoiseSource.create(noise_generator, seed, topology.world, bool(topology.shards), topology.device)
        dp_optimizer = DPOptimizer(optimizer, Controller(module, params, param_grads=clipping.two_pass), clipping,
                                   noise, noise_multiplier, float(data_loader.batch_size), topology)
        controller = _wire(dp_optimizer, loader)
        dp_optimizer.on_logical_step(self._account_step)
        topology.broadcast_state(module)
        controller.attach()
        _ATTACHED.add(module)

        self.controller, self.optimizer, self.data_loader, self.clipping = controller, dp_optimizer, loader, clipping
        self.poisson_sampling, self._module = poisson_sampling, module
        self.sample_rate = data_loader.batch_size / len(data_loader.dataset)
        logger.info("dpspeed: %d trainable tensors in %d clipping group(s), sigma=%.4g, q=%.4g, mode=%s",
                    len(params), len(clipping.grouping.groups), noise_multiplier, self.sample_rate, clipping_mode)
        if criterion is None:
            return module, dp_optimizer, loader
        return module, dp_optimizer, DPLoss(criterion, dp_optimizer) if clipping.two_pass else criterion, loader

    def make_private_with_epsilon(
        self,
        *,
        target_epsilon: float,
        target_delta: float,
        epochs: int | None = None,
        steps: int | None = None,
        data_loader: DataLoader,
        **kwargs,
    ):
        """make_private with the smallest noise multiplier reaching `target_epsilon` after
        `epochs` epochs (or `steps` logical batches)."""
        if "noise_multiplier" in kwargs:
            raise ValueError("give target_epsilon or noise_multiplier, not both")
        if (epochs is None) == (steps is None):
            raise ValueError("give exactly one of epochs= or steps=")
        _checks.check_loader(data_loader)
        sample_rate = data_loader.batch_size / len(data_loader.dataset)
        total_steps = steps if steps is not None else epochs * len(data_loader)
        sigma = noise_for_epsilon(target_epsilon, target_delta, sample_rate, total_steps, self.accountant.kind)
        logger.info("dpspeed: noise multiplier %.4f for epsilon=%g after %d steps", sigma, target_epsilon, total_steps)
        return self.make_private(data_loader=data_loader, noise_multiplier=sigma, **kwargs)

    def _account_step(self) -> None:
        self.accountant.step(self.optimizer.noise_multiplier, self.sample_rate)

    # ------------------------------------------------------------------------------------ report
    def get_epsilon(self, delta: float) -> float:
        """epsilon spent so far at this delta, from dp-accounting, for the steps actually taken."""
        if not self.poisson_sampling:
            warnings.warn(NOT_POISSON_WARNING, stacklevel=2)
        return self.accountant.get_epsilon(delta)

    @property
    def grouping(self) -> Grouping | None:
        """The clipping groups and their thresholds (for `clipping_style=M`, final after the first
        forward pass)."""
        return self.clipping.grouping if self.clipping else None

    @property
    def plan(self) -> list[LayerPlan]:
        """With clipping_mode="auto": each layer's method and estimated costs (after the first step)."""
        chooser = self.clipping.chooser if self.clipping else None
        return list(chooser.plan.values()) if isinstance(chooser, Planner) else []

    @property
    def noise_multiplier(self) -> float | None:
        return self.optimizer.noise_multiplier if self.optimizer else None

    @property
    def nonfinite_examples(self) -> int:
        """Examples whose gradient was not finite and that contributed nothing."""
        return self.optimizer.nonfinite_examples if self.optimizer else 0

    # ------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Accountant history and sampler state, to save with a checkpoint."""
        return {
            "accountant": self.accountant.state_dict(),
            "sampler": self.data_loader.state_dict() if self.data_loader else {},
            "logical_steps": self.optimizer.logical_steps if self.optimizer else 0,
        }

    def load_state_dict(self, state: dict) -> None:
        self.accountant.load_state_dict(state["accountant"])
        if self.data_loader is not None:
            self.data_loader.load_state_dict(state["sampler"])
        if self.optimizer is not None:
            self.optimizer.logical_steps = state["logical_steps"]

    def detach(self) -> None:
        """Remove every hook; the model is as it was (same object, parameters, requires_grad)."""
        if self.controller is not None:
            self.controller.detach()
        if self._module is not None:
            _ATTACHED.discard(self._module)
        self.controller = None
        self._module = None

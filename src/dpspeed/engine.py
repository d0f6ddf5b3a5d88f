"""PrivacyEngine: makes a model, optimizer and data loader differentially private, Opacus-style,
without wrapping the model."""

from __future__ import annotations

import logging
import warnings
import weakref
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader, IterableDataset

from . import distributed, sharding
from .accounting import Accountant, noise_for_epsilon
from .clipper import MethodChooser
from .clipping import clipping_function
from .controller import Controller
from .ghost import TWO_PASS_MODES, DPLoss
from .grouping import ClippingStyle, Grouping, make_grouping
from .modes import method_chooser
from .optimizer import DPOptimizer
from .release import EarlyRelease
from .sampling import DPDataLoader, PoissonBatchSampler, loader_options

logger = logging.getLogger(__name__)

_ATTACHED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
NOT_POISSON_WARNING = (
    "poisson_sampling=False: the reported epsilon assumes Poisson sampling, which these batches "
    "are not; it is not a guarantee for this run"
)


def _check_module(module: nn.Module) -> dict[str, nn.Parameter]:
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if module in _ATTACHED:
        raise ValueError("make_private was already called on this model; call engine.detach() first")
    for name, m in module.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise ValueError(
                f"BatchNorm at '{name}' mixes examples of a batch, which breaks per-example privacy; "
                "replace it with dpspeed.fix_model(model) (GroupNorm) first"
            )
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("the model has no trainable parameters")
    return params


def _check_optimizer(optimizer: Optimizer, module: nn.Module) -> None:
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


def _check_loader(data_loader: DataLoader) -> None:
    if not isinstance(data_loader, DataLoader):
        raise TypeError(f"data_loader must be a torch DataLoader, got {type(data_loader).__name__}")
    if isinstance(data_loader.dataset, IterableDataset):
        raise TypeError("an IterableDataset cannot be Poisson-sampled; use a map-style Dataset")
    if data_loader.batch_size is None:
        raise ValueError("the data loader needs a batch_size: it is the expected logical batch size")


def _check_criterion(criterion: nn.Module | None, loss_reduction: str) -> None:
    if loss_reduction not in ("mean", "sum"):
        raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
    reduction = getattr(criterion, "reduction", None)
    if reduction is not None and reduction != loss_reduction:
        raise ValueError(
            f"the criterion reduces by {reduction!r} but loss_reduction={loss_reduction!r}; make them agree"
        )


def _sharding_group(shards: dict, process_group, two_pass: bool, clipping_mode: str):
    """The process group of a model sharded by fully_shard (its mesh's), checked against the options."""
    if two_pass:
        raise ValueError(
            f"clipping_mode={clipping_mode!r} takes the clipped sum from autograd's weight gradients, which "
            "fully_shard reduce-scatters by its own rules; use a bk mode (or auto) with a sharded model"
        )
    group = sharding.mesh_group(shards)
    if process_group is not None and dist.get_process_group_ranks(process_group) != dist.get_process_group_ranks(group):
        raise ValueError("process_group differs from the device mesh the model is sharded on; leave it out")
    return group


class PrivacyEngine:
    """Opacus-compatible entry point: make_private, make_private_with_epsilon, get_epsilon, detach."""

    def __init__(self, accountant: str = "pld", secure_mode: bool = False):
        if secure_mode:
            raise ValueError("secure_mode (a cryptographic noise source) is not supported")
        self.accountant = Accountant(accountant)
        self.controller: Controller | None = None
        self.optimizer: DPOptimizer | None = None
        self.data_loader: DPDataLoader | None = None
        self.grouping: Grouping | None = None
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
        distributed.check_not_wrapped(module)
        params = _check_module(module)
        shards = sharding.sharded_params(params)
        _check_optimizer(optimizer, module)
        _check_loader(data_loader)
        _check_criterion(criterion, loss_reduction)
        if not noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        clip_fn = clipping_function(clipping_fn)
        choose: MethodChooser = method_chooser(clipping_mode, memory_budget)
        grouping = make_grouping(clipping_style, list(params), max_grad_norm)
        two_pass = clipping_mode in TWO_PASS_MODES
        if two_pass and criterion is None:
            raise ValueError(
                f"clipping_mode={clipping_mode!r} makes two backward passes through the criterion: pass "
                "criterion= to make_private and use the one it returns"
            )
        if two_pass and len(grouping.groups) > 1:
            raise ValueError(
                f"clipping_mode={clipping_mode!r} reweights the loss with one factor per example, so it "
                "supports all-layer clipping only; use a bk mode for group-wise clipping"
            )
        if max_physical_batch_size is not None and max_physical_batch_size < 1:
            raise ValueError(f"max_physical_batch_size must be >= 1, got {max_physical_batch_size}")
        if shards:
            process_group = _sharding_group(shards, process_group, two_pass, clipping_mode)

        num_samples = len(data_loader.dataset)
        self.sample_rate = data_loader.batch_size / num_samples
        rank, world = distributed.rank_and_world(process_group)
        device = sharding.compute_device(next(iter(shards.values()))) if shards else next(iter(params.values())).device
        shard_noise, common_count = None, None
        if world > 1:
            if not poisson_sampling:
                raise ValueError("across processes dpspeed needs poisson_sampling=True (each rank samples its shard)")
            seed = distributed.shared_seed(seed, process_group, device)
            if shards:
                shard_noise = sharding.shard_generator(noise_generator, seed, device)
                common_count = lambda n: distributed.most(n, process_group, device)  # noqa: E731
            if noise_generator is None:  # the same noise on every rank: it enters the global sum once
                noise_generator = torch.Generator(device=device)
                noise_generator.manual_seed(seed + 7919)
        if poisson_sampling:
            logical = PoissonBatchSampler(num_samples, self.sample_rate, steps=len(data_loader), seed=seed,
                                          rank=rank, world_size=world)
        else:
            logical = data_loader.batch_sampler
        dp_loader = DPDataLoader(
            data_loader.dataset, logical, max_physical_batch_size=max_physical_batch_size,
            fixed_physical_batch=fixed_physical_batch, common_count=common_count, **loader_options(data_loader)
        )

        controller = Controller(module, params, param_grads=two_pass)
        if isinstance(clipping_style, int) and not isinstance(clipping_style, bool):
            controller.on_trace(lambda c: self._regroup(clipping_style, max_grad_norm, c.first_use_order))
        dp_optimizer = DPOptimizer(
            optimizer, controller, grouping, clip_fn, choose, noise_multiplier,
            expected_batch_size=float(data_loader.batch_size), loss_reduction=loss_reduction,
            noise_generator=noise_generator, two_pass=two_pass, process_group=process_group,
            shards=shards, shard_noise_generator=shard_noise,
        )
        dp_optimizer.on_logical_step.append(self._account_step)
        if not two_pass:
            release = EarlyRelease(controller, lambda: self.grouping, dp_optimizer.clip_and_add)
            controller.on_grad = release.on_grad
        dp_loader.attach(dp_optimizer)
        if world > 1:
            distributed.broadcast_state(module, process_group)
        controller.attach()
        _ATTACHED.add(module)

        self.controller, self.optimizer, self.data_loader = controller, dp_optimizer, dp_loader
        self.grouping, self.poisson_sampling, self._module = grouping, poisson_sampling, module
        logger.info(
            "dpspeed: %d trainable tensors in %d clipping group(s), sigma=%.4g, q=%.4g, mode=%s",
            len(params), len(grouping.groups), noise_multiplier, self.sample_rate, clipping_mode,
        )
        if criterion is None:
            return module, dp_optimizer, dp_loader
        if two_pass:
            criterion = DPLoss(criterion, dp_optimizer, loss_reduction)
        return module, dp_optimizer, criterion, dp_loader

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
        _check_loader(data_loader)
        sample_rate = data_loader.batch_size / len(data_loader.dataset)
        total_steps = steps if steps is not None else epochs * len(data_loader)
        sigma = noise_for_epsilon(target_epsilon, target_delta, sample_rate, total_steps, self.accountant.kind)
        logger.info("dpspeed: noise multiplier %.4f for epsilon=%g after %d steps", sigma, target_epsilon, total_steps)
        return self.make_private(data_loader=data_loader, noise_multiplier=sigma, **kwargs)

    def _regroup(self, style: int, max_grad_norm, order: list[str]) -> None:
        """int M groups are consecutive layers in the order of first use, known after the trace."""
        grouping = make_grouping(style, order, max_grad_norm)
        self.grouping = grouping
        self.optimizer.grouping = grouping

    def _account_step(self) -> None:
        self.accountant.step(self.optimizer.noise_multiplier, self.sample_rate)

    # ------------------------------------------------------------------------------------ report
    def get_epsilon(self, delta: float) -> float:
        """epsilon spent so far at this delta, from dp-accounting, for the steps actually taken."""
        if not self.poisson_sampling:
            warnings.warn(NOT_POISSON_WARNING, stacklevel=2)
        return self.accountant.get_epsilon(delta)

    @property
    def plan(self) -> list:
        """With clipping_mode="auto": each layer's method and estimated costs (after the first step)."""
        planner = getattr(self.optimizer, "choose", None)
        return list(getattr(planner, "plan", {}).values())

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

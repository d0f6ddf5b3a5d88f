"""DP training with Lightning: add `DPCallback` to the Trainer's callbacks; the LightningModule,
its training_step and configure_optimizers stay as they are.

    dp = DPCallback(target_epsilon=8.0, max_grad_norm=1.0)
    trainer = lightning.Trainer(max_epochs=3, callbacks=[dp])
    trainer.fit(model, train_loader); dp.get_epsilon()

What changes under Lightning's loop, and why:
- When Lightning first iterates the training loader, make_private attaches to the module that
  holds every trainable parameter: the smallest one (`self.net` when training_step calls
  `self.net(x)`, the LightningModule itself when they are spread over several children; then
  training_step must call `self(x)`). `module="name"` picks another. The loss may be a mean or a
  sum over the batch, as long as each example's loss is its own. At the end of the fit (or when
  it fails) the hooks come off: the model is as it was.
- The training loader becomes dpspeed's Poisson loader over the same examples: each batch is a
  logical batch, of your loader's batch_size on average. With `max_physical_batch_size` it comes
  in parts: Lightning's steps (max_steps, global_step, per-step LR schedules, integer
  val_check_interval and limit_train_batches) then count parts, while the optimizer steps once
  per logical batch, and the loader has no length. `target_epsilon` is calibrated for
  Trainer(max_steps=) logical batches when given (whole batches only), else for max_epochs epochs.
- The optimizer of configure_optimizers is wrapped: each step clips every example to
  `max_grad_norm`, adds the noise once and steps. "epsilon" is logged every log_every_n_steps
  logical steps (Poisson sampling only). The fit stops before the step that would spend more than
  `max_epsilon` (by default the target_epsilon). The callback's state in a checkpoint carries
  the accountant (and, for a `seed=` run, the random streams): a fit resumed with ckpt_path=
  continues epsilon where it stopped, its noise raised where a longer horizon needs it.

Refused, each with its reason: several processes (run dpspeed under torchrun without Lightning),
manual optimization, more than one optimizer, several training loaders, training_step taking
dataloader_iter, accumulate_grad_batches > 1 or GradientAccumulationScheduler (use
max_physical_batch_size), gradient_clip_val (the per-example clipping replaces it), 16-bit mixed
precision (its loss scaler scales every example's gradient; bf16-mixed needs none), and
reloading the training loader during the fit.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterator

import lightning.pytorch as pl
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import nn

from ..accounting import BudgetExhausted, BudgetGuard
from ..engine import PrivacyEngine
from ..sampling import population_size

logger = logging.getLogger(__name__)


def smallest_holder(module: nn.Module) -> str:
    """The name of the deepest submodule of `module` that holds all of its trainable parameters
    ("" for `module` itself)."""
    owners = [name.split(".")[:-1] for name, p in module.named_parameters() if p.requires_grad]
    if not owners:
        raise ValueError(f"{type(module).__name__} has no trainable parameters")
    return ".".join(os.path.commonprefix(owners))


class _PrivateBatches:
    """What Lightning iterates: the user's training loader, made private when training starts
    (after configure_optimizers, which may ask for the loader's length first); its length (the
    logical batches of an epoch) only when every batch is a whole logical batch."""

    def __init__(self, make_private: Callable[[], Any], dataloader: Any, whole_logical_batches: bool):
        self._make_private, self.dataloader, self.whole = make_private, dataloader, whole_logical_batches
        self.loader = None

    def private(self) -> Any:
        if self.loader is None:
            self.loader = self._make_private()
        return self.loader

    def __iter__(self) -> Iterator[Any]:
        yield from self.private()  # from the first batch asked for: Lightning may call iter() earlier

    def __len__(self) -> int:
        if not self.whole:
            raise TypeError("logical batches come in a random number of parts")
        return len(self.dataloader)  # the Poisson loader's steps per epoch


class DPCallback(pl.Callback):
    """Makes the LightningModule's training private (module docstring). Give `target_epsilon` or
    `noise_multiplier`; `target_delta` defaults to 1 / N^1.1 for N training examples; the fit
    stops before epsilon would exceed `max_epsilon` (default: target_epsilon; none with a given
    noise_multiplier). Other make_private arguments (clipping_fn, fixed_physical_batch,
    memory_budget, poisson_sampling, ...) pass through `options`."""

    def __init__(self, *, max_grad_norm: float = 1.0, noise_multiplier: float | None = None,
                 target_epsilon: float | None = None, target_delta: float | None = None,
                 max_epsilon: float | None = None, module: str | None = None, clipping_mode: str = "auto",
                 clipping_style: Any = "all-layer", max_physical_batch_size: int | None = None,
                 accountant: str = "pld", seed: int | None = None, **options: Any):
        if (target_epsilon is None) == (noise_multiplier is None):
            raise ValueError("DPCallback: give target_epsilon or noise_multiplier (exactly one)")
        if clipping_mode in ("ghost", "mix-ghost"):
            raise ValueError(f"DPCallback: clipping_mode={clipping_mode!r} makes a second backward pass through its "
                             "own criterion, which Lightning's loop does not; take a one-pass mode (auto, bk, ...)")
        if "delta" in options:
            raise ValueError("DPCallback: the delta of max_epsilon is target_delta")
        if not options.get("poisson_sampling", True) and (target_epsilon, max_epsilon) != (None, None):
            raise ValueError("DPCallback: target_epsilon and max_epsilon need Poisson sampling: with "
                             "poisson_sampling=False the batches are your sampler's, and there is no epsilon; give "
                             "noise_multiplier")
        self.engine = PrivacyEngine(accountant=accountant)
        self.target_epsilon, self.target_delta, self.module_name = target_epsilon, target_delta, module
        self.max_epsilon = target_epsilon if max_epsilon is None else max_epsilon
        self.options = dict(max_grad_norm=max_grad_norm, clipping_mode=clipping_mode, clipping_style=clipping_style,
                            max_physical_batch_size=max_physical_batch_size, seed=seed, **options)
        if noise_multiplier is not None:
            self.options["noise_multiplier"] = noise_multiplier
        self._announce_next: Callable[[], None] | None = None
        self._saved_state: dict | None = None
        self._batches: _PrivateBatches | None = None
        self._guard: BudgetGuard | None = None
        self._restore_strategy: Callable[[], None] | None = None
        self._examples = 0
        self._horizon_steps: int | None = None  # the logical steps target_epsilon is calibrated for

    @property
    def delta(self) -> float:
        return self.target_delta or 1.0 / self._examples ** 1.1

    @property
    def poisson_sampling(self) -> bool:
        return self.options.get("poisson_sampling", True)

    def get_epsilon(self, delta: float | None = None) -> float:
        return self.engine.get_epsilon(delta or self.delta)

    # ------------------------------------------------------------------------------- set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.engine.optimizer is not None:
            raise RuntimeError("DPCallback: a second fit with this callback; use a new DPCallback for each fit "
                               "(ckpt_path= resumes the accountant)")
        _refuse_unsupported(trainer, pl_module, self)
        self._batches = self._guard = self._saved_state = None  # a fit that failed before make_private left them
        strategy = trainer.strategy
        process = strategy.process_dataloader

        def process_dataloader(dataloader: object) -> object:
            dataloader = process(dataloader)
            return self._private_batches(trainer, pl_module, dataloader) if trainer.training else dataloader

        strategy.process_dataloader = process_dataloader
        self._restore_strategy = lambda: vars(strategy).pop("process_dataloader", None)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """The hooks come off and the strategy is as it was (the accountant stays, for get_epsilon)."""
        if self._restore_strategy is not None:
            self._restore_strategy()
            self._restore_strategy = None
        self.engine.detach()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")

    def _private_batches(self, trainer: pl.Trainer, pl_module: pl.LightningModule, dataloader: Any) -> _PrivateBatches:
        if self._batches is not None:
            raise RuntimeError("DPCallback makes one training loader private, and Lightning set up another (several "
                               "training loaders, or reload_dataloaders_every_n_epochs): train on one loader, "
                               "loaded once")
        whole = self.options["max_physical_batch_size"] is None
        self._batches = _PrivateBatches(lambda: self._make_private(trainer, pl_module, dataloader), dataloader, whole)
        return self._batches

    def _make_private(self, trainer: pl.Trainer, pl_module: pl.LightningModule, dataloader: Any) -> Any:
        """make_private on the module, the optimizer and this training loader; Lightning steps the
        returned optimizer and iterates the returned loader."""
        if not trainer.strategy.optimizers:
            raise RuntimeError("DPCallback: no optimizer to wrap: configure_optimizers returned none, or Lightning "
                               "asked for a training batch before it returned (trainer.estimated_stepping_batches "
                               "there, with max_physical_batch_size: such epochs have no length; size the schedule "
                               "from Trainer(max_steps=) instead)")
        if len(trainer.strategy.optimizers) != 1:
            raise ValueError(f"DPCallback: configure_optimizers returned {len(trainer.strategy.optimizers)} "
                             "optimizers; dpspeed wraps exactly one")
        self._examples = population_size(dataloader, self.poisson_sampling)
        name = smallest_holder(pl_module) if self.module_name is None else self.module_name
        module = pl_module.get_submodule(name)
        options = dict(module=module, optimizer=trainer.strategy.optimizers[0], data_loader=dataloader, **self.options)
        if self.max_epsilon is not None:
            options.update(max_epsilon=self.max_epsilon, delta=self.delta)  # the last word, where Lightning runs on
        if self.target_epsilon is None:
            _, optimizer, loader = self.engine.make_private(**options)
        else:
            horizon = _horizon(trainer)
            self._horizon_steps = horizon.get("steps") or horizon["epochs"] * len(dataloader)
            _, optimizer, loader = self.engine.make_private_with_epsilon(
                target_epsilon=self.target_epsilon, target_delta=self.delta, **horizon, **options)
        if self._saved_state is not None:
            self.engine.load_state_dict(self._saved_state)
        if self.max_epsilon is not None:
            self._guard = BudgetGuard(self.engine.accountant, self.max_epsilon, self.delta)
        trainer.strategy.optimizers = [optimizer]
        self._announce_next = loader.defer_announcements()  # Lightning fetches a batch ahead of its step
        logger.info("DPCallback: private training of %s ('%s'), noise multiplier %.4g", type(module).__name__,
                    name or "<root>", optimizer.noise_multiplier)
        return loader

    # ------------------------------------------------------------------------------- the loop
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Lightning has its optimizer, training loader and restored checkpoint: make_private."""
        if self._batches is None:
            raise RuntimeError("DPCallback: Lightning set up no training loader through its strategy")
        self._batches.private()
        self._stop_before_the_budget_is_spent(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._announce_next()

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any) -> None:
        if not self.engine.controller.recordings:
            name = type(self.engine.controller.model).__name__
            raise RuntimeError(
                f"DPCallback: training_step did not call the module dpspeed is attached to ({name}: DPCallback's "
                "module=, or the smallest holding every trainable parameter), so no example's gradient can be "
                "clipped. Call it in "
                "training_step (self(x) when that is the LightningModule), or name the submodule it calls with "
                "DPCallback(module=...)"
            )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        optimizer = self.engine.optimizer
        if not optimizer.is_last_physical_batch:
            return
        if self.poisson_sampling and optimizer.logical_steps % trainer.log_every_n_steps == 0:
            pl_module.log("epsilon", self.get_epsilon(), on_step=True, on_epoch=False, prog_bar=True)
        self._stop_before_the_budget_is_spent(trainer)

    def _stop_before_the_budget_is_spent(self, trainer: pl.Trainer) -> None:
        """Lightning's stop (checked before the next batch is fetched) where the next logical step
        would spend more than max_epsilon."""
        if self._guard is None:
            return
        try:
            self._guard.check(self.engine.optimizer.noise_multiplier, self.engine.sample_rate)
        except BudgetExhausted as exhausted:
            trainer.should_stop = True
            if self._horizon_steps is not None and self.engine.accountant.steps >= self._horizon_steps:
                logger.info("DPCallback: the %d steps of target_epsilon's horizon are taken", self._horizon_steps)
            else:
                logger.warning("DPCallback: %s", exhausted)

    # ------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {"engine": self.engine.state_dict()} if self.engine.optimizer is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        """Kept until make_private (the training loader's first iteration), after Lightning restores."""
        self._saved_state = state_dict.get("engine")


def _horizon(trainer: pl.Trainer) -> dict:
    """The steps (Trainer(max_steps=)) or epochs the noise is calibrated for."""
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return {"steps": trainer.max_steps}
    if trainer.max_epochs is None or trainer.max_epochs < 0:
        raise ValueError("DPCallback: target_epsilon needs Trainer(max_epochs=) or max_steps= to calibrate the noise")
    return {"epochs": trainer.max_epochs}


def _refuse_unsupported(trainer: pl.Trainer, pl_module: pl.LightningModule, callback: DPCallback) -> None:
    """What the callback cannot make private, said before anything is attached."""
    reasons = []
    if trainer.world_size > 1:
        reasons.append(f"{trainer.world_size} processes: run dpspeed under torchrun without Lightning")
    if not pl_module.automatic_optimization:
        reasons.append("manual optimization: dpspeed steps the optimizer once per physical batch itself")
    if is_param_in_hook_signature(pl_module.training_step, "dataloader_iter", explicit=True):
        reasons.append("training_step(dataloader_iter): dpspeed follows each batch from its fetch to its step; "
                       "take training_step(batch, batch_idx)")
    if trainer.accumulate_grad_batches != 1 or any(isinstance(c, GradientAccumulationScheduler)
                                                   for c in trainer.callbacks):
        reasons.append("gradient accumulation (accumulate_grad_batches > 1, GradientAccumulationScheduler): give "
                       "DPCallback(max_physical_batch_size=) instead")
    if trainer.gradient_clip_val:
        reasons.append("gradient_clip_val: each example is clipped to max_grad_norm; the batch's clipping goes")
    if getattr(trainer.precision_plugin, "scaler", None) is not None:
        reasons.append(f"precision={trainer.precision!r}: its loss scaler scales every example's gradient; "
                       "train in bf16-mixed or 32-true")
    reasons += _refused_with_parts(trainer, callback)
    if reasons:
        raise ValueError("DPCallback cannot make this fit private: " + "; ".join(reasons))


def _refused_with_parts(trainer: pl.Trainer, callback: DPCallback) -> list[str]:
    """With max_physical_batch_size an epoch has a random number of parts, which Lightning counts."""
    if callback.options["max_physical_batch_size"] is None:
        return []
    reasons = [f"{name}={value} with max_physical_batch_size: an epoch has a random number of parts; give it as an "
               "int (parts)" for name, value in (("val_check_interval", trainer.val_check_interval),
                                                 ("limit_train_batches", trainer.limit_train_batches))
               if isinstance(value, float) and value != 1.0]
    if callback.target_epsilon is not None and trainer.max_steps is not None and trainer.max_steps > 0:
        reasons.append("target_epsilon for Trainer(max_steps=) with max_physical_batch_size: Lightning's steps "
                       "count parts, a random number per logical batch; calibrate for max_epochs, or give "
                       "noise_multiplier")
    return reasons


__all__ = ["DPCallback", "smallest_holder"]

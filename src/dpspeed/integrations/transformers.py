"""DP training with the transformers Trainer: change `Trainer` to `DPTrainer` and add
`privacy_args`.

    trainer = DPTrainer(model=model, args=TrainingArguments(...), train_dataset=train,
                        privacy_args=PrivacyArguments(target_epsilon=8.0))
    trainer.train(); trainer.get_epsilon()

What changes under the Trainer's loop, and why:
- Each optimizer step takes one Poisson-sampled logical batch: each example of the training set is
  in it with probability per_device_train_batch_size x gradient_accumulation_steps / N, so the
  logical batch has that many examples on average. It is split into physical batches of at most
  `privacy_args.max_physical_batch_size` (default per_device_train_batch_size) examples, each a
  forward and backward pass; the Trainer's own gradient accumulation is set to 1 and its loop
  counts logical batches (steps, the learning-rate schedule and logging are per logical batch).
- Each example's loss is its own: the mean over its own tokens (a causal LM's shifted labels, -100
  ignored), or its cross-entropy (MSE for one regression output, binary cross-entropy averaged over
  the labels for float multi-label targets); the physical batch's loss is their mean. The Trainer's loss, a mean over every token of the batch, would let one example's length
  scale the others' gradients. Override `per_example_loss` for another loss.
- The Trainer's gradient-norm clipping (TrainingArguments.max_grad_norm) is off: each example is
  clipped to `privacy_args.max_grad_norm` before the noise, which is what bounds its influence.
- epsilon is logged with the loss at every logging step, and a checkpoint's optimizer state carries
  the accountant, so a resumed run continues epsilon where it stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from transformers import Trainer, TrainingArguments

from ..engine import PrivacyEngine

logger = logging.getLogger(__name__)


@dataclass
class PrivacyArguments:
    """How DPTrainer trains privately. Give `target_epsilon` (the noise is calibrated for the whole
    run) or `noise_multiplier`. `target_delta` defaults to 1 / N^1.1 for N training examples."""

    target_epsilon: float | None = None
    target_delta: float | None = None
    noise_multiplier: float | None = None
    max_grad_norm: float = 1.0
    clipping_mode: str = "auto"
    clipping_style: str = "all-layer"
    clipping_fn: str = "abadi"
    max_physical_batch_size: int | None = None
    accountant: str = "pld"
    seed: int | None = None

    def __post_init__(self):
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("PrivacyArguments: give target_epsilon or noise_multiplier (exactly one)")
        if self.clipping_mode in ("ghost", "mix-ghost"):
            raise ValueError(f"PrivacyArguments: clipping_mode={self.clipping_mode!r} makes a second backward pass "
                             "through its own criterion, which the Trainer's loop does not; take a one-pass mode "
                             "(auto, bk, bk-mix-opt, ...), as fast and exact")


def _is_causal_lm(model: nn.Module) -> bool:
    """Whether the model predicts the next token (its labels are shifted by one): transformers'
    causal-LM classes (GPT2LMHeadModel, LlamaForCausalLM, ...), under a peft wrapper too."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    while hasattr(model, "_orig_mod") or type(model).__name__ == "DistributedDataParallel":  # compiled, DDP
        model = getattr(model, "_orig_mod", None) or model.module
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = {n for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for n in ([v] if isinstance(v, str) else v)}
    return type(base).__name__ in names or type(base).__name__.endswith("ForCausalLM")


class _LogicalBatches:
    """What the Trainer iterates: one empty marker per logical batch, while DPTrainer's
    training_step draws the physical batches of that logical batch from the private loader."""

    def __init__(self, trainer: DPTrainer, steps: int):
        self.trainer, self.steps = trainer, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[dict]:
        self.trainer._physical = iter(self.trainer._private_loader)
        for _ in range(self.steps):
            yield {}


class DPTrainer(Trainer):
    """A transformers Trainer that trains with DP-SGD (module docstring); every other argument and
    feature is the Trainer's."""

    def __init__(self, *args, privacy_args: PrivacyArguments, **kwargs):
        training_args = kwargs.get("args") if "args" in kwargs else (args[1] if len(args) > 1 else None)
        if training_args is None:
            raise ValueError("DPTrainer needs TrainingArguments (args=): its batch size sets the logical batch")
        self.privacy_args = privacy_args
        self.logical_batch_size = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
        # skipping the batches a resumed epoch had trained means nothing for fresh Poisson batches
        private_args = dataclasses.replace(training_args, gradient_accumulation_steps=1, max_grad_norm=0.0,
                                           ignore_data_skip=True)
        if "args" in kwargs:
            kwargs["args"] = private_args
        else:
            args = (args[0], private_args, *args[2:])
        super().__init__(*args, **kwargs)
        self.engine = PrivacyEngine(accountant=privacy_args.accountant)
        self._private_loader = None
        self._physical: Iterator | None = None
        self._dp_optimizer = None

    @property
    def target_delta(self) -> float:
        return self.privacy_args.target_delta or 1.0 / len(self.train_dataset) ** 1.1

    # ------------------------------------------------------------------------------- data, optimizer
    def get_train_dataloader(self) -> _LogicalBatches:
        if self.train_dataset is None:
            raise ValueError("DPTrainer needs a train_dataset")
        steps = math.ceil(len(self.train_dataset) / self.logical_batch_size)
        return _LogicalBatches(self, steps)

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self._dp_optimizer is None:
            self._make_private(optimizer)
        return self.optimizer

    def _make_private(self, optimizer: torch.optim.Optimizer) -> None:
        p, args = self.privacy_args, self.args
        dataset = self._remove_unused_columns(self.train_dataset, description="training") if hasattr(
            self.train_dataset, "column_names") else self.train_dataset
        loader = DataLoader(dataset, batch_size=self.logical_batch_size, collate_fn=self.data_collator,
                            num_workers=args.dataloader_num_workers, pin_memory=args.dataloader_pin_memory)
        options = dict(module=self.model, optimizer=optimizer, data_loader=loader, max_grad_norm=p.max_grad_norm,
                       clipping_mode=p.clipping_mode, clipping_style=p.clipping_style, clipping_fn=p.clipping_fn,
                       max_physical_batch_size=p.max_physical_batch_size or args.per_device_train_batch_size,
                       seed=p.seed)
        if p.target_epsilon is not None:
            budget = {"steps": args.max_steps} if args.max_steps > 0 else {"epochs": math.ceil(args.num_train_epochs)}
            private = self.engine.make_private_with_epsilon(target_epsilon=p.target_epsilon,
                                                            target_delta=self.target_delta, **budget, **options)
        else:
            private = self.engine.make_private(noise_multiplier=p.noise_multiplier, **options)
        _, self._dp_optimizer, self._private_loader = private
        self.optimizer = self._dp_optimizer
        logger.info("DPTrainer: logical batch %d (expected), noise multiplier %.4g, delta %.3g",
                    self.logical_batch_size, self._dp_optimizer.noise_multiplier, self.target_delta)

    # ------------------------------------------------------------------------------- the step
    def per_example_loss(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        """Each example's own loss, shape (B,) (module docstring)."""
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        logits = model(**inputs).logits
        if logits.dim() == 2:
            if logits.shape[-1] == 1 and labels.is_floating_point():  # regression
                return (logits.squeeze(-1) - labels.reshape(len(labels))).square()
            if labels.is_floating_point() and labels.shape == logits.shape:  # multi-label
                return F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(1)
            return F.cross_entropy(logits, labels, reduction="none")
        if _is_causal_lm(model):
            logits, labels = logits[:, :-1], labels[:, 1:]
        per_token = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)
        counted = (labels != -100).sum(1)
        return per_token.sum(1) / counted.clamp_min(1)

    def training_step(self, model: nn.Module, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        """One logical batch: forward and backward of each of its physical batches (the Trainer's
        optimizer.step() then clips, adds the noise and steps)."""
        model.train()
        total, examples = torch.zeros((), device=self.args.device), 0
        while True:
            batch = self._prepare_inputs(next(self._physical))
            last = self._dp_optimizer.is_last_physical_batch
            rows = len(batch["labels"])
            if rows:
                with self.compute_loss_context_manager():
                    losses = self.per_example_loss(model, batch)
                self.accelerator.backward(losses.mean())
                total, examples = total + losses.detach().sum(), examples + rows
            if last:
                return total / max(examples, 1)
            self._dp_optimizer.step()  # accumulates this physical batch's clipped sum

    # ------------------------------------------------------------------------------- epsilon
    def get_epsilon(self, delta: float | None = None) -> float:
        return self.engine.get_epsilon(delta or self.target_delta)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """epsilon beside the loss; no grad_norm (the Trainer's, of the noisy gradient, means nothing here)."""
        logs.pop("grad_norm", None)
        if "loss" in logs and self.engine.accountant.steps:
            logs["epsilon"] = round(self.get_epsilon(), 4)
        super().log(logs, *args, **kwargs)


__all__ = ["DPTrainer", "PrivacyArguments", "TrainingArguments"]

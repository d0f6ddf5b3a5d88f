"""What a layer rule is: per-sample gradients, ghost norms and clipped sums of one module type."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)
_told_reduced_precision = False


@dataclass
class Call:
    """One forward call of a handled module: its inputs and, after backward, its output gradients."""

    args: tuple
    kwargs: dict
    output_grads: list[torch.Tensor | None] = field(default_factory=list)
    output_spec: Any = None  # which output leaves were tapped (used by the functional fallback)
    rows_per_example: int = 1  # > 1 when the module saw the batch flattened to (B * k, ...)
    shared: dict = field(default_factory=dict)  # one dict for all calls on the same input tensor

    @property
    def has_grads(self) -> bool:
        return any(g is not None for g in self.output_grads)

    def release(self) -> None:
        """Let go of the kept activations and output gradients once the call is clipped: the
        autograd graph holds this call (through its gradient hooks) until the step ends."""
        self.args, self.kwargs, self.shared = (), {}, {}
        self.output_grads = [None] * len(self.output_grads)

    def input(self) -> torch.Tensor:
        return self.args[0]

    def grad(self) -> torch.Tensor:
        """The gradient of the module's single output (zeros if it never reached the loss)."""
        return self.output_grads[0]


def common_dtype(a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cast activation and output gradient to one dtype (they differ under autocast)."""
    if a.dtype == g.dtype:
        return a, g
    dtype = torch.promote_types(a.dtype, g.dtype)
    return a.to(dtype), g.to(dtype)


def compute_dtype(a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation and output gradient in the dtype the layer computed in, the output gradient's:
    under bf16 autocast a float32 input is cast down as the forward pass cast it, so the matrix
    products run on the tensor cores, like the weight gradients of non-private training."""
    global _told_reduced_precision
    if not _told_reduced_precision and torch.finfo(g.dtype).bits < 32:
        _told_reduced_precision = True
        logger.warning(
            "per-example norms and clipped sums are computed from %s products (float32 accumulation), as "
            "the layers' own gradients are: their rounding (about %.1g relative) can let a clipped "
            "gradient exceed max_grad_norm by that fraction; train in float32 or TF32 for norms at "
            "float32 precision", g.dtype, torch.finfo(g.dtype).eps / 2)
    return (a if a.dtype == g.dtype else a.to(g.dtype)), g


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: float32, or float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def to_acc(t: torch.Tensor) -> torch.Tensor:
    """The tensor in its accumulation dtype."""
    return t.to(acc_dtype(t.dtype))


def factors_in(dtype: torch.dtype, factors: torch.Tensor) -> torch.Tensor:
    """Clipping factors cast to `dtype`, shrunk by half its machine epsilon first: rounding to the
    nearest value of `dtype` then never enlarges a clipped gradient beyond the threshold. Factors
    below the smallest normal value (where rounding is coarser) become 0."""
    if dtype == factors.dtype:
        return factors
    info = torch.finfo(dtype)
    shrunk = torch.where(factors < info.tiny, 0.0, factors * (1 - info.eps / 2))
    return shrunk.to(dtype)


def weighted_sum(factors: torch.Tensor, per_sample: torch.Tensor) -> torch.Tensor:
    """sum_i factors[i] * per_sample[i]: one matrix product in the per-sample dtype (float32
    accumulation inside it), returned in float32 or better."""
    flat = per_sample.reshape(per_sample.shape[0], -1)
    return to_acc(factors_in(per_sample.dtype, factors) @ flat).view(per_sample.shape[1:])


class LayerRule:
    """Per-sample gradient rule of one module type.

    `names` are the module's own parameter names this rule is asked about (the trainable ones).
    Every method receives the gradient of the *summed* loss; the engine scales for `mean`.
    """

    #: whether `ghost_sq_norms` is implemented (norms without per-sample gradients)
    ghost: bool = False

    def validate(self, module: nn.Module) -> None:
        """Raise ValueError if this module's configuration cannot be handled exactly."""

    def per_sample_grads(self, module: nn.Module, call: Call, names: list[str]) -> dict[str, torch.Tensor]:
        """Per-sample gradients, name -> tensor of shape (B, *param.shape)."""
        raise NotImplementedError

    def ghost_sq_norms(self, module: nn.Module, call: Call, names: list[str]) -> dict[str, torch.Tensor]:
        """Squared per-sample gradient norms without materialising the gradients, name -> (B,)."""
        raise NotImplementedError

    def clipped_sum(
        self, module: nn.Module, call: Call, names: list[str], factors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """sum_i factors[name][i] * g_i(name), without per-sample gradients where possible."""
        grads = self.per_sample_grads(module, call, names)
        return {n: weighted_sum(factors[n], grads[n]) for n in names}

    def costs(self, module: nn.Module, call: Call) -> tuple[float, float] | None:
        """(ghost cost, explicit cost) of the norm in multiply-adds per example, or None."""
        return None

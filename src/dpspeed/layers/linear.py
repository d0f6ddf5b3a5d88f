"""nn.Linear: a (B, T, d) times W (p, d); any number of leading dimensions folded into T."""

from __future__ import annotations

import torch
from torch import nn

from ..capture.records import Call
from ._gram import GRAM_NORM, clipped_matmul, ghost_sq_norms_and_spreads, spread
from .precision import book_keeping_roundoff, kept_in_compute_dtype, kept_row_norm, kept_row_sum
from .rule import LayerRule


def flatten_positions(call: Call) -> tuple[torch.Tensor, torch.Tensor]:
    """The call's input and output gradient as (B, T, d) and (B, T, p) in the compute dtype, the
    input kept cast (`kept_in_compute_dtype`: one cast per input, not one per use, and the kept
    input in 16 bits under autocast)."""
    a, g = kept_in_compute_dtype(call)
    batch = g.shape[0]
    return a.reshape(batch, -1, a.shape[-1]), g.reshape(batch, -1, g.shape[-1])


def linear_costs(a: torch.Tensor, g: torch.Tensor) -> tuple[float, float]:
    """(ghost, explicit) multiply-adds per example of a Linear's weight norm, from its input (B, ..., d)
    and output gradient (B, ..., p): 2 T^2 (d + p) for the two Gram matrices, T d p for the gradient."""
    positions = a[0].numel() // a.shape[-1] if a.shape[0] else 1
    d, p = a.shape[-1], g.shape[-1]
    return 2.0 * positions**2 * (d + p), float(positions * d * p)


def bias_terms(g: torch.Tensor, call: Call | None = None) -> torch.Tensor:
    """Per-sample bias gradients: the output gradient summed over positions, (B, p); formed once
    per `call` (its norm and its clipped sum read the same)."""
    if call is None:
        return g.sum(1)
    if "bias terms" not in call.cache:
        call.cache["bias terms"] = g.sum(1)
    return call.cache["bias terms"]


class LinearRule(LayerRule):
    ghost = True

    def per_sample_grads(self, module: nn.Linear, call: Call, names: list[str]) -> dict[str, torch.Tensor]:
        a, g = flatten_positions(call)
        out = {}
        if "weight" in names:
            out["weight"] = torch.einsum("btp,btd->bpd", g, a)
        if "bias" in names:
            out["bias"] = bias_terms(g)
        return out

    def shrink(self, module: nn.Linear, call: Call, names: list[str]) -> None:
        kept_in_compute_dtype(call)  # the input in the compute dtype (16 bits under autocast)

    def gram_operands(self, module: nn.Linear, call: Call, names: list[str]) -> tuple[torch.Tensor, torch.Tensor] | None:
        return flatten_positions(call) if "weight" in names else None

    def row_operands(self, module: nn.Linear, call: Call, names: list[str]) -> dict[str, torch.Tensor]:
        return {"bias": bias_terms(flatten_positions(call)[1], call)} if "bias" in names else {}

    def ghost_sq_norms(self, module: nn.Linear, call: Call, names: list[str]) -> dict[str, torch.Tensor]:
        a, g = flatten_positions(call)
        out = {}
        if "weight" in names:
            together = call.cache.pop(GRAM_NORM, None)
            if together is None:
                together = ghost_sq_norms_and_spreads([(a, g, call.shared)], bounds=True)[0]
            out["weight"], _, call.cache["sum rounding"] = together
        if "bias" in names:
            out["bias"] = kept_row_norm(call, "bias", bias_terms(g, call))
        return out

    def clipped_sum(self, module: nn.Linear, call: Call, names, factors) -> dict[str, torch.Tensor]:
        a, g = flatten_positions(call)
        out = {}
        if "weight" in names:
            out["weight"] = clipped_matmul(a, g, factors["weight"])
        if "bias" in names:
            out["bias"] = kept_row_sum(call, "bias", factors["bias"], bias_terms(g, call))
        return out

    def sum_rounding(self, module: nn.Linear, call: Call, names: list[str]) -> dict[str, torch.Tensor]:
        """The weight's book-keeping product rounds its factor-scaled operand and accumulates the T
        products of each example (the bias's sum is exact): (product_roundoff + T · accumulation
        roundoff) · sum_t ||a_t||·||g_t|| (`book_keeping_roundoff`), the whole bound as the ghost
        norm formed it, from its Grams' diagonals, when it ran."""
        if "weight" not in names:
            return {}
        if "sum rounding" in call.cache:
            return {"weight": call.cache["sum rounding"]}
        g = call.grad()
        positions = g[0].numel() // g.shape[-1] if g.shape[0] else 1
        return {"weight": book_keeping_roundoff(g.dtype, g.device, positions) * spread(*flatten_positions(call))}

    def costs(self, module: nn.Linear, call: Call) -> tuple[float, float]:
        return linear_costs(call.input(), call.grad())


class Conv1DRule(LinearRule):
    """transformers' Conv1D (GPT-2's projections): a Linear whose weight is stored transposed,
    (in, out); everything as for nn.Linear, the weight's gradients transposed back."""

    def per_sample_grads(self, module: nn.Module, call: Call, names: list[str]) -> dict[str, torch.Tensor]:
        out = super().per_sample_grads(module, call, names)
        if "weight" in out:
            out["weight"] = out["weight"].transpose(1, 2)
        return out

    def clipped_sum(self, module: nn.Module, call: Call, names, factors) -> dict[str, torch.Tensor]:
        out = super().clipped_sum(module, call, names, factors)
        if "weight" in out:
            out["weight"] = out["weight"].t()
        return out

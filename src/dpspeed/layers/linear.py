"""nn.Linear: a (B, T, d) times W (p, d); any number of leading dimensions folded into T."""

from __future__ import annotations

import torch
from torch import nn

from ..capture.records import Call
from ._gram import clipped_matmul, ghost_sq_norm, spread
from .precision import accumulation_roundoff, compute_dtype, product_roundoff, to_acc, weighted_sum
from .rule import LayerRule


def flatten_positions(a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, ..., d) and (B, ..., p) -> (B, T, d) and (B, T, p)."""
    a, g = compute_dtype(a, g)
    batch = g.shape[0]
    return a.reshape(batch, -1, a.shape[-1]), g.reshape(batch, -1, g.shape[-1])


def bias_terms(g: torch.Tensor) -> torch.Tensor:
    """Per-sample bias gradients: the output gradient summed over positions, (B, p)."""
    return g.sum(1)


class LinearRule(LayerRule):
    ghost = True

    def per_sample_grads(self, module: nn.Linear, call: Call, names: list[str]) -> dict[str, torch.Tensor]:
        a, g = flatten_positions(call.input(), call.grad())
        out = {}
        if "weight" in names:
            out["weight"] = torch.einsum("btp,btd->bpd", g, a)
        if "bias" in names:
            out["bias"] = bias_terms(g)
        return out

    def ghost_sq_norms(self, module: nn.Linear, call: Call, names: list[str]) -> dict[str, torch.Tensor]:
        a, g = flatten_positions(call.input(), call.grad())
        out = {}
        if "weight" in names:
            out["weight"] = ghost_sq_norm(a, g, call.shared)
        if "bias" in names:
            out["bias"] = to_acc(bias_terms(g)).square().sum(1)
        return out

    def clipped_sum(self, module: nn.Linear, call: Call, names, factors) -> dict[str, torch.Tensor]:
        a, g = flatten_positions(call.input(), call.grad())
        out = {}
        if "weight" in names:
            out["weight"] = clipped_matmul(a, g, factors["weight"])
        if "bias" in names:
            out["bias"] = weighted_sum(factors["bias"], bias_terms(g))
        return out

    def sum_rounding(self, module: nn.Linear, call: Call, names: list[str]) -> dict[str, torch.Tensor]:
        """The weight's book-keeping product rounds its factor-scaled operand and accumulates the T
        products of each example (the bias's sum is exact): (product_roundoff + T · accumulation
        roundoff) · sum_t ||a_t||·||g_t||."""
        if "weight" not in names:
            return {}
        a, g = flatten_positions(call.input(), call.grad())
        rounding = product_roundoff(g.dtype, g.device) + accumulation_roundoff(g.dtype, g.shape[1])
        return {"weight": rounding * spread(a, g)}

    def costs(self, module: nn.Linear, call: Call) -> tuple[float, float]:
        a = call.input()
        positions = a[0].numel() // a.shape[-1] if a.shape[0] else 1
        return 2.0 * positions**2 * (module.in_features + module.out_features), float(
            positions * module.in_features * module.out_features
        )

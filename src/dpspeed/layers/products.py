"""Modules whose every parameter is the weight or bias of Linear products (or a block of rows of
one): a recurrent layer's input and hidden projections, attention's q/k/v and output projections.
Each method is the Linear rule's per product; a parameter several products fill by row blocks
(attention's in_proj_weight) has its per-example gradient stacked from them, its squared norm
summed over them (the blocks are disjoint), its clipped sum stacked."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..capture.records import Call
from .linear import LinearRule, linear_costs
from .rule import LayerRule

_LINEAR = LinearRule()


@dataclass(eq=False)
class Product:
    """One Linear product: its call (input (B, T, d), output gradient (B, T, p)) and, for "weight"
    and "bias", the parameter it fills and the first of the p rows it fills there."""

    call: Call
    params: dict[str, tuple[str, int]]


def requiring_grad(t: torch.Tensor) -> torch.Tensor:
    """`t`, made part of the autograd graph if it is not (a product whose gradient is to be tapped)."""
    return t if t.requires_grad else t + t.new_zeros((), requires_grad=True)


def _stacked(blocks: dict[str, list[tuple[int, torch.Tensor]]], dim: int) -> dict[str, torch.Tensor]:
    return {name: parts[0][1] if len(parts) == 1 else torch.cat([t for _, t in sorted(parts, key=lambda p: p[0])], dim)
            for name, parts in blocks.items()}


class LinearProducts(LayerRule):
    """Subclasses say which products a recorded call holds (`products`)."""

    ghost = True

    def products(self, module: nn.Module, call: Call) -> list[Product]:
        raise NotImplementedError

    def _each(self, module: nn.Module, call: Call, names: list[str]):
        """(the product's call, its wanted "weight"/"bias", {local: (name, first row)}) per product."""
        if "products" not in call.cache:
            call.cache["products"] = self.products(module, call)
        for product in call.cache["products"]:
            wanted = [local for local, (name, _) in product.params.items() if name in names]
            if wanted:
                yield product.call, wanted, product.params

    def _blocks(self, module, call, names, method, *extra) -> dict[str, list[tuple[int, torch.Tensor]]]:
        blocks: dict[str, list[tuple[int, torch.Tensor]]] = {}
        for sub, wanted, params in self._each(module, call, names):
            args = [{k: extra[0][params[k][0]] for k in wanted}] if extra else []
            for local, value in method(None, sub, wanted, *args).items():
                name, row = params[local]
                blocks.setdefault(name, []).append((row, value))
        return blocks

    def per_sample_grads(self, module, call, names):
        return _stacked(self._blocks(module, call, names, _LINEAR.per_sample_grads), 1)

    def ghost_sq_norms(self, module, call, names):
        return {n: sum(v for _, v in parts) for n, parts in self._blocks(module, call, names, _LINEAR.ghost_sq_norms).items()}

    def clipped_sum(self, module, call, names, factors):
        return _stacked(self._blocks(module, call, names, _LINEAR.clipped_sum, factors), 0)

    def sum_rounding(self, module, call, names):
        """Each block's bound, added: the norm of the stacked rounding errors is at most their sum."""
        return {n: sum(v for _, v in parts) for n, parts in self._blocks(module, call, names, _LINEAR.sum_rounding).items()}

    def costs(self, module, call) -> tuple[float, float]:
        ghost = explicit = 0.0
        for sub, _, _ in self._each(module, call, [n for n, _ in module.named_parameters()]):
            g, e = linear_costs(sub.input(), sub.grad())
            ghost, explicit = ghost + g, explicit + e
        return ghost, explicit

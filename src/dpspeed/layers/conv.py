"""nn.Conv1d/2d/3d as a linear layer over unfolded patches, per group of channels."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..capture.records import Call
from ._gram import ghost_sq_norm_and_spread, spread
from .precision import (accumulated_bmm, book_keeping_roundoff, factors_in, kept_in_compute_dtype, kept_row_norm,
                        kept_row_sum, squared_row_norms, to_acc)
from .rule import LayerRule

ConvNd = nn.Conv1d | nn.Conv2d | nn.Conv3d


def _padded(module: ConvNd, x: torch.Tensor) -> torch.Tensor:
    """The input as the convolution sees it, after the module's padding."""
    if module.padding_mode != "zeros":
        return F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
    if module.padding == "valid":
        return x
    if module.padding == "same":
        pads = []
        for k, d in zip(reversed(module.kernel_size), reversed(module.dilation)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads)
    return F.pad(x, [p for p in reversed(module.padding) for _ in range(2)])


def unfold(module: ConvNd, x: torch.Tensor) -> torch.Tensor:
    """Patches of x as (B, groups, C_in/groups * prod(kernel), positions), ordered like the weight."""
    x = _padded(module, x)
    spatial = x.dim() - 2
    for i, (k, s, d) in enumerate(zip(module.kernel_size, module.stride, module.dilation)):
        x = x.unfold(2 + i, d * (k - 1) + 1, s)
    window = tuple(slice(None, None, d) for d in module.dilation)
    x = x[(slice(None),) * (2 + spatial) + window]
    x = x.permute(0, 1, *range(2 + spatial, 2 + 2 * spatial), *range(2, 2 + spatial))
    batch = x.shape[0]
    return x.reshape(batch, module.groups, -1, math.prod(x.shape[2 + spatial :]))


def grouped_grad(module: ConvNd, g: torch.Tensor) -> torch.Tensor:
    """Output gradient as (B, groups, C_out/groups, positions)."""
    return g.reshape(g.shape[0], module.groups, module.out_channels // module.groups, -1)


def bias_terms(g: torch.Tensor, call: Call) -> torch.Tensor:
    """Per-sample bias gradients (B, C_out) from the grouped output gradient, formed once per call
    (its norm and its clipped sum read the same)."""
    if "bias terms" not in call.cache:
        call.cache["bias terms"] = g.sum(-1).reshape(g.shape[0], -1)
    return call.cache["bias terms"]


class ConvRule(LayerRule):
    ghost = True

    def shrink(self, module: ConvNd, call: Call, names: list[str]) -> None:
        kept_in_compute_dtype(call)  # the input in the compute dtype (16 bits under autocast), not unfolded

    def _operands(self, module: ConvNd, call: Call) -> tuple[torch.Tensor, torch.Tensor]:
        """The unfolded input and the grouped output gradient in the compute dtype, the input kept
        cast (`kept_in_compute_dtype`)."""
        a, g = kept_in_compute_dtype(call)
        return unfold(module, a), grouped_grad(module, g)

    def per_sample_grads(self, module: ConvNd, call: Call, names: list[str]) -> dict[str, torch.Tensor]:
        a, g = self._operands(module, call)
        out = {}
        if "weight" in names:
            w = torch.einsum("bgpl,bgdl->bgpd", g, a)
            out["weight"] = w.reshape(g.shape[0], *module.weight.shape)
        if "bias" in names:
            out["bias"] = bias_terms(g, call)
        return out

    def row_operands(self, module: ConvNd, call: Call, names: list[str]) -> dict[str, torch.Tensor]:
        if "bias" not in names:
            return {}
        return {"bias": bias_terms(grouped_grad(module, call.grad()), call)}

    def ghost_sq_norms(self, module: ConvNd, call: Call, names: list[str]) -> dict[str, torch.Tensor]:
        a, g = self._operands(module, call)
        batch, groups = g.shape[:2]
        out = {}
        if "weight" in names:
            flat_a = a.transpose(2, 3).reshape(batch * groups, a.shape[3], a.shape[2])
            flat_g = g.transpose(2, 3).reshape(batch * groups, g.shape[3], g.shape[2])
            sq_norms, per_group = ghost_sq_norm_and_spread(flat_a, flat_g)
            out["weight"] = sq_norms.reshape(batch, groups).sum(1)
            call.cache["spread"] = per_group.reshape(batch, groups).norm(dim=1)  # sum_rounding's, as there
        if "bias" in names:
            out["bias"] = kept_row_norm(call, "bias", bias_terms(g, call))
        return out

    def clipped_sum(self, module: ConvNd, call: Call, names, factors) -> dict[str, torch.Tensor]:
        a, g = self._operands(module, call)
        out = {}
        if "weight" in names:
            scaled = g * factors_in(g.dtype, factors["weight"]).view(-1, 1, 1, 1)
            groups = g.shape[1]
            flat_g = scaled.permute(1, 2, 0, 3).reshape(groups, g.shape[2], -1)  # (groups, p, B·L)
            flat_a = a.permute(1, 0, 3, 2).reshape(groups, -1, a.shape[2])  # (groups, B·L, d)
            out["weight"] = accumulated_bmm(flat_g, flat_a).reshape(module.weight.shape)
        if "bias" in names:
            out["bias"] = kept_row_sum(call, "bias", factors["bias"], bias_terms(g, call))
        return out

    def sum_rounding(self, module: ConvNd, call: Call, names: list[str]) -> dict[str, torch.Tensor]:
        """The weight's book-keeping product rounds its factor-scaled operand and accumulates each
        example's L positions: per group of channels (product_roundoff + L · accumulation roundoff) ·
        sum over positions of ||patch||·||g||, their root-sum-square over the groups (the groups are
        blocks of the weight)."""
        if "weight" not in names:
            return {}
        g = grouped_grad(module, call.grad())  # the dtype the products are taken in
        rounding = book_keeping_roundoff(g.dtype, g.device, g.shape[3])
        spread_of = call.cache.get("spread")  # the ghost norm's, from its Grams' diagonals
        if spread_of is None:
            a, g = self._operands(module, call)
            batch, groups = g.shape[:2]
            per_group = spread(a.transpose(2, 3).reshape(batch * groups, a.shape[3], a.shape[2]),
                               g.transpose(2, 3).reshape(batch * groups, g.shape[3], g.shape[2]))
            spread_of = per_group.reshape(batch, groups).norm(dim=1)
        return {"weight": rounding * spread_of}

    def costs(self, module: ConvNd, call: Call) -> tuple[float, float]:
        g = call.grad()
        positions = g[0, 0].numel() if g is not None and g.shape[0] else 1
        d = module.in_channels // module.groups * math.prod(module.kernel_size)
        p = module.out_channels // module.groups
        return 2.0 * positions**2 * (d + p) * module.groups, float(positions * d * p * module.groups)


class StdConvRule(ConvRule):
    """timm's StdConv2d (BiT): a convolution with its weight standardised per output channel,
    w_hat = (w - mean) / s with s = sqrt(var + eps) over the channel's n = C_in/groups · prod(kernel)
    entries. Each example's gradient is the convolution's own for w_hat (from the unfolded
    patches, as ConvRule's) pulled back through the standardisation's Jacobian, which is linear:
    dL/dw = (h - mean(h) - w_hat · <w_hat, h> / n) / s for that example's h = dL/dw_hat, in float32
    (float64 for float64).

    Norms without keeping per-example gradients (`ghost`): each layer's are formed, measured and let
    go, one layer at a time, so that all-layer clipping holds none. Clipped sum by book-keeping:
    ConvRule's for w_hat, pulled back through the same Jacobian, whose rows are projections (norm
    at most 1) divided by s: the rounding bound of w_hat's sum, divided by the smallest s, bounds
    what rounding adds to an example's contribution."""

    def _pulled_back(self, module: nn.Conv2d, h: torch.Tensor) -> torch.Tensor:
        """dL/dw for gradients h = dL/dw_hat of shape (N, *weight.shape), in h's dtype."""
        w_hat, s = self._standardised(module, h.dtype)
        n = w_hat.shape[1]
        h = h.reshape(h.shape[0], module.out_channels, n)
        pulled = (h - h.mean(2, keepdim=True) - w_hat * (h * w_hat).sum(2, keepdim=True) / n) / s
        return pulled.reshape(h.shape[0], *module.weight.shape)

    @staticmethod
    def _standardised(module: nn.Conv2d, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_hat (C_out, n), s (C_out, 1)) in `dtype`."""
        w = module.weight.detach().to(dtype).reshape(module.out_channels, -1)
        centred = w - w.mean(1, keepdim=True)
        s = (centred.square().mean(1, keepdim=True) + module.eps).sqrt()
        return centred / s, s

    def per_sample_grads(self, module: nn.Conv2d, call: Call, names: list[str]) -> dict[str, torch.Tensor]:
        out = super().per_sample_grads(module, call, names)
        if "weight" in out:
            out["weight"] = self._pulled_back(module, to_acc(out["weight"]))
        if "bias" in out:
            out["bias"] = to_acc(out["bias"])
        return out

    def row_operands(self, module: nn.Conv2d, call: Call, names: list[str]) -> dict[str, torch.Tensor]:
        return {}  # every norm comes from the explicit gradients `ghost_sq_norms` forms

    def ghost_sq_norms(self, module: nn.Conv2d, call: Call, names: list[str]) -> dict[str, torch.Tensor]:
        return {n: squared_row_norms(u) for n, u in self.per_sample_grads(module, call, names).items()}

    def clipped_sum(self, module: nn.Conv2d, call: Call, names, factors) -> dict[str, torch.Tensor]:
        out = super().clipped_sum(module, call, names, factors)
        if "weight" in out:
            out["weight"] = self._pulled_back(module, to_acc(out["weight"]).unsqueeze(0))[0]
        return out

    def sum_rounding(self, module: nn.Conv2d, call: Call, names: list[str]) -> dict[str, torch.Tensor]:
        bound = super().sum_rounding(module, call, names)
        if "weight" in bound:
            bound["weight"] = bound["weight"] / self._standardised(module, bound["weight"].dtype)[1].min()
        return bound

    def costs(self, module: nn.Conv2d, call: Call) -> tuple[float, float]:
        """The norm costs the explicit gradient either way; the book-keeping sum saves holding it."""
        explicit = super().costs(module, call)[1]
        return explicit, explicit

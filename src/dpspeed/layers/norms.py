"""Affine normalisation layers: weight gradient sum(g * x_hat), bias gradient sum(g), per example."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..capture.records import Call
from .precision import compute_dtype
from .rule import LayerRule


class AffineNormRule(LayerRule):
    """y = x_hat * weight + bias, with x_hat recomputed from the kept input."""

    #: True when the affine parameters cover the trailing dims (LayerNorm), False for channels (dim 1)
    trailing: bool = True

    def normalized(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def per_sample_grads(self, module: nn.Module, call: Call, names: list[str]) -> dict[str, torch.Tensor]:
        x, g = compute_dtype(call.input(), call.grad())
        batch = g.shape[0]
        shape = (module.weight if module.weight is not None else module.bias).shape
        if self.trailing:
            def per_sample(t: torch.Tensor) -> torch.Tensor:
                return t.reshape(batch, -1, *shape).sum(1)
        else:
            def per_sample(t: torch.Tensor) -> torch.Tensor:
                return t.reshape(batch, shape[0], -1).sum(2)
        out = {}
        if "weight" in names:
            out["weight"] = per_sample(g * self.normalized(module, x).to(g.dtype))
        if "bias" in names:
            out["bias"] = per_sample(g)
        return out


class LayerNormRule(AffineNormRule):
    def normalized(self, module: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, module.normalized_shape, eps=module.eps)


class RMSNormRule(AffineNormRule):
    def normalized(self, module: nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, module.normalized_shape, eps=module.eps)


class GroupNormRule(AffineNormRule):
    trailing = False

    def normalized(self, module: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, module.num_groups, eps=module.eps)


class InstanceNormRule(AffineNormRule):
    trailing = False

    def normalized(self, module: nn.modules.instancenorm._InstanceNorm, x: torch.Tensor) -> torch.Tensor:
        use_input_stats = module.training or not module.track_running_stats
        return F.instance_norm(
            x,
            None if use_input_stats else module.running_mean,
            None if use_input_stats else module.running_var,
            use_input_stats=use_input_stats,
            eps=module.eps,
        )

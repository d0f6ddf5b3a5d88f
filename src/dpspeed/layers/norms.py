"""Affine normalisation layers: weight gradient sum(g * x_hat), bias gradient sum(g), per example."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..capture.records import Call
from .precision import compute_dtype, to_acc
from .rule import LayerRule


class CondensedRule(LayerRule):
    """A rule whose per-example gradients are far smaller than what a call keeps (a norm layer's
    (B, C) against its (B, T, C) input and output gradient), and which has no ghost norm (every
    mode takes them explicitly): they replace the call's tensors as its gradient arrives."""

    def shrink(self, module: nn.Module, call: Call, names: list[str]) -> None:
        per_sample = self.per_sample_grads(module, call, names)
        if per_sample:
            call.condense(per_sample)


class AffineNormRule(CondensedRule):
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


class GroupNormActRule(CondensedRule):
    """timm's GroupNormAct, act(group_norm(x)) in one module (BiT's norms): the gradient at the
    norm's output is the module's output gradient through the activation's derivative, which is
    elementwise, so each example's comes from its own values; then weight sum(g * x_hat) and bias
    sum(g) per example and channel, in float32 (float64 for float64). The activation's own
    parameters, if any, belong to its own module."""

    def covers(self, module: nn.Module) -> bool:
        """Not with a drop layer (a random mask to replay): that takes the op taps."""
        return isinstance(module.drop, nn.Identity)

    def per_sample_grads(self, module: nn.GroupNorm, call: Call, names: list[str]) -> dict[str, torch.Tensor]:
        x, g = to_acc(call.input()), to_acc(call.grad())
        weight, bias = (None if p is None else p.detach().to(x.dtype) for p in (module.weight, module.bias))
        with torch.enable_grad():
            pre = F.group_norm(x, module.num_groups, weight, bias, module.eps).requires_grad_()
            # forward(), not __call__: the activation's hooks (a PReLU's own binding) must not record this
            # replay; a clone, since activations may work in place
            (g_pre,) = torch.autograd.grad(module.act.forward(pre.clone()), pre, g)
        batch, channels = g.shape[0], g.shape[1]
        out = {}
        if "weight" in names:
            x_hat = F.group_norm(x, module.num_groups, eps=module.eps)
            out["weight"] = (g_pre * x_hat).reshape(batch, channels, -1).sum(2)
        if "bias" in names:
            out["bias"] = g_pre.reshape(batch, channels, -1).sum(2)
        return out

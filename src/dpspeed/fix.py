"""fix_model: replace layers that mix examples of a batch (BatchNorm) or keep statistics of the
private data (InstanceNorm with running statistics) with private-friendly ones."""

from __future__ import annotations

import math

from torch import nn


def _without_running_stats(norm: nn.modules.instancenorm._InstanceNorm) -> nn.Module:
    """The same instance norm normalising by each example's own statistics only (its affine
    parameters kept)."""
    fixed = type(norm)(norm.num_features, eps=norm.eps, affine=norm.affine, track_running_stats=False)
    if norm.affine:
        fixed.load_state_dict({"weight": norm.weight.detach(), "bias": norm.bias.detach()})
    return fixed.to(norm.weight.device if norm.affine else "cpu")


def fix_model(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm with a GroupNorm of gcd(32, channels) groups, and every InstanceNorm
    that tracks running statistics with one that does not, in place; returns the model."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            channels = child.num_features
            setattr(model, name, nn.GroupNorm(math.gcd(32, channels), channels, affine=child.affine))
        elif isinstance(child, nn.modules.instancenorm._InstanceNorm) and child.track_running_stats:
            setattr(model, name, _without_running_stats(child))
        else:
            fix_model(child)
    return model

"""fix_model: replace layers that mix examples of a batch (BatchNorm) with private-friendly ones."""

from __future__ import annotations

import math

from torch import nn


def fix_model(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm with a GroupNorm of gcd(32, channels) groups, in place; returns the model."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            channels = child.num_features
            setattr(model, name, nn.GroupNorm(math.gcd(32, channels), channels, affine=child.affine))
        else:
            fix_model(child)
    return model

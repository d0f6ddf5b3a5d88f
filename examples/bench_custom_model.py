"""Your own model in `dpspeed bench`: a function that builds it, named on the command line.

    dpspeed bench --model py:examples/bench_custom_model.py:build --image-size 32 --max-batch 64 --out bench-mine
    dpspeed report bench-mine

The bench times every DP mode against non-private training on your model and GPU (or CPU), finds
the largest batch each fits, and writes results.json, plots and report.md with a recommendation.
"""

from __future__ import annotations

from torch import nn


def build(in_channels: int, image_size: int, classes: int) -> nn.Module:
    """A small residual-free CNN; any nn.Module taking (batch, in_channels, image_size, image_size) works."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.GELU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GroupNorm(8, 64), nn.GELU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes),
    )

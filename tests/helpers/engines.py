"""A linear model made private on random data: the setting of the noise, sampling and accounting tests."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpspeed import PrivacyEngine


def private_linear(noise=1.0, n=64, batch=16, dim=400, style="all-layer", **options):
    """(engine, model, optimizer, loader) of a bias-free Linear(dim, 1) with R = 2 on n examples."""
    torch.manual_seed(0)
    model = nn.Linear(dim, 1, bias=False)
    loader = DataLoader(TensorDataset(torch.randn(n, dim), torch.randn(n, 1)), batch_size=batch)
    engine = PrivacyEngine()
    model, opt, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                             data_loader=loader, noise_multiplier=noise, max_grad_norm=2.0,
                                             clipping_style=style, **options)
    return engine, model, opt, loader

"""The private model, optimizer and loader go through accelerate's Accelerator.prepare and train."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpspeed import PrivacyEngine
from dpspeed.sampling import DPDataLoader

accelerate = pytest.importorskip("accelerate")


def test_accelerator_prepare_keeps_the_private_training():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    data = DataLoader(TensorDataset(torch.randn(64, 6), torch.randint(0, 3, (64,))), batch_size=16)
    engine = PrivacyEngine()
    model, optimizer, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                                   data_loader=data, noise_multiplier=1.0, max_grad_norm=1.0,
                                                   max_physical_batch_size=8)
    accelerator = accelerate.Accelerator(cpu=True)
    prepared_model, prepared_optimizer, prepared_loader = accelerator.prepare(model, optimizer, loader)
    assert isinstance(prepared_loader, DPDataLoader)  # Poisson batches are not re-batched or sharded
    before = [p.detach().clone() for p in model.parameters()]
    for x, y in prepared_loader:
        accelerator.backward(nn.functional.cross_entropy(prepared_model(x), y))
        prepared_optimizer.step()
        prepared_optimizer.zero_grad()
    assert optimizer.logical_steps == 4 == engine.accountant.steps and engine.get_epsilon(1e-5) > 0
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    state = prepared_optimizer.state_dict()  # checkpoints through accelerate carry the privacy state
    assert "dpspeed" in state

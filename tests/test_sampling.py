"""Poisson sampling: binomial batch sizes, empty batches that still step, a resumable sampler."""

from __future__ import annotations

import pytest
import torch

from dpspeed.sampling import PoissonBatchSampler
from tests.helpers.engines import private_linear


def test_poisson_batch_sizes_are_binomial():
    n, q = 200, 0.1
    sampler = PoissonBatchSampler(n, q, steps=2000, seed=1)
    sizes = torch.tensor([len(b) for b in sampler], dtype=torch.float64)
    assert abs(float(sizes.mean()) - n * q) < 0.3
    assert abs(float(sizes.var()) - n * q * (1 - q)) < 2.0
    indices = [i for b in PoissonBatchSampler(n, q, steps=50, seed=1) for i in b]
    assert len(set(indices)) > 0.9 * len(set(range(n)) & set(indices))


def test_empty_logical_batch_still_steps_with_noise():
    engine, model, opt, loader = private_linear(noise=1.0, n=64, batch=1, seed=3)
    empties = 0
    for x, y in loader:
        if len(x) == 0:
            empties += 1
        (model(x) - y).square().sum().backward()
        opt.step()
        assert model.weight.grad is not None and torch.isfinite(model.weight.grad).all()
        opt.zero_grad()
    assert empties > 0 and engine.accountant.steps == len(loader)


def test_sampler_state_resumes_the_same_batches():
    a = PoissonBatchSampler(100, 0.2, steps=3, seed=5)
    list(a)
    state = a.state_dict()
    b = PoissonBatchSampler(100, 0.2, steps=3, seed=99)
    b.load_state_dict(state)
    assert list(a) == list(b)


def test_a_dp_loader_refuses_what_it_cannot_batch():
    from torch.utils.data import IterableDataset, TensorDataset

    from dpspeed.sampling import DPDataLoader

    class Stream(IterableDataset):
        def __iter__(self):
            yield torch.zeros(1)

    data = TensorDataset(torch.zeros(4, 1))
    with pytest.raises(TypeError, match="IterableDataset"):
        DPDataLoader(Stream(), [[0]])
    with pytest.raises(ValueError, match="max_physical_batch_size must be >= 1"):
        DPDataLoader(data, [[0, 1]], max_physical_batch_size=0)
    with pytest.raises(ValueError, match="needs max_physical_batch_size"):
        DPDataLoader(data, [[0, 1]], fixed_physical_batch=True)


def test_a_resumed_loader_with_workers_draws_what_would_have_come_next():
    """Workers draw ahead of what the loop has taken; the saved state is that after the last
    logical batch yielded, not the sampler's own (which ran ahead)."""
    from torch.utils.data import DataLoader, TensorDataset

    from dpspeed.sampling import DPDataLoader

    data = TensorDataset(torch.arange(200).float().unsqueeze(1))

    def loader():
        return DPDataLoader(data, PoissonBatchSampler(200, 0.1, steps=20, seed=4), num_workers=2,
                            **{"collate_fn": DataLoader(data).collate_fn})

    def rows(batch):
        return batch[0].flatten().long().tolist()

    first = loader()
    batches = iter(first)
    [next(batches) for _ in range(3)]
    state = first.state_dict()
    uninterrupted = [rows(next(batches)) for _ in range(2)]
    resumed = loader()
    resumed.load_state_dict(state)
    again = iter(resumed)
    assert [rows(next(again)) for _ in range(2)] == uninterrupted

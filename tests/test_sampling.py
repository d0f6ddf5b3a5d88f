"""Poisson sampling: binomial batch sizes, empty batches that still step, a resumable sampler."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import (DataLoader, RandomSampler, Sampler, Subset, SubsetRandomSampler, TensorDataset,
                              WeightedRandomSampler)

from dpspeed import PrivacyEngine
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


def _poisson_indices(loader, steps: int = 40) -> tuple[set[int], PrivacyEngine]:
    model = torch.nn.Linear(1, 1)
    engine = PrivacyEngine()
    _, _, private = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                        data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0)
    seen = set()
    for _ in range(steps // len(private) + 1):
        for indices in private.logical_batches:  # the data set indices of each logical batch
            seen.update(indices)
    engine.detach()
    return seen, engine


def test_poisson_sampling_ranges_over_the_users_subset_only():
    """A SubsetRandomSampler over the first 50 of 100 examples: never one of the other 50, and
    N = 50 in the accounting (it drew 21 of 48 examples from the excluded half before)."""
    data = TensorDataset(torch.arange(100.0).unsqueeze(1))
    loader = DataLoader(data, batch_size=10, sampler=SubsetRandomSampler(list(range(50))))
    seen, engine = _poisson_indices(loader)
    assert seen <= set(range(50)) and len(seen) > 40
    assert engine.examples == 50 and engine.sample_rate == 10 / 50


def test_a_subset_data_set_and_a_sampler_with_indices_are_followed():
    data = TensorDataset(torch.arange(100.0).unsqueeze(1))
    seen, engine = _poisson_indices(DataLoader(Subset(data, list(range(60, 90))), batch_size=5, shuffle=True))
    assert seen <= set(range(30)) and engine.examples == 30  # indices into the Subset: examples 60..89

    class EveryThird(Sampler):
        indices = list(range(0, 100, 3))

        def __iter__(self):
            return iter(self.indices)

        def __len__(self):
            return len(self.indices)

    seen, engine = _poisson_indices(DataLoader(data, batch_size=5, sampler=EveryThird()))
    assert seen <= set(range(0, 100, 3)) and engine.examples == 34


@pytest.mark.parametrize("sampler, message", [
    (lambda n: WeightedRandomSampler(torch.ones(n), n), "unequal or repeated chances"),
    (lambda n: RandomSampler(range(n), replacement=True), "unequal or repeated chances"),
    (lambda n: iter(range(n)), "cannot read which examples"),
    (lambda n: SubsetRandomSampler([1, 2, 2, 3]), "repeats indices"),
    (lambda n: SubsetRandomSampler([1, 2, n]), "outside the data set"),
])
def test_a_sampler_whose_examples_cannot_be_poisson_sampled_is_refused(sampler, message):
    model = torch.nn.Linear(1, 1)
    loader = DataLoader(TensorDataset(torch.randn(20, 1)), batch_size=4, sampler=sampler(20))
    with pytest.raises(ValueError, match=message):
        PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                     data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0)
    # the user's own batches remain possible, without epsilon
    engine = PrivacyEngine()
    engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
                        noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False)
    engine.detach()


def test_an_unseeded_sampler_saves_no_state():
    """Lightning (and torch.distributed.checkpoint) save every loader with a state_dict: without a
    seed, nothing in a checkpoint may let anyone regenerate which examples were drawn."""
    model = torch.nn.Linear(1, 1)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(20, 1)), batch_size=5)
    _, _, loader = PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                                data_loader=data, noise_multiplier=1.0, max_grad_norm=1.0)
    next(iter(loader))
    assert loader.state_dict() == {} and PoissonBatchSampler(20, 0.25).state_dict() == {}
    assert "generator" in PoissonBatchSampler(20, 0.25, seed=3).state_dict()


def test_deferred_announcements_of_a_broken_off_pass_are_dropped():
    """A loop that fetched ahead and broke off: the next pass's first batch gets its own announcement."""
    from dpspeed.sampling import DPDataLoader

    data = TensorDataset(torch.arange(12).float())
    loader = DPDataLoader(data, [[0, 1], [2, 3, 4], [5]], max_physical_batch_size=2)
    heard = []
    loader.on_physical_batch(lambda last, mask, starting, rows: heard.append((last, starting, rows)))
    announce = loader.defer_announcements()
    batches = iter(loader)
    next(batches), next(batches)  # fetched two, trained one
    announce()
    for _ in loader:  # a new pass
        announce()
    assert heard == [(True, True, 2), (True, True, 2), (False, False, 2), (True, False, 1), (True, False, 1)]

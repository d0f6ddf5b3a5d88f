"""Data-parallel DP over 2 processes (gloo on the CPU): the same update as one process, noise once,
ranks identical, one gradient's worth of communication per logical batch, a dead rank fails loudly."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset

from dpspeed import PrivacyEngine
from tests.helpers.processes import run_ranks, single_process_group

pytestmark = pytest.mark.multiprocess

N, DIM = 24, 5


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, DIM, generator=g), torch.randint(0, 3, (N,), generator=g)


def _model():
    torch.manual_seed(1234 + dist.get_rank())  # different on each rank: make_private must broadcast rank 0's
    return nn.Sequential(nn.Linear(DIM, 8), nn.Tanh(), nn.Linear(8, 3))


def _scenario(rank: int, scenario: str) -> dict:
    """Three logical batches on this rank; what it drew, the gradients it stepped with, and its
    collectives."""
    x, y = _data()
    if scenario == "unequal" and rank == 1:  # data split beforehand, each rank its half
        x, y = x[12:], y[12:]
    model = _model()
    if scenario == "buckets":  # one bucket per parameter
        from dpspeed.parallel import data_parallel

        data_parallel.BUCKET_BYTES = 40
    noise = 0.0 if scenario in ("exact", "buckets") else 1.0
    lr = 0.0 if scenario in ("exact", "noise", "buckets") else 0.5
    batch_size = 1 if scenario == "sparse" else 6  # q = 1/24: most local batches are empty
    sampler = None
    if scenario == "split-subsets":  # the same number of examples, different ones on each rank
        sampler = SubsetRandomSampler(range(12 * rank, 12 * rank + 12))
    if scenario == "shuffled-subset":  # the same examples, listed in a different order on each rank
        sampler = SubsetRandomSampler(torch.randperm(12, generator=torch.Generator().manual_seed(rank)).tolist())
    engine = PrivacyEngine()
    model, opt, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=batch_size, sampler=sampler),
        noise_multiplier=noise, max_grad_norm=0.5, max_physical_batch_size=2, loss_reduction="sum",
        seed=None if scenario == "train" else 5,  # unseeded: rank 0's entropy, shared
        clipping_mode="bk",
    )
    elements, in_backward, backward_running = [], [], [False]
    original = dist.all_reduce
    dist.all_reduce = lambda t, *a, **k: (elements.append(t.numel()), in_backward.append(backward_running[0]),
                                          original(t, *a, **k))[2]
    record = {"indices": [], "grads": [], "steps": 0, "empty": 0}
    start = {n: p.detach().clone().tolist() for n, p in model.named_parameters()}
    sampler_state = loader.logical_batches.state_dict()
    for step, batch_indices in enumerate(loader.logical_batches):
        record["indices"].append(batch_indices)
        if not batch_indices:
            record["empty"] += 1
        if step == 2:
            break
    loader.logical_batches.load_state_dict(sampler_state)  # replay the same draws for training
    for xb, yb in loader:
        if scenario == "dead" and rank == 1:
            os._exit(0)
        backward_running[0] = True
        nn.functional.cross_entropy(model(xb), yb, reduction="sum").backward()
        backward_running[0] = False
        opt.step()
        if opt.is_last_physical_batch:
            record["grads"].append({n: p.grad.tolist() for n, p in model.named_parameters()})
            record["steps"] += 1
        opt.zero_grad()
        if record["steps"] == 3:
            break
    dist.all_reduce = original  # the harness's barrier is not counted
    record["start"] = start
    record["final"] = {n: p.detach().tolist() for n, p in model.named_parameters()}
    record["all_reduce_elements"] = elements
    record["all_reduce_in_backward"] = in_backward
    record["epsilon"] = engine.get_epsilon(1e-5)
    return record


def _run(tmp_path, scenario: str, check: bool = True) -> list[dict]:
    return run_ranks(tmp_path, _scenario, scenario, timeout=20, check=check)


def _reference_step(indices: list[int], params: dict) -> dict:
    """One process, one example at a time: the clipped sum of the union of the ranks' examples."""
    x, y = _data()
    model = nn.Sequential(nn.Linear(DIM, 8), nn.Tanh(), nn.Linear(8, 3))
    model.load_state_dict({n: torch.tensor(v) for n, v in params.items()})
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in indices:
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum"),
                                    list(model.parameters()))
        norm = torch.sqrt(sum(g.square().sum() for g in grads))
        factor = min(1.0, 0.5 / (float(norm) + 1e-6))
        for (n, _), g in zip(model.named_parameters(), grads):
            total[n] += factor * g
    return total


def _check_union(ranks: list[dict]) -> None:
    """Both ranks' update is the one-process clipped sum of the union of their examples."""
    for step in range(3):
        union = ranks[0]["indices"][step] + ranks[1]["indices"][step]
        want = _reference_step(union, ranks[0]["start"])
        for r in ranks:
            for n, w in want.items():
                assert torch.allclose(torch.tensor(r["grads"][step][n]), w, atol=1e-6), (step, n)


def test_two_ranks_equal_one_process_on_the_union(tmp_path):
    ranks = _run(tmp_path, "exact")
    assert ranks[0]["start"] == ranks[1]["start"]  # rank 0's weights were broadcast
    shards = [set(i for b in r["indices"] for i in b) for r in ranks]
    assert not shards[0] & shards[1] and all(i % 2 == r for r, s in enumerate(shards) for i in s)
    _check_union(ranks)
    # one gradient's worth of communication per logical batch, nothing else
    numel = sum(torch.tensor(v).numel() for v in ranks[0]["start"].values())
    assert ranks[0]["all_reduce_elements"] == [numel] * 3
    assert ranks[0]["epsilon"] == ranks[1]["epsilon"]


def test_buckets_start_during_the_last_backward_in_one_order(tmp_path):
    """Small buckets (one per parameter): each logical batch sends every parameter once, in the
    parameters' reverse order on both ranks; a rank with examples in its last physical batch starts
    them inside that backward pass; the update is still the one-process update."""
    ranks = _run(tmp_path, "buckets")
    _check_union(ranks)
    sizes = [torch.tensor(v).numel() for v in ranks[0]["start"].values()][::-1]
    assert all(r["all_reduce_elements"] == sizes * 3 for r in ranks)
    assert any(any(r["all_reduce_in_backward"]) for r in ranks)


def test_noise_is_added_once_and_ranks_stay_identical(tmp_path):
    ranks = _run(tmp_path, "noise")
    for step in range(3):
        assert ranks[0]["grads"][step] == ranks[1]["grads"][step]  # the same noise on both ranks
    x = torch.cat([torch.tensor(g["0.weight"]).flatten() for g in ranks[0]["grads"]])
    clipped = torch.cat([_reference_step(ranks[0]["indices"][s] + ranks[1]["indices"][s], ranks[0]["start"])["0.weight"].flatten()
                         for s in range(3)])
    std = float((x - clipped).std())
    assert 0.8 * 0.5 < std < 1.2 * 0.5  # sigma * R, once: two noises would give 0.71


def test_training_keeps_ranks_bit_identical(tmp_path):
    ranks = _run(tmp_path, "train")
    assert ranks[0]["final"] == ranks[1]["final"]
    assert ranks[0]["final"] != ranks[0]["start"]


def test_ranks_with_empty_local_batches_step_together(tmp_path):
    ranks = _run(tmp_path, "sparse")
    assert sum(r["empty"] for r in ranks) > 0  # some rank drew nothing in some step
    assert all(r["steps"] == 3 for r in ranks)
    assert ranks[0]["final"] == ranks[1]["final"]


def test_a_dead_rank_makes_the_other_fail_clearly(tmp_path):
    try:
        _run(tmp_path, "dead", check=False)
    except mp.ProcessExitedException:
        pass  # the spawner may report the rank that left
    record = json.loads((tmp_path / "rank0.json").read_text())
    assert "all-reduce of the clipped gradients failed" in record["error"]


def _secure(rank: int) -> dict:
    """Three noisy logical steps in secure_mode: each rank's own secure batches, one noise key."""
    x, y = _data()
    model = _model()
    engine = PrivacyEngine(secure_mode=True)
    model, opt, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5), noise_multiplier=1.0, max_grad_norm=0.5,
        data_loader=DataLoader(TensorDataset(x, y), batch_size=6), max_physical_batch_size=2, loss_reduction="sum")
    steps, sizes = 0, []
    for xb, yb in loader:
        sizes.append(len(xb))
        nn.functional.cross_entropy(model(xb), yb, reduction="sum").backward()
        opt.step()
        opt.zero_grad()
        steps += opt.is_last_physical_batch
        if steps == 3:
            break
    return {"final": {n: p.detach().tolist() for n, p in model.named_parameters()}, "sizes": sizes}


def test_secure_mode_keeps_ranks_identical(tmp_path):
    """The noise key is rank 0's, broadcast: every rank adds the same noise and applies the same update."""
    ranks = run_ranks(tmp_path, _secure)
    assert ranks[0]["final"] == ranks[1]["final"]


def test_ranks_with_different_data_sets_are_refused(tmp_path):
    """They would sample different populations at different rates; epsilon would describe neither."""
    ranks = _run(tmp_path, "unequal", check=False)
    assert all("rank 0: 24 examples, batch_size 6, rank 1: 12 examples" in r["error"] for r in ranks), ranks


def test_ranks_sampling_different_subsets_of_one_size_are_refused(tmp_path):
    ranks = _run(tmp_path, "split-subsets", check=False)
    assert all("or the same number of different examples" in r["error"] for r in ranks), ranks


def test_ranks_listing_one_subset_in_different_orders_take_disjoint_shares(tmp_path):
    """Each rank shards the sorted indices: in the user's order, an example could fall in both
    ranks' shares (sampled at twice the rate) and another in none."""
    ranks = _run(tmp_path, "shuffled-subset")
    for batch_0, batch_1 in zip(ranks[0]["indices"], ranks[1]["indices"]):
        assert not set(batch_0) & set(batch_1)
        assert set(batch_0) | set(batch_1) <= set(range(12))


def _make_private(model: nn.Module) -> None:
    x, y = _data()
    PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                 data_loader=DataLoader(TensorDataset(x, y), batch_size=4),
                                 noise_multiplier=1.0, max_grad_norm=1.0)


def test_a_model_wrapped_in_ddp_is_refused_clearly():
    with single_process_group():
        wrapped = nn.parallel.DistributedDataParallel(nn.Linear(3, 2))
        with pytest.raises(ValueError, match="DistributedDataParallel"):
            _make_private(wrapped)

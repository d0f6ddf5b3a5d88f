"""Models sharded by fully_shard (FSDP2) over 2 processes (gloo on the CPU): the same update as one
process on the union of the ranks' examples, noise once per coordinate, and a model whose DP
training does not fit one process's memory budget trains when sharded."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpspeed import PrivacyEngine
from dpspeed.testing import assert_close, per_example_grads, reference_groups, reference_sum
from tests.helpers.memory_cap import MemoryCap
from tests.helpers.processes import run_ranks, single_process_group

pytestmark = pytest.mark.multiprocess

N, DIM, R = 24, 5, 0.5


class Net(nn.Module):
    """A bare parameter used in the root's own code (op-tap rule), a LayerNorm, and linear layers
    with row counts that do not split evenly over 2 ranks."""

    def __init__(self, width: int = 7, depth: int = 1):
        super().__init__()
        self.pos = nn.Parameter(0.1 * torch.randn(DIM))
        self.fc1 = nn.Linear(DIM, width)
        self.norm = nn.LayerNorm(width)
        self.hidden = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth - 1)])
        self.fc2 = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.norm(self.fc1(x + self.pos)))
        for layer in self.hidden:
            h = torch.tanh(layer(h))
        return self.fc2(h)


def _data(n: int = N):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, DIM, generator=g), torch.randint(0, 3, (n,), generator=g)


def _shard(model: Net, mesh) -> Net:
    from torch.distributed.fsdp import fully_shard

    for layer in [model.fc1, *model.hidden, model.fc2]:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


SCENARIOS = {  # name: (clipping_mode, clipping_style, noise_multiplier)
    "all-layer": ("bk", "all-layer", 0.0),
    "layer-wise": ("auto", "layer-wise", 0.0),
    "noise": ("bk", "all-layer", 1.0),
}


def _scenario(rank: int, scenario: str) -> dict:
    """Three logical batches of Net with fully_shard on each linear layer and the root."""
    from torch.distributed.device_mesh import init_device_mesh

    mode, style, noise = SCENARIOS[scenario]
    x, y = _data()
    torch.manual_seed(0)  # the same full model on both ranks; each keeps its shard
    model = _shard(Net(), init_device_mesh("cpu", (2,)))
    start = {n: p.full_tensor().tolist() for n, p in model.named_parameters()}
    engine = PrivacyEngine()
    model, opt, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=6), noise_multiplier=noise, max_grad_norm=R,
        max_physical_batch_size=2, seed=5, loss_reduction="sum", clipping_mode=mode, clipping_style=style,
    )
    scattered = []
    original = dist.reduce_scatter_tensor

    def counted(output, input, *args, **kwargs):
        scattered.append(input.numel())
        return original(output, input, *args, **kwargs)

    dist.reduce_scatter_tensor = counted
    record = {"indices": [], "grads": [], "local": [], "physical": [], "start": start}
    drawn_from = loader.logical_batches.state_dict()
    batches = iter(loader.logical_batches)
    record["indices"] = [next(batches) for _ in range(3)]
    loader.logical_batches.load_state_dict(drawn_from)  # replay the same draws for training
    physical = 0
    for xb, yb in loader:
        nn.functional.cross_entropy(model(xb), yb, reduction="sum").backward()
        opt.step()
        physical += 1
        if opt.is_last_physical_batch:
            record["grads"].append({n: p.grad.full_tensor().tolist() for n, p in model.named_parameters()})
            record["local"].append({n: p.grad.to_local().tolist() for n, p in model.named_parameters()})
            record["physical"].append(physical)
            physical = 0
        opt.zero_grad()
        if len(record["grads"]) == 3:
            break
    record["scattered"] = scattered
    record["rules"] = {b.name: type(b.rule).__name__ for b in engine.controller.bindings}
    record["epsilon"] = engine.get_epsilon(1e-5)
    return record


def _reference(indices: list[int], start: dict, style: str) -> dict[str, torch.Tensor]:
    """One unsharded process, one example at a time, on the union of the ranks' examples."""
    x, y = _data()
    model = Net()
    model.load_state_dict({n: torch.tensor(v) for n, v in start.items()})
    loss = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="sum")
    grads = per_example_grads(model, loss, [(x[i : i + 1], y[i : i + 1]) for i in indices])
    groups = reference_groups(style, list(start))
    return reference_sum(grads, groups, [R / math.sqrt(len(groups))] * len(groups), "abadi")


@pytest.mark.parametrize("scenario", ["all-layer", "layer-wise"])
def test_sharded_update_equals_one_process_on_the_union(tmp_path, scenario):
    ranks = run_ranks(tmp_path, _scenario, scenario)
    style = SCENARIOS[scenario][1]
    for step in range(3):
        union = ranks[0]["indices"][step] + ranks[1]["indices"][step]
        want = _reference(union, ranks[0]["start"], style)
        for r in ranks:
            assert_close({n: torch.tensor(v) for n, v in r["grads"][step].items()}, want, 1e-5)
    # fully_shard's FSDPLinear is still a Linear to dpspeed: no slow fallback
    assert ranks[0]["rules"] == {"": "ParameterOpRule", "fc1": "LinearRule", "norm": "LayerNormRule", "fc2": "LinearRule"}
    # every rank ran as many physical batches, though their local batches differ in size
    assert ranks[0]["physical"] == ranks[1]["physical"]
    local_sizes = [[len(r["indices"][s]) for s in range(3)] for r in ranks]
    assert local_sizes[0] != local_sizes[1]
    # each rank keeps only its rows of each gradient
    for name, value in ranks[0]["start"].items():
        rows = [len(r["local"][0][name]) for r in ranks]
        assert sum(rows) == len(value) and rows[0] == math.ceil(len(value) / 2)
    # one gradient's worth (padded to equal shards) reduce-scattered per physical batch
    padded = sum(2 * math.ceil(len(v) / 2) * (len(v[0]) if isinstance(v[0], list) else 1)
                 for v in ranks[0]["start"].values())
    assert sum(ranks[0]["scattered"]) == padded * sum(ranks[0]["physical"])
    assert ranks[0]["epsilon"] == ranks[1]["epsilon"]


def test_sharded_noise_is_added_once_per_coordinate(tmp_path):
    ranks = run_ranks(tmp_path, _scenario, "noise")
    noise = []
    for step in range(3):
        assert ranks[0]["grads"][step] == ranks[1]["grads"][step]  # both ranks see the same gradient
        want = _reference(ranks[0]["indices"][step] + ranks[1]["indices"][step], ranks[0]["start"], "all-layer")
        noise.append({n: torch.tensor(v) - want[n] for n, v in ranks[0]["grads"][step].items()})
    flat = torch.cat([v.flatten() for step in noise for v in step.values()])
    assert 0.8 * R < float(flat.std()) < 1.2 * R  # sigma * R: once, not once per rank
    # the ranks draw different noise for their shards (the same generator would repeat it)
    weight = noise[0]["fc1.weight"]  # 7 rows: 4 on rank 0, 3 on rank 1
    assert not torch.allclose(weight[:3], weight[4:7])


def _vit() -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3, depth=2)


def _images():
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 3, (16,), generator=g)


def _vit_run(rank: int) -> dict:
    """One logical batch of a timm ViT with fully_shard on each block and the root (auto, layer-wise)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model, mesh = _vit(), init_device_mesh("cpu", (2,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    x, y = _images()
    model, opt, loader = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=8), noise_multiplier=0.0, max_grad_norm=R,
        max_physical_batch_size=3, seed=3, loss_reduction="sum", clipping_mode="auto", clipping_style="layer-wise",
    )
    drawn_from = loader.logical_batches.state_dict()
    indices = next(iter(loader.logical_batches))
    loader.logical_batches.load_state_dict(drawn_from)  # replay the same draw
    for xb, yb in loader:
        nn.functional.cross_entropy(model(xb), yb, reduction="sum").backward()
        opt.step()
        if opt.is_last_physical_batch:
            break
        opt.zero_grad()
    return {"indices": indices, "grads": {n: p.grad.full_tensor().tolist() for n, p in model.named_parameters()}}


def test_a_sharded_timm_vit_equals_one_example_at_a_time(tmp_path):
    ranks = run_ranks(tmp_path, _vit_run)
    union = ranks[0]["indices"] + ranks[1]["indices"]
    x, y = _images()
    model = _vit()
    loss = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="sum")
    grads = per_example_grads(model, loss, [(x[i : i + 1], y[i : i + 1]) for i in union])
    groups = reference_groups("layer-wise", [n for n, p in model.named_parameters()])
    want = reference_sum(grads, groups, [R / math.sqrt(len(groups))] * len(groups), "abadi")
    assert_close({n: torch.tensor(v) for n, v in ranks[0]["grads"].items()}, want, 1e-4)


BUDGET = 6_000_000  # bytes of tensors one process may hold


def _train_within_budget(world: int, budget: int | None = BUDGET) -> dict:
    """Two logical steps of Adam on a 1.3 MB model (6 hidden layers of 256), everything from the
    model's construction on counted against `budget` (None: only measured)."""
    from torch.distributed.device_mesh import init_device_mesh

    x, y = _data()
    with MemoryCap(budget) as cap:
        torch.manual_seed(0)
        model = Net(width=256, depth=6)
        if world > 1:
            _shard(model, init_device_mesh("cpu", (world,)))
        start = [p.detach().clone() for p in model.parameters()]
        engine = PrivacyEngine()
        model, opt, loader = engine.make_private(
            module=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
            data_loader=DataLoader(TensorDataset(x, y), batch_size=6), noise_multiplier=1.0, max_grad_norm=R,
            max_physical_batch_size=3, seed=1, clipping_mode="bk",
        )
        steps = 0
        for xb, yb in loader:
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
            opt.zero_grad()
            steps += opt.is_last_physical_batch
            if steps == 2:
                break
        moved = all(not torch.equal(a, b.detach()) for a, b in zip(start, model.parameters()))
    return {"peak": cap.peak, "moved": moved}


def test_a_model_over_one_process_budget_trains_sharded_over_two(tmp_path):
    with pytest.raises(torch.OutOfMemoryError):
        _train_within_budget(1)
    ranks = run_ranks(tmp_path, _budget_run)
    assert all(r["moved"] and r["peak"] <= BUDGET for r in ranks)


def _budget_run(rank: int) -> dict:
    return _train_within_budget(2)


def _measure_run(rank: int) -> dict:  # benchmarks/sharded_memory.py: the peak without a budget
    return _train_within_budget(2, budget=None)



def test_a_sharded_model_needs_a_bk_mode():
    from torch.distributed.device_mesh import init_device_mesh

    with single_process_group():
        model = _shard(Net(), init_device_mesh("cpu", (1,)))
        x, y = _data()
        with pytest.raises(ValueError, match="bk mode"):
            PrivacyEngine().make_private(
                module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                data_loader=DataLoader(TensorDataset(x, y), batch_size=4), noise_multiplier=1.0, max_grad_norm=1.0,
                criterion=nn.CrossEntropyLoss(), clipping_mode="ghost",
            )

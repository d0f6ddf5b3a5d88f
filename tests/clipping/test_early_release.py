"""Group-wise memory release: a group's kept tensors go as soon as its clipping factors are known."""

from __future__ import annotations

import gc
import weakref

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpspeed import PrivacyEngine
from dpspeed.capture.bindings import bind_parameters
from dpspeed.clipping.early_release import release_units
from dpspeed.clipping.groups import make_grouping
from dpspeed.testing import check_model


def _held_when_first_layer_gradient_arrives(style) -> int:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    loader = DataLoader(TensorDataset(torch.randn(6, 4), torch.randint(0, 2, (6,))), batch_size=6)
    engine = PrivacyEngine()
    model, opt, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                             data_loader=loader, noise_multiplier=0.0, max_grad_norm=1.0,
                                             clipping_style=style, clipping_mode="bk", poisson_sampling=False)
    held = []
    x, y = next(iter(loader))
    with torch.no_grad():
        model(x)  # the first forward traces the model and installs the hooks
    def watch(module, args, out):
        if out.requires_grad:  # (not in the extra passes that check that examples do not interact)
            out.register_hook(lambda g: held.append(len(engine.controller.recordings[-1])))

    model[2].register_forward_hook(watch)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    return held[0]


def test_layer_wise_releases_each_layer_during_backward():
    # once the middle layer's output gradient has arrived, it and the last layer are clipped and
    # dropped; only the first layer (its gradient still to come) is held
    assert _held_when_first_layer_gradient_arrives("layer-wise") == 1


def test_all_layer_keeps_everything_until_the_factors_are_known():
    assert _held_when_first_layer_gradient_arrives("all-layer") == 3


def test_units_join_layers_that_share_a_group():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    names = [n for n, _ in model.named_parameters()]
    bindings = bind_parameters(model, dict(model.named_parameters()), None, lambda direct: None)
    grouping = make_grouping([["0.weight", "1.bias"], ["0.bias", "1.weight"], ["2.weight", "2.bias"]], names, 1.0)
    units = release_units(bindings, grouping)
    assert units[bindings[0]] == units[bindings[1]] != units[bindings[2]]


def _bk_on(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """(engine, model, optimizer, loader): bk, all-layer, no noise, the batch as one physical batch."""
    engine = PrivacyEngine()
    made = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=len(x)), noise_multiplier=0.0, max_grad_norm=1.0,
        clipping_mode="bk", poisson_sampling=False)
    return (engine, *made)


def test_a_norm_layer_keeps_its_per_example_gradients_not_its_tensors():
    """All-layer clipping waits for the whole backward pass; a LayerNorm's (B, T, d) input and
    output gradient are let go as soon as its gradient arrives, its (B, d) per-example gradients
    kept instead; the clipped sums stay the one-example reference's."""
    torch.manual_seed(0)
    x, y = torch.randn(6, 5, 4), torch.randn(6, 5, 3)
    engine, model, opt, loader = _bk_on(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 3)),
                                        x, y)
    seen = []

    def watch(module, args, out):  # the LayerNorm's input, before the first Linear's gradient arrives
        if out.requires_grad:
            out.register_hook(lambda g: seen.extend(
                (c.args, c.output_grads, {n: t.shape for n, t in c.per_sample.items()})
                for cs in engine.controller.recordings[-1].values() for c in cs if c.per_sample is not None))

    xb, yb = next(iter(loader))
    with torch.no_grad():
        model(xb)  # the first forward traces the model and installs the hooks
    model[1].register_forward_hook(watch)
    (model(xb) - yb).square().sum().backward()
    assert seen == [((), [None], {"weight": (6, 8), "bias": (6, 8)})]
    opt.step()
    engine.detach()
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 3)).double()
    check_model(fresh, x.double(), y.double(), loss_fn=lambda out, t: (out - t).square().sum((1, 2)),
                modes=["bk", "auto", "per-example"], styles=["all-layer", "layer-wise"])


def test_an_empty_batch_through_a_norm_layer_steps_with_noise_only():
    """Poisson sampling draws empty batches; a norm layer's gradient over none of them has no
    per-example gradients to keep (the reshape crashed)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 7), nn.LayerNorm(7), nn.Linear(7, 2))
    engine = PrivacyEngine()
    model, opt, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(torch.randn(40, 4), torch.randint(0, 2, (40,))), batch_size=1),
        noise_multiplier=1.0, max_grad_norm=1.0, seed=0)
    empty = 0
    for x, y in loader:
        empty += len(x) == 0
        nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
        opt.step()
        opt.zero_grad()
    assert empty > 0 and engine.accountant.steps == 40


class _ThreeOnOneInput(nn.Module):
    """q, k and v on the same normalised input, as a transformer's attention takes them."""

    def __init__(self):
        super().__init__()
        self.first, self.act, self.norm = nn.Linear(4, 8), nn.Tanh(), nn.LayerNorm(8)
        self.q, self.k, self.v = nn.Linear(8, 3), nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x):
        h = self.norm(self.act(self.first(x))).float()  # float32 under autocast, as on a GPU
        return self.q(h) * self.k(h) + self.v(h)


def test_inputs_are_kept_in_the_compute_dtype_once_their_gradient_arrives():
    """Under bf16 autocast a Linear's float32 input (a LayerNorm's output) was kept in float32 until
    the end of the backward pass; it is cast as its gradient arrives, one 16-bit copy for q, k and v."""
    torch.manual_seed(0)
    x, y = torch.randn(6, 5, 4), torch.randn(6, 5, 3)
    engine, model, opt, loader = _bk_on(_ThreeOnOneInput(), x, y)
    kept = []

    def watch(module, args, out):  # tanh's output: q, k, v and the norm have their gradients, the first Linear not
        if out.requires_grad:
            out.register_hook(lambda g: kept.extend(
                (weakref.ref(calls[0].args[0]), calls[0].args[0].dtype, id(calls[0].args[0]))
                for b, calls in engine.controller.recordings[-1].items() if b.name in ("q", "k", "v")))

    xb, yb = next(iter(loader))
    with torch.no_grad():
        model(xb)  # the first forward traces the model and installs the hooks
    model.act.register_forward_hook(watch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(xb)
    (out.float() - yb).square().sum().backward()
    assert [dtype for _, dtype, _ in kept] == [torch.bfloat16] * 3
    assert len({identity for _, _, identity in kept}) == 1  # one copy, seen by the three while alive
    gc.collect()
    assert all(ref() is None for ref, _, _ in kept)  # clipped: nothing holds the copy (the controller did)

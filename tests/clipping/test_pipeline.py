"""The clipping pipeline on toy per-example gradients: norms -> per-group factors -> clipped sums,
with mean-reduced losses, padding rows, non-finite examples and every method of making the norms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dpspeed.capture.records import Binding, Call
from dpspeed.clipping.config import ClippingConfig
from dpspeed.clipping.pipeline import clip_factors, clip_pass
from dpspeed.layers.precision import weighted_sum
from dpspeed.layers.rule import LayerRule

pytestmark = pytest.mark.usefixtures("float64")


class Given(LayerRule):
    """A rule whose per-example gradients are its call's input: (B, k) rows for the parameter "w"."""

    ghost = True

    def per_sample_grads(self, module, call, names):
        return {"w": call.input()}

    def ghost_sq_norms(self, module, call, names):
        return {"w": call.input().square().sum(1)}

    def clipped_sum(self, module, call, names, factors):
        return {"w": weighted_sum(factors["w"], call.input())}


def _recording(grads: dict[str, torch.Tensor]) -> dict:
    """One binding per parameter, its call's input the per-example gradients."""
    recording = {}
    for name, g in grads.items():
        module = nn.Module()
        module.w = nn.Parameter(torch.zeros(g.shape[1]))
        recording[Binding(module, name, Given(), {"w": f"{name}.w"})] = [Call((g,), {}, [torch.zeros(len(g), 1)])]
    return recording


GRADS = {"a": torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]], dtype=torch.float64),
         "b": torch.tensor([[0.0], [1.2], [2.0]], dtype=torch.float64)}


def _config(mode="bk", style="all-layer", reduction="sum", r=1.0, fn="abadi") -> ClippingConfig:
    return ClippingConfig.create(mode, style, fn, reduction, r, ["a.w", "b.w"])


def _want(style: str, r: float) -> dict[str, torch.Tensor]:
    groups = [["a", "b"]] if style == "all-layer" else [["a"], ["b"]]
    threshold = r / math.sqrt(len(groups))
    want = {n: torch.zeros(GRADS[n].shape[1]) for n in GRADS}
    for i in range(3):
        for group in groups:
            norm = math.sqrt(sum(float(GRADS[n][i].square().sum()) for n in group))
            for n in group:
                want[n] += min(1.0, threshold / (norm + 1e-6)) * GRADS[n][i]
    return {f"{n}.w": w for n, w in want.items()}


@pytest.mark.parametrize("mode", ["per-example", "bk", "bk-mix-opt", "auto"])
@pytest.mark.parametrize("style", ["all-layer", "param-wise"])
def test_clipped_sums_of_known_gradients(mode, style):
    clipped = clip_pass(_recording(GRADS), _config(mode, style))
    want = _want(style, 1.0)
    assert set(clipped.sums) == set(want) and clipped.nonfinite == 0
    for n in want:
        assert torch.allclose(clipped.sums[n], want[n])


def test_factors_per_group_and_example():
    pf = clip_factors(_recording(GRADS), _config(style="param-wise", r=math.sqrt(2)))
    norms = torch.tensor([[5.0, 0.5, 0.0], [0.0, 1.2, 2.0]])
    assert pf.factors.shape == (2, 3) and pf.batch == 3
    assert torch.allclose(pf.factors, (1.0 / (norms + 1e-6)).clamp(max=1.0))


def test_a_mean_reduced_loss_is_scaled_back_to_each_examples_own_gradient():
    """The recorded gradients of a mean carry 1/B: the norms are B times theirs, the factors
    B times too, so that the clipped sum is that of the examples' own gradients."""
    recorded = _recording({n: g / 3 for n, g in GRADS.items()})
    clipped = clip_pass(recorded, _config(reduction="mean"))
    for n, w in _want("all-layer", 1.0).items():
        assert torch.allclose(clipped.sums[n], w)


def test_padding_rows_and_non_finite_examples_contribute_nothing():
    grads = {n: g.clone() for n, g in GRADS.items()}
    grads["b"][1, 0] = float("nan")
    pf = clip_factors(_recording(grads), _config(), row_mask=torch.tensor([True, True, False]))
    assert pf.nonfinite == 1
    assert pf.factors[0, 0] > 0 and pf.factors[0, 1] == 0 and pf.factors[0, 2] == 0
    clipped = clip_pass(_recording(grads), _config(), row_mask=torch.tensor([True, True, False]))
    assert torch.allclose(clipped.sums["a.w"], GRADS["a"][0] / 5) and torch.isfinite(clipped.sums["b.w"]).all()


def test_sums_arrive_layer_by_layer_when_asked_and_the_calls_are_released():
    recorded = _recording(GRADS)
    parts = []
    clipped = clip_pass(recorded, _config(), on_sums=lambda part: parts.append(dict(part)))
    assert clipped.sums == {} and [set(p) for p in parts] == [{"a.w"}, {"b.w"}]
    assert all(not c.args and not c.has_grads for calls in recorded.values() for c in calls)

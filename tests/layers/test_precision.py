"""Mixed precision: under bf16 autocast the clipped sum matches the float32 reference within bf16
accuracy, and the clipping factors are computed in float32."""

from __future__ import annotations

import pytest
import torch

from dpspeed.testing import assert_close, per_example_grads, private_grads, reference_sum
from tests.helpers import DEVICE
from tests.helpers.models import on_device, small_cases


@pytest.mark.parametrize("name", ["mlp", "vit", "lm"])
@pytest.mark.parametrize("mode", ["per-example", "bk", "auto"])
def test_bf16_autocast_matches_float32_reference(name, mode):
    torch.manual_seed(1)
    case = on_device(small_cases()[name](), DEVICE)
    n = len(case.tensors[0])
    grads = per_example_grads(case.model, lambda m, b: case.loss(m, b, "sum"), [tuple(t[i:i + 1] for t in case.tensors) for i in range(n)])
    want = reference_sum(grads, [list(grads[0])], [0.3], "abadi")

    def loss(m, b):
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            return case.loss(m, b, "sum")

    got, engine = private_grads(case.model, loss, case.tensors, max_grad_norm=0.3, clipping_mode=mode, loss_reduction="sum")
    engine.detach()
    assert all(g.dtype == torch.float32 for g in got.values())
    assert_close(got, want, 3e-2)


def test_factors_are_float32_under_autocast(monkeypatch):
    from dpspeed.clipping import pipeline

    seen = []
    original = pipeline.clip_factors

    def spy(*args, **kwargs):
        pf = original(*args, **kwargs)
        seen.append(pf.factors.dtype)
        return pf

    monkeypatch.setattr(pipeline, "clip_factors", spy)
    case = on_device(small_cases()["mlp"](), DEVICE)

    def loss(m, b):
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            return case.loss(m, b, "mean")

    private_grads(case.model, loss, case.tensors, clipping_mode="bk")[1].detach()
    assert seen and all(d == torch.float32 for d in seen)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_factors_cast_down_never_grow(dtype):
    """A clipping factor cast to a 16-bit dtype is never larger than the float32 factor, so no
    clipped gradient exceeds the threshold by rounding; within one epsilon of it, or 0 below the
    dtype's smallest normal value."""
    from dpspeed.layers.precision import factors_in

    torch.manual_seed(0)
    factors = torch.cat([torch.rand(100_000), torch.tensor([1.0, 0.5, 2.0**-20, 1e-7, 3e-5, 0.0])])
    cast = factors_in(dtype, factors).float()
    assert (cast <= factors).all()
    normal = factors >= torch.finfo(dtype).tiny
    assert ((factors - cast)[normal] <= factors[normal] * torch.finfo(dtype).eps).all()
    assert (cast[~normal] == 0).all()

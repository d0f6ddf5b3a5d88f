"""Mixed precision: under bf16 autocast the clipped sum matches the float32 reference within bf16
accuracy, and the clipping factors are computed in float32."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dpspeed.testing import assert_close, per_example_grads, private_grads, reference_sum
from tests.helpers import DEVICE
from tests.helpers.models import on_device, small_cases, timm_cases


@pytest.mark.parametrize("name", ["mlp", "vit", "lm", "timm_bit"])
@pytest.mark.parametrize("mode", ["per-example", "bk", "auto"])
def test_bf16_autocast_matches_float32_reference(name, mode):
    """(timm_bit: StdConv2d's and GroupNormAct's recorded ops are replayed under the autocast they
    ran under; the replay crashed on a bf16 input against its float32 weight. Its reference is each
    example's own gradient under the same autocast: twelve bf16 normalisations move the float32
    gradients by 9% before any clipping, in every mode.)"""
    torch.manual_seed(1)
    case = on_device({**small_cases(), **timm_cases()}[name](), DEVICE)
    n = len(case.tensors[0])

    def loss(m, b):
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            return case.loss(m, b, "sum")

    reference_loss = loss if name == "timm_bit" else (lambda m, b: case.loss(m, b, "sum"))
    grads = per_example_grads(case.model, reference_loss, [tuple(t[i:i + 1] for t in case.tensors) for i in range(n)])
    want = reference_sum(grads, [list(grads[0])], [0.3], "abadi")

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


def _cancelling_contribution(scale: float, mode: str, dtype: torch.dtype, r: float = 1.0) -> float:
    """What one crafted example adds to the clipped sum (the sum with it minus the sum without it):
    inputs s·u and 1.5·s·u at two positions, output gradients 1.5·v and -v, so that its exact
    gradient a^T g is 0, beside seven random examples."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3, bias=False)
    x, w = torch.randn(8, 2, 4), torch.randn(8, 2, 3)
    x[0, 0], x[0, 1] = scale, 1.5 * scale
    w[0, 0], w[0, 1] = 1.5, -1.0

    def loss(m, b):
        if dtype == torch.float32:
            return (m(b[0]) * b[1]).sum()
        with torch.autocast("cpu", dtype=dtype):
            out = m(b[0])
        return (out.float() * b[1]).sum()

    sums = []
    for batch in ((x, w), (x[1:], w[1:])):
        got, engine = private_grads(model, loss, batch, max_grad_norm=r, clipping_mode=mode, loss_reduction="sum")
        engine.detach()
        sums.append(got["weight"].double())
    return float((sums[0] - sums[1]).norm())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("mode", ["bk", "bk-mix-ghost", "bk-mix-opt", "auto", "per-example"])
def test_a_cancelling_example_contributes_at_most_r_at_every_scale(mode, dtype):
    """Its ghost norm is ~0, so its factor is 1; rounding the factor-scaled operand used to undo the
    cancellation in the sum (7·R at 2^10 in bf16, 7·10^6·R at 2^30). The raised norm bounds it."""
    for k in range(0, 31, 5):
        assert _cancelling_contribution(2.0**k, mode, dtype) <= 1.0 + 1e-6, f"scale 2^{k}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ten_thousand_random_examples_each_add_at_most_r(dtype):
    """What book-keeping adds for each example, a_i^T round(C_i g_i) (the rounding clipped_matmul
    does, then exact arithmetic), never exceeds R, for heavy-tailed random inputs whose
    per-position terms partly cancel."""
    from dpspeed.capture.records import Binding, Call
    from dpspeed.clipping.config import ClippingConfig
    from dpspeed.clipping.pipeline import clip_factors
    from dpspeed.layers.linear import LinearRule
    from dpspeed.layers.precision import factors_in

    torch.manual_seed(0)
    n, positions = 10_000, 3
    scales = torch.exp((torch.randn(n, 1, 1) * 3).clamp(-8, 8))  # from e^-8 to e^8 (fp16 reaches 65504)
    a = (torch.randn(n, positions, 4) * scales).to(dtype)
    g = torch.randn(n, positions, 5).to(dtype)
    g[:, 1] = -g[:, 0] * (a[:, 0, :1] / a[:, 1, :1].clamp_min(1e-30)).abs().clamp(0.5, 2).to(dtype)  # partial cancellation
    layer = nn.Linear(4, 5, bias=False)
    binding = Binding(layer, "layer", LinearRule(), {"weight": "layer.weight"})
    config = ClippingConfig.create("bk", "all-layer", "abadi", "sum", 1.0, ["layer.weight"])
    factors = clip_factors({binding: [Call((a,), {}, [g])]}, config).factors[0]
    assert torch.isfinite(factors).all()
    scaled = factors_in(dtype, factors).view(-1, 1, 1) * g  # as clipped_matmul rounds it
    added = torch.einsum("btd,btp->bpd", a.double(), scaled.double())
    assert float(added.flatten(1).norm(dim=1).max()) <= 1.0


def _many_positions(kind: str, scale: float, positions: int = 1024):
    """A layer and a batch whose example 0 has the same input at every position and output
    gradients v at all but one, -(T-1)·v at the last: its exact gradient is 0, but its terms are
    large, and their float32 accumulation in the clipped sum need not cancel."""
    torch.manual_seed(0)
    if kind == "linear":
        layer, x, w = nn.Linear(2, 2, bias=False), torch.randn(8, positions, 2), torch.randn(8, positions, 2)
        x[0] = scale
        w[0, :-1], w[0, -1] = 1.0, -(positions - 1.0)
    elif kind == "conv":
        layer, x, w = nn.Conv1d(4, 4, 1, groups=2, bias=False), torch.randn(8, 4, positions), torch.randn(8, 4, positions)
        x[0] = scale
        w[0, :, :-1], w[0, :, -1] = 1.0, -(positions - 1.0)
    elif kind == "stdconv":  # BiT's weight-standardised convolution: book-keeping through the standardisation
        from timm.layers import StdConv2d

        layer = StdConv2d(4, 4, 1, groups=2, bias=False, eps=1e-8)
        with torch.no_grad():
            layer.weight.mul_(1e-3)  # a small spread s: the pull-back multiplies the sum's rounding by 1/s
        x, w = torch.randn(8, 4, 1, positions), torch.randn(8, 4, 1, positions)
        x[0] = scale
        w[0, :, :, :-1], w[0, :, :, -1] = 1.0, -(positions - 1.0)
    else:
        layer, x, w = nn.Embedding(4, 2), torch.randint(0, 4, (8, positions)), torch.randn(8, positions, 2)
        x[0] = 0
        w[0, :-1], w[0, -1] = scale, -(positions - 1) * scale
    return layer, x, w


@pytest.mark.parametrize("kind", ["linear", "conv", "stdconv", "embedding"])
@pytest.mark.parametrize("mode", ["bk", "bk-mix-ghost", "auto"])
def test_a_cancellation_over_many_positions_adds_at_most_r_in_float32(kind, mode):
    for scale in (1e3, 1e7, 1e15 if "conv" in kind else 1e9):
        layer, x, w = _many_positions(kind, scale)
        sums = []
        for batch in ((x, w), (x[1:], w[1:])):
            model = copy.deepcopy(layer)
            got, engine = private_grads(model, lambda m, b: (m(b[0]) * b[1]).sum(), batch, max_grad_norm=1.0,
                                        clipping_mode=mode, loss_reduction="sum")
            engine.detach()
            sums.append(got["weight"].double())
        assert float((sums[0] - sums[1]).norm()) <= 1.0 + 1e-6, f"scale {scale:g}"


def test_tf32_is_read_and_switched_through_either_of_torchs_switches():
    """Setting TF32 through fp32_precision makes reading allow_tf32 an error."""
    from dpspeed.layers.precision import exact_float32_matmuls, product_roundoff, tf32_matmuls

    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        assert tf32_matmuls() and product_roundoff(torch.float32, torch.device("cuda")) == 2.0**-11
        with exact_float32_matmuls():
            assert not tf32_matmuls()
        assert tf32_matmuls()
    finally:
        matmul.fp32_precision = saved


def test_small_row_norms_are_stacked_and_match_each_alone():
    """Rows of one shape and dtype share a product; each keeps the norm it has alone, in its dtype's
    accumulation dtype; rows above the limit, and empty batches, are measured as they are."""
    from dpspeed.layers.precision import STACKED_ROWS_LIMIT, squared_row_norms, squared_row_norms_together

    torch.manual_seed(0)
    rows = [torch.randn(5, 7), torch.randn(5, 3, 4), torch.randn(5, 7) * 1e3, torch.randn(5, STACKED_ROWS_LIMIT + 1),
            torch.randn(5, 7, dtype=torch.bfloat16), torch.randn(5, 7, dtype=torch.bfloat16), torch.randn(0, 7),
            torch.randn(0, 7), torch.randn(5, 7, dtype=torch.float64)]
    together = squared_row_norms_together(rows)
    for x, got in zip(rows, together):
        want = squared_row_norms(x)
        assert got.dtype == want.dtype and got.shape == (x.shape[0],)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_small_weighted_sums_are_taken_side_by_side_and_match_each_alone():
    """Terms of one factor tensor, dtype and device share a product; others, and tensors above the
    limit, are summed as they are; each sum keeps its shape and the value it has alone."""
    from dpspeed.layers.precision import STACKED_ROWS_LIMIT, weighted_sum, weighted_sums_together

    torch.manual_seed(0)
    c, d = torch.rand(5), torch.rand(5)
    terms = [(c, torch.randn(5, 7)), (c, torch.randn(5, 3, 4)), (d, torch.randn(5, 7)),
             (c, torch.randn(5, STACKED_ROWS_LIMIT + 1)), (c, torch.randn(5, 7, dtype=torch.bfloat16)),
             (c, torch.randn(5, 2, dtype=torch.bfloat16)), (c, torch.randn(5, 7) * 1e3),
             (torch.rand(0), torch.randn(0, 7)), (torch.rand(0), torch.randn(0, 7))]
    for (factors, x), got in zip(terms, weighted_sums_together(terms)):
        want = weighted_sum(factors, x)
        assert got.dtype == want.dtype and got.shape == x.shape[1:]
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_a_pass_takes_its_bias_and_norm_layer_norms_and_sums_together(monkeypatch):
    """Three Linear biases and a LayerNorm's two per-example gradients, all (B, 8): one squared row
    norm product and one clipped-sum product for the five, and the sum still the one-example
    reference's."""
    from dpspeed.layers import precision

    calls, sums = [], []
    alone, summed = precision.squared_row_norms, precision.weighted_sum
    monkeypatch.setattr(precision, "squared_row_norms", lambda x: calls.append(tuple(x.shape)) or alone(x))
    monkeypatch.setattr(precision, "weighted_sum", lambda c, x: sums.append(tuple(x.shape)) or summed(c, x))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 8))
    x, y = torch.randn(6, 4, 8), torch.randn(6, 4, 8)
    loss = lambda m, b: (m(b[0]) - b[1]).square().sum()  # noqa: E731
    got, engine = private_grads(copy.deepcopy(model), loss, (x, y), clipping_mode="bk", loss_reduction="sum",
                                max_grad_norm=0.5)
    engine.detach()
    assert calls == [(5 * 6, 8)] and sums == [(6, 5 * 8)]
    examples = [(x[i : i + 1], y[i : i + 1]) for i in range(len(x))]
    want = reference_sum(per_example_grads(model, loss, examples), [[n for n, _ in model.named_parameters()]], [0.5],
                         "abadi")
    assert_close(got, want, rtol=1e-5)


class _BackwardUnderAutocast:
    """A loss whose backward pass runs inside the user's bf16 autocast (clipping runs in its hooks)."""

    def __init__(self, loss: torch.Tensor):
        self.loss = loss

    def backward(self) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            self.loss.backward()


def test_clipping_inside_the_users_autocast_keeps_each_example_within_r():
    """A float32 layer's norms and clipped sum were taken in bf16 when the backward pass ran under
    autocast, past the float32 rounding bound: one example added up to 1.002 R."""
    worst = 0.0
    for seed in range(12):
        torch.manual_seed(seed)
        model = nn.Linear(64, 64, bias=False)
        x, y = torch.randn(1, 16, 64), torch.randn(1, 16, 64)
        loss = lambda m, b: _BackwardUnderAutocast((m(b[0]) - b[1]).square().sum())  # noqa: E731
        got, engine = private_grads(model, loss, (x, y), clipping_mode="bk", loss_reduction="sum", max_grad_norm=1.0)
        engine.detach()
        assert got["weight"].dtype == torch.float32
        worst = max(worst, float(got["weight"].double().norm()))
    assert worst <= 1.0


def test_only_small_explicit_sums_are_formed_ahead_of_their_layers(monkeypatch):
    """The small explicit gradients' sums are formed together before the first layer's are handed
    on; a large one is summed in its turn (the sums stream to FSDP's reduce-scatter layer by layer)."""
    from dpspeed.clipping import pipeline
    from dpspeed.layers.precision import STACKED_ROWS_LIMIT

    seen = []
    together = pipeline.weighted_sums_together
    monkeypatch.setattr(pipeline, "weighted_sums_together",
                        lambda terms: seen.extend(x[0].numel() for _, x in terms) or together(terms))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(80, 80), nn.Tanh(), nn.Linear(80, 4))
    x, y = torch.randn(5, 80), torch.randn(5, 4)
    loss = lambda m, b: (m(b[0]) - b[1]).square().sum()  # noqa: E731
    _, engine = private_grads(model, loss, (x, y), clipping_mode="per-example", loss_reduction="sum")
    engine.detach()
    assert 80 * 80 > STACKED_ROWS_LIMIT and 80 in seen and max(seen) <= STACKED_ROWS_LIMIT

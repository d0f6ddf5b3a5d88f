"""Each layer rule, and the fallback, alone: every mode against the one-example reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dpspeed.testing import ONE_PASS_MODES, assert_close, check_rule, per_example_grads, private_grads, reference_sum

pytestmark = pytest.mark.usefixtures("float64")


class Scaled(nn.Module):
    """A module with a bare parameter and no rule: the torch.func fallback."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(4) + 0.5)
        self.inner = nn.Linear(4, 4)

    def forward(self, x):
        return torch.tanh(self.inner(x) * self.scale)


class Reshaped(nn.Module):
    """A bare parameter reshaped to (2, 3): in a physical batch of 2, its first size equals the
    batch size without being an expansion to it (its replay once shrank the 2 to 1)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6))

    def forward(self, x):
        return x * self.w.view(2, 3).sum(1)


class Attention(nn.Module):
    """nn.MultiheadAttention uses out_proj.weight inside its own forward, not out_proj's."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def _frozen_bias() -> nn.Module:
    layer = nn.Linear(4, 3)
    layer.bias.requires_grad_(False)
    return layer


def _std_conv(**options) -> nn.Module:
    """timm's StdConv2d (BiT's convolution), with a weight whose channels have different scales."""
    timm = pytest.importorskip("timm")
    conv = timm.layers.StdConv2d(2, 4, 3, padding=1, eps=1e-3, **options)
    with torch.no_grad():
        conv.weight.mul_(torch.linspace(0.1, 2.0, 4).view(4, 1, 1, 1))
    return conv


def _group_norm_act(act: str | None) -> nn.Module:
    """timm's GroupNormAct (BiT's norm), with its activation applied in place (ReLU's default)."""
    from timm.layers import GroupNormAct

    norm = GroupNormAct(4, num_groups=2, act_layer=act or "relu", apply_act=act is not None)
    with torch.no_grad():  # off the default init, so that the activation's kink is crossed
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    return norm


LAYERS = {
    "linear": (lambda: nn.Linear(4, 3), (5, 4)),
    "linear_3d": (lambda: nn.Linear(4, 3), (5, 2, 3, 4)),
    "linear_no_bias": (lambda: nn.Linear(4, 3, bias=False), (5, 4)),
    "linear_frozen_bias": (_frozen_bias, (5, 4)),
    "conv1d": (lambda: nn.Conv1d(2, 4, 3, stride=2, padding=1), (5, 2, 9)),
    "conv2d_same_dilated": (lambda: nn.Conv2d(2, 4, 3, padding="same", dilation=2), (5, 2, 7, 7)),
    "conv2d_grouped": (lambda: nn.Conv2d(4, 6, (3, 2), groups=2, stride=(2, 1)), (5, 4, 7, 6)),
    "conv2d_depthwise": (lambda: nn.Conv2d(4, 8, 3, groups=4, padding=1), (5, 4, 6, 6)),
    "conv2d_reflect": (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), (5, 2, 6, 6)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2, stride=(1, 2, 1), padding=(1, 0, 1)), (5, 2, 4, 5, 3)),
    "layernorm": (lambda: nn.LayerNorm((3, 4)), (5, 2, 3, 4)),
    "rmsnorm": (lambda: nn.RMSNorm(4), (5, 3, 4)),
    "groupnorm": (lambda: nn.GroupNorm(2, 4), (5, 4, 3, 3)),
    "instancenorm": (lambda: nn.InstanceNorm2d(3, affine=True), (5, 3, 4, 4)),
    "std_conv2d": (_std_conv, (5, 2, 5, 5)),
    "std_conv2d_grouped_strided_bias": (lambda: _std_conv(groups=2, stride=2, bias=True), (5, 2, 6, 6)),
    "hf_conv1d": (lambda: pytest.importorskip("transformers").pytorch_utils.Conv1D(3, 4), (5, 2, 4)),
    "groupnorm_act_relu": (lambda: _group_norm_act("relu"), (5, 4, 3, 3)),
    "groupnorm_act_silu": (lambda: _group_norm_act("silu"), (5, 4, 3, 3)),
    "groupnorm_act_none": (lambda: _group_norm_act(None), (5, 4, 3)),
    "fallback_bare_param": (Scaled, (5, 4)),
    "fallback_bare_param_reshaped": (Reshaped, (5, 2)),
    "multihead_attention": (Attention, (5, 3, 4)),
}


def _loss(weights: torch.Tensor, reduction: str):
    def loss(model, batch):
        per_example = (model(batch[0]) * weights).flatten(1).sum(1) ** 2
        return per_example.mean() if reduction == "mean" else per_example.sum()
    return loss


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("mode", ONE_PASS_MODES)
def test_layer(name, mode):
    """All-layer and param-wise clipping, mean over physical batches of 2 and sum over one."""
    torch.manual_seed(0)
    build, shape = LAYERS[name]
    check_rule(build(), torch.randn(*shape), modes=[mode])


def test_embedding_with_padding_idx():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 3, padding_idx=0), nn.Flatten(), nn.Linear(12, 2)).double()
    ids = torch.randint(0, 7, (6, 4))
    ids[0, :2] = 0
    loss = lambda m, b: m(b[0]).square().sum()
    grads = per_example_grads(model, loss, [(ids[i : i + 1],) for i in range(6)])
    names = list(grads[0])
    for mode in ONE_PASS_MODES:
        got, engine = private_grads(model, loss, (ids,), max_grad_norm=0.5, clipping_mode=mode, loss_reduction="sum")
        engine.detach()
        assert_close(got, reference_sum(grads, [names], [0.5], "abadi"), 1e-6)


def test_layers_on_one_input_share_its_gram_matrix(monkeypatch):
    """q, k and v projections of one input: a_i a_i^T is computed once, and the sums stay exact."""

    class QKV(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.q(x) * self.k(x) + self.v(x)

    torch.manual_seed(0)
    model = QKV().double()
    x = torch.randn(5, 3, 4)
    weights = torch.randn(3, 4)
    grads = per_example_grads(model, _loss(weights, "sum"), [(x[i : i + 1],) for i in range(5)])
    calls = []
    bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda a, b: (calls.append(a.shape), bmm(a, b))[1])
    got, engine = private_grads(model, _loss(weights, "sum"), (x,), max_grad_norm=0.5, clipping_mode="bk",
                                loss_reduction="sum")
    engine.detach()
    # a Gram's left operand is (B, T, k); the clipped sums are one (1, p, BT) product each, and the
    # dot products of flattened Grams and of bias terms (B, 1, k)
    grams = [shape for shape in calls if shape[0] == len(x) and shape[1] == x.shape[1]]
    assert len(grams) == 1 + 3  # one Gram of the shared input, one of each output gradient
    assert_close(got, reference_sum(grads, [list(grads[0])], [0.5], "abadi"), 1e-6)


def test_a_groupnormact_whose_activation_has_parameters_is_exact():
    """A PReLU inside GroupNormAct: the rule's replay of the activation was recorded by the PReLU's
    own binding, whose gradients went wrong (relative error up to 2)."""
    from timm.layers import GroupNormAct

    norm = GroupNormAct(8, 2, act_layer=nn.PReLU)
    for seed in range(3):
        torch.manual_seed(seed)
        check_rule(norm, torch.randn(4, 8, 5, 5), modes=["per-example", "bk"])


def test_stdconv_book_keeping_bounds_its_rounding_through_the_pull_back():
    """BiT's StdConv2d sums by book-keeping for w_hat, then pulls the sum back through the
    standardisation: per output channel a projection (norm at most 1) divided by s, so the rounding
    bound of w_hat's sum is divided by the smallest s; its norms come from explicit gradients formed
    one layer at a time, equal to per_sample_grads'."""
    from timm.layers import StdConv2d

    from dpspeed.capture.records import Call
    from dpspeed.layers.conv import ConvRule, StdConvRule

    torch.manual_seed(0)
    conv = StdConv2d(3, 4, 3, padding=1, eps=1e-8)
    with torch.no_grad():
        conv.weight[1].mul_(1e-2)  # one channel with a small spread
    x = torch.randn(5, 3, 6, 6)
    g = torch.randn(5, 4, 6, 6)
    names = ["weight", "bias"]
    rule = StdConvRule()
    s = (conv.weight.detach().reshape(4, -1).var(1, unbiased=False) + conv.eps).sqrt()
    conv_bound = ConvRule().sum_rounding(conv, Call((x,), {}, [g]), names)["weight"]
    torch.testing.assert_close(rule.sum_rounding(conv, Call((x,), {}, [g]), names)["weight"],
                               conv_bound / s.min(), rtol=1e-4, atol=0)
    explicit = rule.per_sample_grads(conv, Call((x,), {}, [g]), names)
    norms = rule.ghost_sq_norms(conv, Call((x,), {}, [g]), names)
    for name in names:
        torch.testing.assert_close(norms[name], explicit[name].flatten(1).square().sum(1))
    factors = {n: torch.rand(5) for n in names}
    summed = rule.clipped_sum(conv, Call((x,), {}, [g]), names, factors)
    for name in names:
        expected = torch.einsum("b,b...->...", factors[name], explicit[name])
        torch.testing.assert_close(summed[name], expected, rtol=1e-4, atol=1e-5)

"""nn.MultiheadAttention through its own rule (no per-example replay): exact in every mode, with
the masks, layouts and options torch's forward takes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dpspeed.layers.attention import AttentionRule
from dpspeed.layers.functional import FunctionalRule
from dpspeed.testing import ONE_PASS_MODES, check_losses, private_grads

pytestmark = pytest.mark.usefixtures("float64")
E, HEADS = 4, 2


class Attending(nn.Module):
    """Self- or cross-attention over (B, T, E) inputs, with the options under test."""

    def __init__(self, batch_first=True, inputs="self", masks=(), need_weights=False, bias=True, kdim=None,
                 causal=False, add_bias_kv=False):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=batch_first, bias=bias, kdim=kdim, vdim=kdim,
                                          add_bias_kv=add_bias_kv)
        self.memory = nn.Linear(E, kdim or E)
        self.batch_first, self.inputs, self.masks, self.need_weights, self.causal = (
            batch_first, inputs, masks, need_weights, causal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        memory = self.memory(torch.tanh(x))
        query, key, value = {"self": (x, x, x), "cross": (x, memory, memory), "three": (x, memory, 2 * memory)}[self.inputs]
        if not self.batch_first:
            query, key, value = (v.transpose(0, 1) for v in (query, key, value))
            if self.inputs == "self":
                key = value = query
        options = {}
        # masks from each example's own data (the reference runs every example alone); position 0 never masked
        first = torch.arange(t) == 0
        if "padding" in self.masks:
            padding = (x[:, :, 0] > 0.5) & ~first
            # with a float attn_mask, a float padding mask (torch deprecates mixing the two kinds)
            options["key_padding_mask"] = torch.zeros(b, t).masked_fill(padding, -torch.inf) if "float" in self.masks else padding
        if "float" in self.masks:
            options["attn_mask"] = torch.linspace(-1, 1, t * t).view(t, t)
        if "heads" in self.masks:
            pairs = x[:, None, :, None, :HEADS] + x[:, None, None, :, :HEADS]  # (b, 1, t, t, heads)
            options["attn_mask"] = ((pairs[:, 0] > 1.0) & ~first[None, None, :, None]).permute(0, 3, 1, 2).reshape(b * HEADS, t, t)
        if self.causal:
            options["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(t)
            options["is_causal"] = True
        out, weights = self.attn(query, key, value, need_weights=self.need_weights, **options)
        out = out if self.batch_first else out.transpose(0, 1)
        return out if weights is None else out + weights.mean(-1, keepdim=True)


CONFIGS = {
    "self": {},
    "self_sequence_first": {"batch_first": False},
    "cross": {"inputs": "cross"},
    "three_inputs_sequence_first": {"inputs": "three", "batch_first": False},
    "separate_kdim": {"inputs": "cross", "kdim": 3},
    "no_bias": {"bias": False},
    "padding_and_float_mask": {"masks": ("padding", "float")},
    "per_head_bool_mask_with_weights": {"masks": ("heads",), "need_weights": True},
    "padding_with_weights": {"masks": ("padding",), "need_weights": True},
    "causal": {"causal": True},
    "causal_with_weights": {"causal": True, "need_weights": True},
}


def _loss(weights: torch.Tensor):
    return lambda m, b: ((m(b[0]) * weights).flatten(1).sum(1)) ** 2


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_attention_is_exact(name):
    torch.manual_seed(0)
    model = Attending(**CONFIGS[name])
    x = torch.randn(6, 5, E)
    check_losses(model, _loss(torch.randn(5, E)), (x,), modes=["per-example", "bk", "auto"])


@pytest.mark.parametrize("mode", ONE_PASS_MODES)
def test_every_mode_on_cross_attention_with_masks(mode):
    torch.manual_seed(0)
    check_losses(Attending(inputs="cross", masks=("padding", "float")), _loss(torch.randn(5, E)),
                (torch.randn(6, 5, E),), modes=[mode])


def _binding_rule(model: nn.Module) -> object:
    _, engine = private_grads(model, lambda m, b: m(b[0]).sum(), (torch.randn(4, 3, E),))
    rule = next(b.rule for b in engine.controller.bindings if b.module is model.attn)
    engine.detach()
    return rule


def test_attention_takes_its_rule_and_add_bias_kv_the_exact_fallback():
    assert isinstance(_binding_rule(Attending()), AttentionRule)
    assert isinstance(_binding_rule(Attending(add_bias_kv=True)), FunctionalRule)
    torch.manual_seed(0)
    check_losses(Attending(add_bias_kv=True), _loss(torch.randn(5, E)), (torch.randn(6, 5, E),), modes=["bk"])


def test_dropout_on_the_attention_weights_trains():
    torch.manual_seed(0)
    model = Attending(need_weights=True)
    model.attn.dropout = 0.5
    got, engine = private_grads(model, lambda m, b: m(b[0]).square().sum(), (torch.randn(4, 3, E),))
    engine.detach()
    assert all(torch.isfinite(g).all() for g in got.values()) and got["attn.in_proj_weight"].abs().sum() > 0

"""Which rule handles which parameter: a registered rule for the module's exact type when it declares
every parameter the module uses (a child's too), a fallback otherwise; a user's rule is bound exactly
as a built-in one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpspeed import LayerRule, register_rule
from dpspeed.capture.bindings import bind_parameters
from dpspeed.capture.trace import trace_uses
from dpspeed.layers import registry
from dpspeed.layers.linear import LinearRule
from dpspeed.layers.functional import FunctionalRule
from dpspeed.layers.param_ops import ParameterOpRule
from dpspeed.testing import check_losses, check_rule

pytestmark = pytest.mark.usefixtures("float64", "fresh_registry")


class Doubled(nn.Module):
    """Uses its child's weight and bias in its own forward, as nn.MultiheadAttention uses out_proj's."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 3)

    def forward(self, x):
        return 2 * F.linear(x, self.inner.weight, self.inner.bias)


class DoubledRule(LayerRule):
    params = ("inner.weight", "inner.bias")

    def per_sample_grads(self, module, call, names):
        a, g = call.input(), 2 * call.grad()
        grads = {"inner.weight": torch.einsum("bp,bd->bpd", g, a), "inner.bias": g}
        return {n: grads[n] for n in names}


def _bound_rules(model: nn.Module, x: torch.Tensor) -> dict[str, LayerRule]:
    params = dict(model.named_parameters())
    uses = trace_uses(model, params, (x,), {})
    fallback = lambda direct: ParameterOpRule(None) if direct else FunctionalRule(None)  # noqa: E731
    return {b.name: b.rule for b in bind_parameters(model, params, uses, fallback)}


def test_a_module_using_a_childs_parameters_falls_back_without_a_rule():
    assert isinstance(_bound_rules(Doubled(), torch.randn(2, 4))[""], FunctionalRule)


def test_a_rule_claims_a_childs_parameters_it_declares():
    register_rule(Doubled, DoubledRule())
    assert isinstance(_bound_rules(Doubled(), torch.randn(2, 4))[""], DoubledRule)
    check_rule(Doubled(), torch.randn(5, 4))


def test_a_rule_that_does_not_declare_a_parameter_is_not_used():
    class Scaled(nn.Linear):
        def __init__(self):
            super().__init__(4, 3)
            self.scale = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return super().forward(x) * self.scale

    register_rule(Scaled, LinearRule())  # declares weight and bias only
    assert isinstance(_bound_rules(Scaled(), torch.randn(2, 4))[""], ParameterOpRule)
    check_rule(Scaled(), torch.randn(5, 4))


def test_register_rule_as_a_decorator_and_by_qualified_name():
    @register_rule(Doubled)
    class Decorated(DoubledRule):
        pass

    assert isinstance(Decorated, type) and isinstance(registry.rule_for(Doubled()), Decorated)

    class Named(nn.Linear):
        pass

    assert registry.rule_for(Named(2, 2)) is None  # a subclass is never taken for its parent
    register_rule(f"{Named.__module__}.{Named.__qualname__}", LinearRule())
    assert isinstance(_bound_rules(Named(4, 3), torch.randn(2, 4))[""], LinearRule)
    check_rule(Named(4, 3), torch.randn(5, 4))


def test_register_rule_refuses_what_is_not_a_rule_or_a_module_type():
    with pytest.raises(TypeError, match="LayerRule"):
        register_rule(Doubled, object())
    with pytest.raises(TypeError, match="nn.Module class"):
        register_rule(42, LinearRule())


def test_bits_norms_are_bound_to_their_native_rule():
    """timm's GroupNormAct went to the op-tap path (each example's ops replayed); it has a rule."""
    from dpspeed.layers.norms import GroupNormActRule
    from tests.helpers.models import timm_cases

    case = timm_cases()["timm_bit"]()
    rules = _bound_rules(case.model, case.tensors[0])
    norms = {name: rule for name, rule in rules.items() if type(case.model.get_submodule(name)).__name__ == "GroupNormAct"}
    assert norms and all(isinstance(rule, GroupNormActRule) for rule in norms.values())


def test_bits_convolutions_are_bound_to_their_native_rule():
    """timm's StdConv2d went to the op-tap path (each example's convolution replayed); it has a rule."""
    from dpspeed.layers.conv import StdConvRule
    from tests.helpers.models import timm_cases

    case = timm_cases()["timm_bit"]()
    rules = _bound_rules(case.model, case.tensors[0])
    convs = {name: rule for name, rule in rules.items() if type(case.model.get_submodule(name)).__name__ == "StdConv2d"}
    assert convs and all(isinstance(rule, StdConvRule) for rule in convs.values())


def test_gpt2s_projections_are_bound_to_their_native_rule():
    """transformers' Conv1D went to the op-tap path; it has a rule."""
    from dpspeed.layers.linear import Conv1DRule
    from tests.helpers.models import hf_cases

    case = hf_cases()["hf_gpt2"]()
    rules = _bound_rules(case.model, case.tensors[0])
    projections = {n: r for n, r in rules.items() if type(case.model.get_submodule(n)).__name__ == "Conv1D"}
    assert projections and all(isinstance(rule, Conv1DRule) for rule in projections.values())


class RelativeBias(nn.Module):
    """T5's pattern: an Embedding called on (T, T) position buckets, permuted to (heads, T, T),
    made in the first block and passed on to the second."""

    def __init__(self, steps: int):
        super().__init__()
        self.steps = steps
        self.buckets = nn.Embedding(2 * steps, 2)
        self.mix1, self.mix2 = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x):  # x: (B, T, 3)
        position = torch.arange(self.steps)
        bias = self.buckets(position[None, :] - position[:, None] + self.steps).permute(2, 0, 1)
        scores = torch.einsum("btd,bsd->bts", x, self.mix1(x))[:, None] + bias  # (B, 2, T, T)
        h = torch.einsum("bhts,bsd->btd", scores.softmax(-1), x)
        return self.mix2(torch.einsum("btd,bsd->bts", h, h)[:, None].add(bias).sum((1, 3))[..., None] * h)


@pytest.mark.parametrize("batch", [3, 4])
def test_an_unbatched_call_of_more_than_one_dimension_is_replayed_by_the_model(batch):
    """Giving its (T, T) input a batch dimension changed the output's rank under the model's code
    (a crash), and with T equal to the batch size its rows passed for examples (wrong gradients)."""
    torch.manual_seed(0)
    model, x = RelativeBias(steps=4), torch.randn(batch, 4, 3)
    uses = trace_uses(model, dict(model.named_parameters()), (x,), {})
    bindings = {b.name: b for b in bind_parameters(model, dict(model.named_parameters()), uses, lambda d: FunctionalRule(None))}
    assert bindings[""].params == {"buckets.weight": "buckets.weight"} and "buckets" not in bindings
    check_losses(model, lambda m, b: m(b[0]).square().sum((1, 2)), (x,), modes=["per-example", "bk", "auto"])

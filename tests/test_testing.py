"""dpspeed.testing, the public check of a model or a rule against the one-example reference, can fail:
a rule that is off anywhere is caught, and the message names the case."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dpspeed import LayerRule, register_rule
from dpspeed.layers.linear import LinearRule
from dpspeed.testing import check_losses, check_model, check_rule

pytestmark = pytest.mark.usefixtures("float64", "fresh_registry")


class Mine(nn.Linear):
    pass


class OffByScale(LinearRule):
    """Per-example gradients 10% too large: wrong sums where gradients are not clipped."""

    def per_sample_grads(self, module, call, names):
        return {n: 1.1 * g for n, g in super().per_sample_grads(module, call, names).items()}


class WrongGhostNorm(LinearRule):
    """Ghost norms too small: wrong factors where gradients are clipped."""

    def ghost_sq_norms(self, module, call, names):
        return {n: 0.5 * v for n, v in super().ghost_sq_norms(module, call, names).items()}


def test_a_correct_rule_passes():
    register_rule(Mine, LinearRule())
    check_rule(Mine(4, 3), torch.randn(6, 4))


@pytest.mark.parametrize("rule,failing_mode,max_grad_norm", [(OffByScale(), "per-example", 100.0),
                                                            (WrongGhostNorm(), "bk", 0.01)])
def test_a_wrong_rule_fails_naming_the_case(rule, failing_mode, max_grad_norm):
    register_rule(Mine, rule)
    with pytest.raises(AssertionError, match=f"mode={failing_mode} style=all-layer .*relative error"):
        check_rule(Mine(4, 3), torch.randn(6, 4), max_grad_norm=max_grad_norm)


def test_a_rule_without_ghost_norms_is_checked_in_every_mode():
    class ExplicitOnly(LayerRule):
        def per_sample_grads(self, module, call, names):
            a, g = call.input(), call.grad()
            grads = {"weight": torch.einsum("bp,bd->bpd", g, a), "bias": g}
            return {n: grads[n] for n in names}

    register_rule(Mine, ExplicitOnly())
    check_rule(Mine(4, 3), torch.randn(6, 4))


def test_check_model_takes_inputs_targets_and_a_per_example_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(7, 5), torch.randint(0, 2, (7,))
    check_model(model, x, y, styles=["all-layer", "layer-wise", "param-wise"])
    check_model(model, x, y, lambda out, t: nn.functional.nll_loss(out.log_softmax(1), t, reduction="none"),
                modes=["bk"])
    check_model(model, (x,), loss_fn=lambda out: out.square().sum(1), modes=["per-example"])
    with pytest.raises(ValueError, match=r"one loss per example, shape \(\d+,\); got \(\)"):
        check_model(model, x, y, lambda out, t: nn.functional.cross_entropy(out, t), modes=["bk"])


def test_check_model_fails_on_a_model_whose_rule_is_wrong():
    register_rule(Mine, OffByScale())
    model = nn.Sequential(Mine(5, 4), nn.Tanh(), nn.Linear(4, 2))
    with pytest.raises(AssertionError, match=r"mode=per-example .*worst parameter: 0\.(weight|bias)"):
        check_model(model, torch.randn(6, 5), torch.randint(0, 2, (6,)), modes=["per-example"], max_grad_norm=100.0)


def test_check_losses_takes_any_call_of_the_model():
    torch.manual_seed(0)
    model = nn.Linear(5, 2)
    x, scale = torch.randn(7, 5), torch.rand(7)
    check_losses(model, lambda m, b: (m(b[0]) * b[1][:, None]).square().sum(1), (x, scale), modes=["bk", "auto"])

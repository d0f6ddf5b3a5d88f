"""validate lists every problem at once; fix_model's replacements keep the features."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dpspeed import PrivacyEngine, fix_model, validate


def _model_with_every_problem() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.LSTM(4, 4, proj_size=2), nn.BatchNorm1d(4),
                         nn.InstanceNorm1d(4, track_running_stats=True))


def test_validate_lists_every_problem_and_make_private_says_them_all():
    problems = validate(_model_with_every_problem())
    assert [p.split(" at ")[0] for p in problems] == ["BatchNorm1d", "LSTM", "BatchNorm1d", "InstanceNorm1d"]
    assert "fix_model" in problems[0] and "proj_size" in problems[1]
    model = _model_with_every_problem()
    with pytest.raises(ValueError, match=r"4 problem\(s\)") as refused:
        PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                     data_loader=None, noise_multiplier=1.0, max_grad_norm=1.0)
    assert all(p in str(refused.value) for p in problems)
    assert validate(nn.Linear(2, 2)) == []
    frozen = nn.Linear(2, 2).requires_grad_(False)
    assert validate(frozen) == ["the model has no trainable parameters"]


@pytest.mark.parametrize("recurrent", [nn.RNN, nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell, nn.RNNCell])
def test_a_recurrent_layer_without_its_rule_is_refused_clearly(recurrent, fresh_registry):
    """(RNN, LSTM and GRU crashed inside clipping.) Their built-in rules taken away, the refusal says
    what to do; a frozen one has no gradient to privatise."""
    from dpspeed.layers import registry

    del registry._BY_TYPE[recurrent]
    model = nn.Sequential(recurrent(3, 5))
    assert "no exact per-example rule" in validate(model)[0] and "requires_grad_(False)" in validate(model)[0]
    model[0].requires_grad_(False)
    assert validate(model) == ["the model has no trainable parameters"]


def test_a_recurrent_layer_with_a_registered_rule_is_not_refused(fresh_registry):
    from dpspeed import LayerRule, register_rule

    register_rule(nn.GRU, LayerRule())
    assert validate(nn.GRU(3, 5)) == []


def test_fix_model_keeps_the_features_of_a_batchnorm1d_over_vectors():
    """BatchNorm1d(4) on (B, 4) became GroupNorm(4, 4), which outputs zeros: one group over the
    channels instead. With one feature, an Identity."""
    model = fix_model(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1), nn.BatchNorm1d(1),
                                    nn.Conv2d(1, 8, 1), nn.BatchNorm2d(8)))
    assert isinstance(model[1], nn.GroupNorm) and model[1].num_groups == 1
    assert isinstance(model[3], nn.Identity)
    assert isinstance(model[5], nn.GroupNorm) and model[5].num_groups == 8
    out = model[1](torch.randn(5, 4))
    assert out.abs().mean() > 0.5  # normalised, not zeroed
    assert validate(model) == []
    assert fix_model(nn.Sequential(nn.BatchNorm2d(4).double()))[0].weight.dtype == torch.float64


def test_fix_model_keeps_the_activation_of_timms_batchnormact():
    """A BatchNormAct2d (EfficientNet) became a bare GroupNorm: every SiLU after a norm was lost."""
    timm = pytest.importorskip("timm")
    model = fix_model(timm.create_model("efficientnet_b0", num_classes=3))
    assert isinstance(model.bn1, timm.layers.GroupNormAct) and isinstance(model.bn1.act, nn.SiLU)
    assert validate(model) == []
    norm = model.bn1
    x = torch.randn(2, 32, 4, 4)
    assert torch.allclose(norm(x), nn.functional.silu(nn.functional.group_norm(x, norm.num_groups, norm.weight, norm.bias)))


def test_fix_model_refuses_a_batchnorm_with_layers_it_does_not_know():
    class NormThenGate(nn.BatchNorm1d):
        def __init__(self):
            super().__init__(4)
            self.gate = nn.Linear(4, 4)

    with pytest.raises(ValueError, match=r"NormThenGate.*\['gate'\]"):
        fix_model(nn.Sequential(NormThenGate()))


def test_fix_model_takes_the_number_of_groups():
    model = fix_model(nn.Sequential(nn.Conv2d(1, 8, 1), nn.BatchNorm2d(8), nn.Sequential(nn.BatchNorm1d(4))),
                      num_groups=2)
    assert model[1].num_groups == 2 and model[2][0].num_groups == 2
    with pytest.raises(ValueError, match=r"num_groups=3 does not divide the 8 channels of BatchNorm2d at '1'"):
        fix_model(nn.Sequential(nn.Conv2d(1, 8, 1), nn.BatchNorm2d(8)), num_groups=3)

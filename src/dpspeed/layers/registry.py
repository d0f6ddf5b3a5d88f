"""Which rule handles which module type: exact types only, so a subclass that changes the maths
(timm's StdConv2d, LayerNorm2d) is never mistaken for its parent. Built-in rules are registered
here exactly as a user's are, through `register_rule`."""

from __future__ import annotations

from typing import Callable, TypeVar, overload

from torch import nn

from .attention import AttentionRule
from .conv import ConvRule, StdConvRule
from .embedding import EmbeddingRule
from .linear import Conv1DRule, LinearRule
from .norms import GroupNormActRule, GroupNormRule, InstanceNormRule, LayerNormRule, RMSNormRule
from .recurrent import CellRule, RecurrentRule
from .rule import LayerRule

_BY_TYPE: dict[type, LayerRule] = {}
#: classes of other libraries, by qualified name, so that registering them imports nothing
_BY_NAME: dict[str, LayerRule] = {}

R = TypeVar("R", LayerRule, type)


def _store(module_type: type | str, rule: LayerRule) -> None:
    if not isinstance(rule, LayerRule):
        raise TypeError(f"a rule must be a dpspeed.LayerRule (or a subclass to instantiate), got {rule!r}")
    if isinstance(module_type, str):
        _BY_NAME[module_type] = rule
    elif isinstance(module_type, type) and issubclass(module_type, nn.Module):
        _BY_TYPE[module_type] = rule
    else:
        raise TypeError(f"register_rule takes an nn.Module class or its qualified name, got {module_type!r}")


@overload
def register_rule(module_type: type | str, rule: LayerRule) -> None: ...
@overload
def register_rule(module_type: type | str) -> Callable[[R], R]: ...


def register_rule(module_type, rule=None):
    """Handle modules of exactly `module_type` (a class, or its qualified name such as
    "transformers.pytorch_utils.Conv1D") with `rule`; an explicit opt-in, also for subclasses.

    As a decorator, `@register_rule(MyLayer)` on a LayerRule subclass registers an instance of it
    and returns the class unchanged."""
    if rule is not None:
        _store(module_type, rule)
        return None

    def decorate(rule_or_class: R) -> R:
        _store(module_type, rule_or_class() if isinstance(rule_or_class, type) else rule_or_class)
        return rule_or_class

    return decorate


def _own_class(module: nn.Module) -> type:
    """The module's class; for a module fully_shard has made an FSDP<class>, the class it was."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(module)
    if issubclass(cls, FSDPModule) and len(cls.__bases__) == 2 and cls.__bases__[0] is FSDPModule:
        return cls.__bases__[1]
    return cls


def rule_for(module: nn.Module) -> LayerRule | None:
    """The rule registered for the module's exact class, or None."""
    cls = _own_class(module)
    return _BY_TYPE.get(cls) or _BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")


for _t in (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear):
    register_rule(_t, LinearRule())
for _t in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_rule(_t, ConvRule())
register_rule(nn.Embedding, EmbeddingRule())
register_rule(nn.LayerNorm, LayerNormRule())
register_rule(nn.RMSNorm, RMSNormRule())
register_rule(nn.GroupNorm, GroupNormRule())
for _t in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d):
    register_rule(_t, InstanceNormRule())
register_rule(nn.MultiheadAttention, AttentionRule())
for _t in (nn.RNN, nn.LSTM, nn.GRU):
    register_rule(_t, RecurrentRule())
for _t in (nn.RNNCell, nn.LSTMCell, nn.GRUCell):
    register_rule(_t, CellRule())
# timm's LayerNorm is nn.LayerNorm with an optional fused kernel: F.layer_norm over the last dims
register_rule("timm.layers.norm.LayerNorm", LayerNormRule())
# transformers' Conv1D (GPT-2): a Linear with its weight stored transposed
register_rule("transformers.pytorch_utils.Conv1D", Conv1DRule())
# timm's StdConv2d (BiT): a convolution of its weight standardised per output channel
register_rule("timm.layers.std_conv.StdConv2d", StdConvRule())
# timm's GroupNormAct (BiT): GroupNorm, then an activation, in one module
register_rule("timm.layers.norm_act.GroupNormAct", GroupNormActRule())

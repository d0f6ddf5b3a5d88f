"""Which rule handles which module type: exact types only, so a subclass that changes the maths
(timm's StdConv2d, LayerNorm2d) is never mistaken for its parent."""

from __future__ import annotations

from torch import nn

from .base import LayerRule
from .conv import ConvRule
from .embedding import EmbeddingRule
from .linear import LinearRule
from .norms import GroupNormRule, InstanceNormRule, LayerNormRule, RMSNormRule

_RULES: dict[type, LayerRule] = {}

#: parameter names a rule handles; any other direct parameter sends the module to the fallback
RULE_PARAMS = ("weight", "bias")


def register_rule(module_type: type, rule: LayerRule) -> None:
    """Handle modules of exactly `module_type` with `rule` (an explicit opt-in, also for subclasses)."""
    _RULES[module_type] = rule


#: classes of other libraries with the same maths as a torch layer, by qualified name (no import)
_RULES_BY_NAME: dict[str, LayerRule] = {}


def _own_class(module: nn.Module) -> type:
    """The module's class; for a module fully_shard has made an FSDP<class>, the class it was."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(module)
    if issubclass(cls, FSDPModule) and len(cls.__bases__) == 2 and cls.__bases__[0] is FSDPModule:
        return cls.__bases__[1]
    return cls


def rule_for(module: nn.Module) -> LayerRule | None:
    cls = _own_class(module)
    return _RULES.get(cls) or _RULES_BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")


#: rules of known layer types (every other handler is a fallback)
RULE_TYPES = (LinearRule, ConvRule, EmbeddingRule, GroupNormRule, InstanceNormRule, LayerNormRule, RMSNormRule)


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
# timm's LayerNorm is nn.LayerNorm with an optional fused kernel: F.layer_norm over the last dims
_RULES_BY_NAME["timm.layers.norm.LayerNorm"] = LayerNormRule()

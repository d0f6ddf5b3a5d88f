"""Per-sample gradient rules, one file per layer family."""

from .base import Call, LayerRule
from .registry import register_rule, rule_for

__all__ = ["Call", "LayerRule", "register_rule", "rule_for"]

"""Per-example gradient rules, one file per layer family, and the registry that binds them to
module types. A rule receives the recorded `Call`s of its module."""

from ..capture.records import Call
from ._gram import keep_gram_norms
from .registry import register_rule, rule_for
from .rule import LayerRule

__all__ = ["Call", "LayerRule", "keep_gram_norms", "register_rule", "rule_for"]

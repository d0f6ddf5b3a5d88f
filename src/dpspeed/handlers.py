"""Decide which module computes the per-sample gradient of each trainable parameter, and how."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from .layers.base import LayerRule
from .layers.registry import RULE_PARAMS, rule_for
from .trace import ParameterUses


@dataclass(eq=False)
class Handler:
    """A module whose forward calls are recorded, the rule that turns them into gradients, and the
    parameters it covers as {name inside the module: name inside the model}."""

    module: nn.Module
    name: str
    rule: LayerRule
    params: dict[str, str] = field(default_factory=dict)
    #: the parameters are used in this module's own code, never while one of its children runs
    own_code_only: bool = False


def owner_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module that registers the parameter `name`, and its name there."""
    module_name, _, local = name.rpartition(".")
    return model.get_submodule(module_name), local


def build_handlers(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    uses: ParameterUses | None,
    fallback: Callable[[bool], LayerRule],
) -> list[Handler]:
    """One handler per module that uses trainable parameters; owners when nothing was traced."""
    names_of = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    placements: dict[nn.Module, dict[str, str]] = {}
    for global_name in params:
        users = uses.users.get(global_name) if uses is not None else None
        if not users:
            owner, local = owner_of(model, global_name)
            placements.setdefault(owner, {})[local] = global_name
            continue
        for user in users:
            placements.setdefault(user, {})[uses.local_names[id(user), global_name]] = global_name
    handlers = []
    for module, names in placements.items():
        rule = rule_for(module)
        direct = all("." not in n for n in names)
        if rule is None or not all(n in RULE_PARAMS for n in names) or not direct:
            rule = fallback(direct)
        else:
            try:
                rule.validate(module)
            except ValueError as err:
                where = names_of.get(id(module), "") or "<root>"
                raise ValueError(f"cannot privatise {sorted(names.values())} of '{where}': {err}") from err
        own = uses is not None and all(module in uses.direct_users.get(g, ()) for g in names.values())
        handlers.append(Handler(module, names_of.get(id(module), ""), rule, dict(sorted(names.items())), own))
    return handlers

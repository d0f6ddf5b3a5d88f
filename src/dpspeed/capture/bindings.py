"""Which module's calls compute the per-example gradient of each trainable parameter, and by which
rule: the registered rule of the module's exact type when it declares every parameter the module
uses, otherwise a fallback (op taps for a module's own bare parameters, torch.func replay for
anything else)."""

from __future__ import annotations

from typing import Callable

from torch import nn

from ..layers.registry import rule_for
from ..layers.rule import LayerRule
from .records import Binding
from .trace import ParameterUses

#: (whether the module uses only its own direct parameters) -> the rule to fall back to
Fallback = Callable[[bool], LayerRule]


def owner_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module that registers the parameter `name`, and its name there."""
    module_name, _, local = name.rpartition(".")
    return model.get_submodule(module_name), local


def _placements(model: nn.Module, params: dict[str, nn.Parameter], uses: ParameterUses | None) -> dict[nn.Module, dict[str, str]]:
    """{module: {name inside it: name inside the model}}: each parameter at every module that uses
    it, or at its owner when nothing was traced."""
    placements: dict[nn.Module, dict[str, str]] = {}
    for global_name in params:
        users = uses.users.get(global_name) if uses is not None else None
        if not users:
            owner, local = owner_of(model, global_name)
            placements.setdefault(owner, {})[local] = global_name
            continue
        for user in users:
            local = uses.local_names[id(user), global_name]
            if id(user) in uses.lifted:  # by the model, replayed per example (torch.func fallback)
                user, local = model, global_name
            placements.setdefault(user, {})[local] = global_name
    return placements


def _rule(module: nn.Module, names: dict[str, str], fallback: Fallback, where: str) -> LayerRule:
    rule = rule_for(module)
    if rule is None or not all(rule.declares(n) for n in names) or not rule.covers(module):
        return fallback(all("." not in n for n in names))
    try:
        rule.validate(module)
    except ValueError as err:
        raise ValueError(f"cannot privatise {sorted(names.values())} of '{where}': {err}") from err
    return rule


def bind_parameters(model: nn.Module, params: dict[str, nn.Parameter], uses: ParameterUses | None,
                    fallback: Fallback) -> list[Binding]:
    """One binding per module that uses trainable parameters (per owner when nothing was traced)."""
    names_of = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    bindings = []
    for module, names in _placements(model, params, uses).items():
        name = names_of.get(id(module), "")
        rule = _rule(module, names, fallback, name or "<root>")
        own = uses is not None and all(module in uses.direct_users.get(g, ()) for g in names.values())
        bindings.append(Binding(module, name, rule, dict(sorted(names.items())), own))
    return bindings

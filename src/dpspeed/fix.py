"""What a model needs before it can be made private: `validate` lists every problem at once, and
`fix_model` replaces the layers that mix examples of a batch (BatchNorm) or keep statistics of
the private data (InstanceNorm with running statistics) with private-friendly ones."""

from __future__ import annotations

import logging
import math

from torch import nn

from .layers.registry import rule_for

logger = logging.getLogger(__name__)


def validate(model: nn.Module) -> list[str]:
    """Every reason `make_private` would refuse the model, one line each with what to do; empty
    when the model can be made private."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return ["the model is wrapped in DistributedDataParallel: dpspeed all-reduces the clipped gradients itself, "
                "once per logical batch; pass the bare model"]
    problems = []
    for name, m in model.named_modules():
        where = f"{type(m).__name__} at '{name or '(the model)'}'"
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            problems.append(f"{where} mixes the examples of a batch, which breaks per-example privacy; "
                            "dpspeed.fix_model(model) replaces it with a GroupNorm")
        elif isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats:
            problems.append(f"{where} keeps running statistics of the private data in its buffers, which the "
                            "state_dict would publish without noise; set track_running_stats=False, or "
                            "dpspeed.fix_model(model) does it")
        elif any(p.requires_grad for p in m.parameters(recurse=False)):
            problem = _rule_problem(m)
            if problem:
                params = ", ".join(f"{name}.{n}" if name else n for n, p in m.named_parameters(recurse=False)
                                   if p.requires_grad)
                problems.append(f"{where} (parameters {params}) {problem}")
    if not any(p.requires_grad for p in model.parameters()):
        problems.append("the model has no trainable parameters")
    return problems


def _rule_problem(module: nn.Module) -> str | None:
    """Why the module's trainable parameters would be refused: no rule for a recurrent layer (which
    the fallback cannot replay), or a configuration its rule does not handle."""
    rule = rule_for(module)
    if rule is None:
        if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
            return ("has no exact per-example rule (a recurrent layer cannot be replayed one example at a time); "
                    "freeze it (requires_grad_(False)) or register a rule for it (dpspeed.register_rule)")
        return None
    try:
        rule.validate(module)
    except ValueError as err:
        return f"cannot be privatised: {err}"
    return None


def _groups(norm: nn.modules.batchnorm._BatchNorm, where: str, num_groups: int | None) -> int:
    """num_groups when given (it must divide the channels), else one group over the channels of a
    BatchNorm1d (whose input may be (B, C): a group per channel would normalise a single value to
    zero) and gcd(32, C) for images and volumes."""
    channels = norm.num_features
    if num_groups is None:
        return 1 if isinstance(norm, nn.BatchNorm1d) else math.gcd(32, channels)
    if channels % num_groups:
        raise ValueError(f"fix_model: num_groups={num_groups} does not divide the {channels} channels of "
                         f"{type(norm).__name__} at '{where}'")
    return num_groups


def _group_norm_act_for(norm: nn.modules.batchnorm._BatchNorm, groups: int) -> nn.Module:
    """timm's BatchNormAct2d (EfficientNet, RegNet) normalises, then applies its own drop and
    activation layers: a GroupNormAct keeping them (a bare GroupNorm would drop the activation)."""
    from timm.layers.norm_act import GroupNormAct

    fixed = GroupNormAct(norm.num_features, num_groups=groups, eps=norm.eps, affine=norm.affine, apply_act=False)
    fixed.drop, fixed.act = norm.drop, norm.act
    return fixed


def _group_norm_for(norm: nn.modules.batchnorm._BatchNorm, where: str, num_groups: int | None) -> nn.Module:
    """A per-example normalisation in place of a BatchNorm, over `_groups` groups; a BatchNorm1d of
    one feature (nothing to normalise per example) becomes an Identity. A BatchNorm subclass with
    layers of its own (an activation) keeps them (timm's norm-act layers), or is refused."""
    groups = _groups(norm, where, num_groups)
    if type(norm).__module__.startswith("timm.") and hasattr(norm, "act") and hasattr(norm, "drop"):
        return _group_norm_act_for(norm, groups)
    extra = [name for name, _ in norm.named_children()]
    if extra:
        raise ValueError(f"fix_model cannot replace {type(norm).__name__} at '{where}': it has layers of its own "
                         f"({extra}) that a GroupNorm would drop; replace it by hand with a per-example norm "
                         "followed by them")
    if isinstance(norm, nn.BatchNorm1d) and norm.num_features == 1:
        logger.warning("fix_model: a BatchNorm1d of one feature at '%s' becomes an Identity (normalising one value "
                       "per example would zero it)", where)
        return nn.Identity()
    return nn.GroupNorm(groups, norm.num_features, eps=norm.eps, affine=norm.affine)


def _without_running_stats(norm: nn.modules.instancenorm._InstanceNorm) -> nn.Module:
    """The same instance norm normalising by each example's own statistics only (its affine
    parameters kept)."""
    fixed = type(norm)(norm.num_features, eps=norm.eps, affine=norm.affine, track_running_stats=False)
    if norm.affine:
        fixed.load_state_dict({"weight": norm.weight.detach(), "bias": norm.bias.detach()})
    return fixed.to(norm.weight.device if norm.affine else "cpu")


def fix_model(model: nn.Module, num_groups: int | None = None) -> nn.Module:
    """Replace every BatchNorm with a GroupNorm (`_group_norm_for`; `num_groups` for all of them,
    or the default that keeps features), and every InstanceNorm that tracks running statistics
    with one that does not, in place; returns the model. Each replacement is logged."""
    _fix_children(model, "", num_groups)
    return model


def _fix_children(module: nn.Module, prefix: str, num_groups: int | None) -> None:
    for name, child in list(module.named_children()):
        where = f"{prefix}{name}"
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            replacement = _group_norm_for(child, where, num_groups)
        elif isinstance(child, nn.modules.instancenorm._InstanceNorm) and child.track_running_stats:
            replacement = _without_running_stats(child)
        else:
            _fix_children(child, f"{where}.", num_groups)
            continue
        like = next(child.parameters(), None)  # the replaced layer's device and dtype
        setattr(module, name, replacement.to(like.device, like.dtype) if like is not None else replacement)
        logger.info("fix_model: %s '%s' -> %s", type(child).__name__, where, replacement)

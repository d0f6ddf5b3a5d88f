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


def _group_norm_for(norm: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """A per-example normalisation in place of a BatchNorm. BatchNorm1d normalises (B, C) or
    (B, C, L) inputs: one group over all channels (a group per channel would normalise a single
    value of a (B, C) input to zero); with one channel there is nothing to normalise per example,
    and it becomes an Identity. Images and volumes: gcd(32, C) groups."""
    channels = norm.num_features
    if isinstance(norm, nn.BatchNorm1d):
        if channels == 1:
            logger.warning("fix_model: a BatchNorm1d of one feature becomes an Identity (normalising one value "
                           "per example would zero it)")
            return nn.Identity()
        return nn.GroupNorm(1, channels, affine=norm.affine)
    return nn.GroupNorm(math.gcd(32, channels), channels, affine=norm.affine)


def _without_running_stats(norm: nn.modules.instancenorm._InstanceNorm) -> nn.Module:
    """The same instance norm normalising by each example's own statistics only (its affine
    parameters kept)."""
    fixed = type(norm)(norm.num_features, eps=norm.eps, affine=norm.affine, track_running_stats=False)
    if norm.affine:
        fixed.load_state_dict({"weight": norm.weight.detach(), "bias": norm.bias.detach()})
    return fixed.to(norm.weight.device if norm.affine else "cpu")


def fix_model(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm with a GroupNorm (`_group_norm_for`), and every InstanceNorm that
    tracks running statistics with one that does not, in place; returns the model. Each
    replacement is logged."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            replacement = _group_norm_for(child)
        elif isinstance(child, nn.modules.instancenorm._InstanceNorm) and child.track_running_stats:
            replacement = _without_running_stats(child)
        else:
            fix_model(child)
            continue
        like = next(child.parameters(), None)  # the replaced layer's device and dtype
        setattr(model, name, replacement.to(like.device, like.dtype) if like is not None else replacement)
        logger.info("fix_model: %s '%s' -> %s", type(child).__name__, name, replacement)
    return model

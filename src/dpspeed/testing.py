"""Check a model, or a layer rule of your own, against the reference every dpspeed path is tested
against: each example's gradient from its own forward and backward pass (plain autograd), clipped
per group and summed. Nothing here shares code with the library's clipping.

    from dpspeed.testing import check_model, check_rule
    check_model(model.double(), x.double(), y)     # a whole model, your data, per-example losses
    check_rule(MyLayer(4, 3), torch.randn(5, 4))   # one layer and its rule
    # each raises AssertionError naming the mode, style and batching that differ
"""

from __future__ import annotations

import copy
import itertools
import math
import warnings
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .clipping.methods import MODES
from .engine import PrivacyEngine

#: (model, batch) -> the per-example losses, shape (B,)
PerExampleLoss = Callable[[nn.Module, tuple], torch.Tensor]
#: (model, batch) -> the loss to call backward on
Loss = Callable[[nn.Module, tuple], torch.Tensor]
ONE_PASS_MODES = (*MODES, "auto")


def reference_groups(style, names: list[str]) -> list[list[str]]:
    """Clipping groups as the seed paper defines them, written independently of dpspeed's."""
    if style == "all-layer":
        return [list(names)]
    if style == "param-wise":
        return [[n] for n in names]
    if style == "layer-wise":
        owners: dict[str, list[str]] = {}
        for n in names:
            owners.setdefault(n.rpartition(".")[0], []).append(n)
        return list(owners.values())
    if isinstance(style, list):
        return style
    raise ValueError(f"no reference grouping for clipping_style {style!r}")


def clip_factor(norm: float, threshold: float, fn: str) -> float:
    if fn == "abadi":
        return min(1.0, threshold / (norm + 1e-6))
    return threshold / (norm + 0.01)


def per_example_grads(model: nn.Module, loss_fn: Loss, examples: list[tuple]) -> list[dict[str, torch.Tensor]]:
    """Each example's gradient: forward and backward of that example alone."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out = []
    for example in examples:
        grads = torch.autograd.grad(loss_fn(model, example), list(params.values()), allow_unused=True)
        out.append({n: torch.zeros_like(p).detach() if g is None else g.detach() for (n, p), g in zip(params.items(), grads)})
    return out


def reference_sum(per_example: list[dict[str, torch.Tensor]], groups: list[list[str]], thresholds: list[float],
                  fn: str) -> dict[str, torch.Tensor]:
    """sum_i of each example's gradient, clipped per group."""
    total = {n: torch.zeros_like(g) for n, g in per_example[0].items()}
    for grads in per_example:
        for group, r in zip(groups, thresholds):
            norm = math.sqrt(sum(float(grads[n].double().square().sum()) for n in group))
            c = clip_factor(norm, r, fn)
            for n in group:
                total[n] += c * grads[n]
    return total


def private_grads(model: nn.Module, loss_fn: Loss | None, tensors: tuple[torch.Tensor, ...], *, max_grad_norm=1.0,
                  physical: int | None = None, forward=None, **options) -> tuple[dict[str, torch.Tensor], PrivacyEngine]:
    """The gradient dpspeed hands the optimizer after one logical batch of all `tensors`, sigma = 0.
    Without `loss_fn`, the criterion make_private returns is applied to forward(model, inputs).
    The engine is returned attached: detach it before the model is used again."""
    loader = DataLoader(TensorDataset(*tensors), batch_size=len(tensors[0]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = PrivacyEngine()
    with warnings.catch_warnings():  # noiseless on purpose: the warning that sigma = 0 is not private
        warnings.filterwarnings("ignore", message="noise_multiplier=0")
        private = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=0.0,
            max_grad_norm=max_grad_norm, max_physical_batch_size=physical, poisson_sampling=False, **options,
        )
    if loss_fn is None:
        model, optimizer, criterion, loader = private
        loss_fn = lambda m, b: criterion((forward or (lambda m_, x: m_(x)))(m, b[0]), b[1])  # noqa: E731
    else:
        model, optimizer, loader = private
    grads = None
    try:
        for batch in loader:
            loss_fn(model, tuple(batch)).backward()
            optimizer.step()
            if optimizer.is_last_physical_batch:
                grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            optimizer.zero_grad()
    except BaseException:
        engine.detach()  # the model is left as it was, for the next check
        raise
    return grads, engine


def assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rtol: float) -> None:
    """The relative error of all parameters together is at most `rtol`; the message names the worst."""
    assert set(got) == set(want), (sorted(got), sorted(want))
    flat_got = torch.cat([got[n].double().flatten() for n in want])
    flat_want = torch.cat([want[n].double().flatten() for n in want])
    err = float((flat_got - flat_want).detach().norm() / flat_want.norm().clamp_min(1e-30))
    worst = max(want, key=lambda n: float((got[n].double() - want[n].double()).norm() / want[n].double().norm().clamp_min(1e-30)))
    assert err <= rtol, f"relative error {err:.3g} > {rtol} (worst parameter: {worst})"


def _reduced(per_example_loss: PerExampleLoss, reduction: str) -> Loss:
    def loss(model: nn.Module, batch: tuple) -> torch.Tensor:
        losses = per_example_loss(model, batch)
        return losses.mean() if reduction == "mean" else losses.sum()

    return loss


def check_losses(model: nn.Module, per_example_loss: PerExampleLoss, tensors: Sequence[torch.Tensor], *,
                modes: Sequence[str] = ONE_PASS_MODES, styles: Sequence = ("all-layer", "param-wise"),
                batching: Sequence[tuple[str, int | None]] = (("mean", 2), ("sum", None)),
                max_grad_norm: float = 0.5, clipping_fn: str = "abadi", rtol: float = 1e-6) -> None:
    """dpspeed's clipped sum equals the reference for every mode x style x (loss reduction,
    physical batch size); raises AssertionError naming the first combination that differs.

    `per_example_loss(model, batch)` gives each example's loss from a batch of `tensors` (one row
    per example each): for models called other than model(inputs). Run it in float64
    (`model.double()`) for the default tolerance."""
    tensors = tuple(tensors)
    n = len(tensors[0])
    examples = [tuple(t[i : i + 1] for t in tensors) for i in range(n)]
    grads = per_example_grads(model, _reduced(per_example_loss, "sum"), examples)
    names = list(grads[0])
    for mode, style, (reduction, physical) in itertools.product(modes, styles, batching):
        groups = reference_groups(style, names)
        thresholds = [max_grad_norm / math.sqrt(len(groups))] * len(groups)
        want = reference_sum(grads, groups, thresholds, clipping_fn)
        if reduction == "mean":
            want = {k: w / n for k, w in want.items()}
        got, engine = private_grads(model, _reduced(per_example_loss, reduction), tensors, max_grad_norm=max_grad_norm,
                                    physical=physical, clipping_mode=mode, clipping_style=style,
                                    clipping_fn=clipping_fn, loss_reduction=reduction)
        engine.detach()
        try:
            assert_close(got, want, rtol)
        except AssertionError as err:
            raise AssertionError(f"mode={mode} style={style} loss_reduction={reduction} physical={physical}: {err}") from err


def check_model(model: nn.Module, inputs: torch.Tensor | tuple[torch.Tensor, ...], targets: torch.Tensor | None = None,
                loss_fn: Callable[..., torch.Tensor] | None = None, **options) -> None:
    """dpspeed trains `model` exactly as the one-example-at-a-time reference does: its clipped
    gradient sum equals the reference's in every clipping mode and style checked (`check_losses`
    for the options); raises AssertionError naming the first combination that differs.

    `inputs` (a tensor, or a tuple for model(*inputs)) and `targets` have one row per example;
    `loss_fn(outputs, targets)`, or `loss_fn(outputs)` without targets, gives each example's loss,
    shape (B,) (default: cross-entropy per example). Run it in float64 (`model.double()`).

        check_model(model.double(), x.double(), y, modes=["bk", "auto"])
    """
    if targets is None and loss_fn is None:
        raise ValueError("give targets for the default per-example cross-entropy, or a loss_fn(outputs)")
    if callable(inputs):
        raise TypeError("check_model(model, inputs, targets, loss_fn): for a per-example loss of (model, batch), "
                        "use check_losses(model, per_example_loss, tensors)")
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    count = len(inputs)
    loss_fn = loss_fn or (lambda outputs, y: F.cross_entropy(outputs, y, reduction="none"))

    def per_example_loss(m: nn.Module, batch: tuple) -> torch.Tensor:
        outputs = m(*batch[:count])
        losses = loss_fn(outputs) if targets is None else loss_fn(outputs, batch[count])
        if losses.shape != (len(batch[0]),):
            raise ValueError(f"loss_fn must give one loss per example, shape ({len(batch[0])},); got "
                             f"{tuple(losses.shape)} (use reduction='none', and reduce each example's own terms)")
        return losses

    check_losses(model, per_example_loss, inputs if targets is None else (*inputs, targets), **options)


def check_rule(module: nn.Module, *inputs: torch.Tensor, seed: int = 0, **options) -> None:
    """The per-example gradients dpspeed computes for `module` (through its registered rule, or the
    fallback) are exact: a float64 copy of the module is trained on `inputs` (one row per example)
    with a loss that weighs every output coordinate differently, in every clipping mode; see
    `check_losses` for the options. Raises AssertionError naming the failing case."""
    generator = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(module).double()
    tensors = tuple(t.double() if t.is_floating_point() else t for t in inputs)
    with torch.no_grad():
        out = model(*tensors)
    weights = torch.randn(out.shape[1:], generator=generator, dtype=out.dtype)

    def per_example_loss(m: nn.Module, batch: tuple) -> torch.Tensor:
        return (m(*batch) * weights).flatten(1).sum(1) ** 2

    check_losses(model, per_example_loss, tensors, **options)

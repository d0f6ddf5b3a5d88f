"""Every clipping mode, style and function against the one-example-at-a-time reference, sigma = 0."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dpspeed.modes import MODES
from dpspeed.ghost import TWO_PASS_MODES
from conftest import DEVICE
from models import Case, hf_cases, on_device, small_cases, timm_cases
from reference import assert_close, per_example_grads, private_grads, reference_groups, reference_sum

R = 0.3  # small enough that most examples are clipped
STYLES = ["all-layer", "layer-wise", "param-wise", 2, "custom"]
CASES = {**small_cases(), **timm_cases(), **hf_cases()}
SMALL = set(small_cases())


@pytest.fixture(autouse=True)
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


_built: dict[str, tuple[Case, list]] = {}


def built(name: str) -> tuple[Case, list]:
    """The case and its per-example reference gradients, built once per session."""
    if name not in _built:
        torch.manual_seed(sum(map(ord, name)))
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        case = CASES[name]()
        on_device(case, DEVICE).model.double()
        n = len(case.tensors[0])
        examples = [tuple(t[i : i + 1] for t in case.tensors) for i in range(n)]
        grads = {red: per_example_grads(case.model, lambda m, b: case.loss(m, b, "sum"), examples) for red in ["sum"]}
        torch.set_default_dtype(previous)
        _built[name] = (case, grads["sum"])
    return _built[name]


def combos(name: str):
    """Small models: every combination. Larger ones: every style x function x reduction, with the
    physical batch size and mode cycled, so every value of each is still covered."""
    grid = list(itertools.product(STYLES, ["abadi", "automatic"], ["mean", "sum"]))
    physicals, modes = [1, 3, None], [*MODES, "auto"]
    if name in SMALL:
        return [(*g, p, m) for g in grid for p in physicals for m in modes]
    return [(*g, physicals[i % 3], modes[i % len(modes)]) for i, g in enumerate(grid)]


def check(name: str, style, fn: str, reduction: str, physical, mode: str) -> None:
    case, grads = built(name)
    names = list(grads[0])
    if style == "custom":
        style = [names[: len(names) // 2], names[len(names) // 2 :]]
    got, engine = private_grads(
        case.model, lambda m, b: case.loss(m, b, reduction), case.tensors, max_grad_norm=R, physical=physical,
        clipping_style=style, clipping_fn=fn, loss_reduction=reduction, clipping_mode=mode,
    )
    groups = engine.grouping.groups if isinstance(style, int) else reference_groups(style, names)
    engine.detach()
    thresholds = [R / math.sqrt(len(groups))] * len(groups)
    want = reference_sum(grads, groups, thresholds, fn)
    if reduction == "mean":
        want = {n: w / len(case.tensors[0]) for n, w in want.items()}
    assert_close(got, want, 1e-5)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_small_models_every_combination(name):
    for combo in combos(name):
        try:
            check(name, *combo)
        except AssertionError as err:
            raise AssertionError(f"{name} {combo}: {err}") from err


@pytest.mark.parametrize("name", sorted(set(CASES) - SMALL))
def test_library_models(name):
    pytest.importorskip("timm" if name.startswith("timm") else "transformers")
    for combo in combos(name):
        try:
            check(name, *combo)
        except AssertionError as err:
            raise AssertionError(f"{name} {combo}: {err}") from err


CLASSIFIERS = ["mlp", "cnn", "vit", "timm_vit_tiny", "timm_bit", "timm_convnext_atto", "hf_bert"]


@pytest.mark.parametrize("name", CLASSIFIERS)
@pytest.mark.parametrize("mode", TWO_PASS_MODES)
def test_two_pass_ghost_modes(name, mode):
    """ghost and mix-ghost: the returned criterion makes both passes; all-layer clipping."""
    if name.startswith(("timm", "hf")):
        pytest.importorskip("timm" if name.startswith("timm") else "transformers")
    case, grads = built(name)
    n = len(case.tensors[0])
    for fn, reduction, physical in [("abadi", "mean", 1), ("automatic", "sum", 3), ("abadi", "sum", None), ("automatic", "mean", None)]:
        criterion = torch.nn.CrossEntropyLoss(reduction=reduction)
        got, engine = private_grads(
            case.model, None, case.tensors, max_grad_norm=R, physical=physical, clipping_mode=mode,
            clipping_fn=fn, loss_reduction=reduction, criterion=criterion, forward=case.forward,
        )
        engine.detach()
        want = reference_sum(grads, [list(grads[0])], [R], fn)
        if reduction == "mean":
            want = {k: w / n for k, w in want.items()}
        assert_close(got, want, 1e-5)


@pytest.mark.parametrize("name", ["cnn", "vit", "lm"])
@pytest.mark.parametrize("mode", ["per-example", "bk-mix-opt", "auto"])
def test_fixed_shape_physical_batches_change_nothing(name, mode):
    """Padding rows (fixed_physical_batch) are masked: the clipped sum is the reference's."""
    case, grads = built(name)
    n = len(case.tensors[0])
    for reduction, physical in [("mean", 4), ("sum", 5)]:
        got, engine = private_grads(case.model, lambda m, b: case.loss(m, b, reduction), case.tensors, max_grad_norm=R,
                                    physical=physical, fixed_physical_batch=True, clipping_mode=mode,
                                    loss_reduction=reduction)
        engine.detach()
        want = reference_sum(grads, [list(grads[0])], [R], "abadi")
        if reduction == "mean":  # a mean over the padded batch of `physical` rows, per physical batch
            want = {k: w / n for k, w in want.items()}
        assert_close(got, want, 1e-5)


@pytest.mark.parametrize("mode", ["bk", "auto"])
def test_exact_under_torch_compile_with_fixed_shape_batches(mode):
    """A compiled forward (the hooks fire in it) with padded fixed-shape batches: still exact."""
    case, grads = built("cnn")
    compiled = torch.compile(case.model)
    got, engine = private_grads(case.model, lambda m, b: case.loss(compiled, b, "sum"), case.tensors, max_grad_norm=R,
                                clipping_mode=mode, loss_reduction="sum", physical=4, fixed_physical_batch=True)
    engine.detach()
    assert_close(got, reference_sum(grads, [list(grads[0])], [R], "abadi"), 1e-5)

"""Every clipping mode, style and function against the one-example-at-a-time reference, sigma = 0.
Each combination is its own test (`-k "vit and layer-wise and bk"` selects some)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dpspeed.clipping.methods import MODES, TWO_PASS_MODES
from dpspeed.testing import assert_close, per_example_grads, private_grads, reference_groups, reference_sum
from tests.helpers import DEVICE
from tests.helpers.models import Case, hf_cases, on_device, small_cases, timm_cases

pytestmark = pytest.mark.usefixtures("float64")

R = 0.3  # small enough that most examples are clipped
STYLES = ["all-layer", "layer-wise", "param-wise", 2, "custom"]
CASES = {**small_cases(), **timm_cases(), **hf_cases()}
SMALL = set(small_cases())


class References:
    """Each case built once per session in float64 on DEVICE, with its per-example gradients."""

    def __init__(self) -> None:
        self._built: dict[str, tuple[Case, list]] = {}

    def __getitem__(self, name: str) -> tuple[Case, list]:
        if name not in self._built:
            torch.manual_seed(sum(map(ord, name)))
            case = CASES[name]()
            on_device(case, DEVICE).model.double()
            n = len(case.tensors[0])
            examples = [tuple(t[i : i + 1] for t in case.tensors) for i in range(n)]
            self._built[name] = (case, per_example_grads(case.model, lambda m, b: case.loss(m, b, "sum"), examples))
        return self._built[name]


@pytest.fixture(scope="session")
def references() -> References:
    return References()


def _combos() -> list:
    """Small models: every combination. Larger ones: every style x function x reduction, with the
    physical batch size and mode cycled, so every value of each is still covered."""
    grid = list(itertools.product(STYLES, ["abadi", "automatic"], ["mean", "sum"]))
    physicals, modes = [1, 3, None], [*MODES, "auto"]
    combos = []
    for name in CASES:
        if name in SMALL:
            combos += [(name, *g, p, m) for g in grid for p in physicals for m in modes]
        else:
            combos += [(name, *g, physicals[i % 3], modes[i % len(modes)]) for i, g in enumerate(grid)]
    return combos


def _id(combo) -> str:
    name, style, fn, reduction, physical, mode = combo
    return f"{name}-{style}-{fn}-{reduction}-physical{physical or 'all'}-{mode}"


def _library_skip(name: str) -> None:
    if name not in SMALL:
        pytest.importorskip("timm" if name.startswith("timm") else "transformers")


@pytest.mark.parametrize("name,style,fn,reduction,physical,mode", [pytest.param(*c, id=_id(c)) for c in _combos()])
def test_clipped_sum_equals_reference(references, name, style, fn, reduction, physical, mode):
    _library_skip(name)
    case, grads = references[name]
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


CLASSIFIERS = ["mlp", "cnn", "vit", "twice", "timm_vit_tiny", "timm_bit", "timm_convnext_atto", "hf_bert"]
TWO_PASS_SETTINGS = [("abadi", "mean", 1), ("automatic", "sum", 3), ("abadi", "sum", None), ("automatic", "mean", None)]


@pytest.mark.parametrize("fn,reduction,physical", TWO_PASS_SETTINGS)
@pytest.mark.parametrize("name", CLASSIFIERS)
@pytest.mark.parametrize("mode", TWO_PASS_MODES)
def test_two_pass_ghost_modes(references, name, mode, fn, reduction, physical):
    """ghost and mix-ghost: the returned criterion makes both passes; all-layer clipping."""
    _library_skip(name)
    case, grads = references[name]
    criterion = torch.nn.CrossEntropyLoss(reduction=reduction)
    got, engine = private_grads(
        case.model, None, case.tensors, max_grad_norm=R, physical=physical, clipping_mode=mode,
        clipping_fn=fn, loss_reduction=reduction, criterion=criterion, forward=case.forward,
    )
    engine.detach()
    want = reference_sum(grads, [list(grads[0])], [R], fn)
    if reduction == "mean":
        want = {k: w / len(case.tensors[0]) for k, w in want.items()}
    assert_close(got, want, 1e-5)


@pytest.mark.parametrize("reduction,physical", [("mean", 4), ("sum", 5)])
@pytest.mark.parametrize("name", ["cnn", "vit", "lm"])
@pytest.mark.parametrize("mode", ["per-example", "bk-mix-opt", "auto"])
def test_fixed_shape_physical_batches_change_nothing(references, name, mode, reduction, physical):
    """Padding rows (fixed_physical_batch) are masked: the clipped sum is the reference's."""
    case, grads = references[name]
    got, engine = private_grads(case.model, lambda m, b: case.loss(m, b, reduction), case.tensors, max_grad_norm=R,
                                physical=physical, fixed_physical_batch=True, clipping_mode=mode,
                                loss_reduction=reduction)
    engine.detach()
    want = reference_sum(grads, [list(grads[0])], [R], "abadi")
    if reduction == "mean":  # a mean over the padded batch of `physical` rows, per physical batch
        want = {k: w / len(case.tensors[0]) for k, w in want.items()}
    assert_close(got, want, 1e-5)


@pytest.mark.parametrize("mode", ["bk", "auto"])
def test_exact_under_torch_compile_with_fixed_shape_batches(references, mode):
    """A compiled forward (the hooks fire in it) with padded fixed-shape batches: still exact."""
    case, grads = references["cnn"]
    compiled = torch.compile(case.model)
    got, engine = private_grads(case.model, lambda m, b: case.loss(compiled, b, "sum"), case.tensors, max_grad_norm=R,
                                clipping_mode=mode, loss_reduction="sum", physical=4, fixed_physical_batch=True)
    engine.detach()
    assert_close(got, reference_sum(grads, [list(grads[0])], [R], "abadi"), 1e-5)


@pytest.mark.parametrize("style", ["all-layer", "layer-wise"])
@pytest.mark.parametrize("mode", [*MODES, "auto"])
def test_two_views_of_each_example_are_clipped_together(references, mode, style):
    """Two forward passes per physical batch (two augmentations of the same examples), one backward:
    each example's gradient is that of both its views' losses, clipped once (not R per view)."""
    case, _ = references["cnn"]
    x, y = case.tensors
    n = len(x)
    two_views = lambda m, b: case.loss(m, b, "sum") + case.loss(m, (b[0].flip(-1), b[1]), "sum")  # noqa: E731
    grads = per_example_grads(case.model, two_views, [(x[i : i + 1], y[i : i + 1]) for i in range(n)])
    names = list(grads[0])
    groups = reference_groups(style, names)
    want = reference_sum(grads, groups, [R / math.sqrt(len(groups))] * len(groups), "abadi")
    got, engine = private_grads(case.model, two_views, case.tensors, max_grad_norm=R, physical=4, clipping_mode=mode,
                                clipping_style=style, loss_reduction="sum")
    engine.detach()
    assert_close(got, want, 1e-5)

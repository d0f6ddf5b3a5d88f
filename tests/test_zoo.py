"""The model zoo: a broad sample of real architectures (timm, transformers, torchvision, peft,
recurrent text classifiers), built from configs with random weights, each trained exactly as the
one-example-at-a-time reference in float64: per-example and auto modes, all-layer and layer-wise
clipping, a mean over physical batches of 2 and a sum over one. README's zoo table lists them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from dpspeed.testing import check_model
from tests.helpers.zoo import LIBRARY, ZOO

pytestmark = pytest.mark.usefixtures("float64")


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_trains_exactly(name):
    if name in LIBRARY:
        pytest.importorskip(LIBRARY[name])
    torch.manual_seed(0)
    entry = ZOO[name]()
    check_model(entry.model.double(), entry.inputs, entry.targets, entry.loss_fn, modes=["per-example", "auto"],
                styles=["all-layer", "layer-wise"])


def test_readme_lists_the_zoo():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    listed = set(re.findall(r"^\| `([a-z0-9_]+)` \|", readme, flags=re.M))
    assert listed == set(ZOO)

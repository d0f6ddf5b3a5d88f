"""The documentation's code runs: the worked example of docs/architecture.md ("Adding a layer")."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dpspeed.layers import registry

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _python_blocks(markdown: str, section: str) -> list[str]:
    body = markdown.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


@pytest.mark.usefixtures("fresh_registry")
def test_adding_a_layer_example_runs():
    pytest.importorskip("transformers")
    blocks = _python_blocks((DOCS / "architecture.md").read_text(), "Adding a layer")
    assert len(blocks) == 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/architecture.md", "exec"), namespace)
    from transformers.pytorch_utils import Conv1D

    assert type(registry.rule_for(Conv1D(3, 4))) is namespace["Conv1DRule"]  # the example's, not the built-in

"""Every script in examples/ runs, at a tiny size, as a user would start it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PYTHON = [sys.executable]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]

EXAMPLES = {  # script: (launcher, arguments, what its output must contain, libraries it needs)
    "digits.py": (PYTHON, ["--epochs", "1"], "test accuracy", ["sklearn"]),
    "opacus_migrated.py": (PYTHON, ["--epochs", "1"], "target eps=3", ["sklearn"]),
    "bert_dptrainer.py": (PYTHON, ["--epochs", "1", "--examples", "64", "--out", "{tmp}"], "epsilon", ["transformers"]),
    "lora_causal_lm.py": (PYTHON, ["--epochs", "1", "--examples", "64", "--out", "{tmp}"], "generated:",
                          ["transformers", "peft"]),
    "torchrun_data_parallel.py": (TORCHRUN, ["--epochs", "1"], "over 2 processes", []),
    "fsdp2.py": (TORCHRUN, ["--epochs", "1"], "weights sharded over 2", []),
    "lightning_digits.py": (PYTHON, ["--epochs", "1"], "val accuracy", ["lightning", "sklearn"]),
}


#: a gloo rank that finished its work can abort at interpreter teardown (a torch issue seen about
#: once in twenty runs under load, never before its work is done): such a run is made once more
TEARDOWN_ABORT = "terminate called without an active exception"


def _run(command: list[str], tmp_path: Path) -> str:
    for attempt in range(2):
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
        if done.returncode == 0 or TEARDOWN_ABORT not in done.stderr or attempt:
            break
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("script", sorted(EXAMPLES))
def test_example_runs(script, tmp_path):
    launcher, arguments, expected, libraries = EXAMPLES[script]
    for library in libraries:
        pytest.importorskip(library)
    arguments = [a.format(tmp=tmp_path) for a in arguments]
    assert expected in _run([*launcher, f"examples/{script}", *arguments], tmp_path)


def test_opacus_migrated_runs_on_opacus_too(tmp_path):
    """The same script, its other import branch: it is Opacus's API, not dpspeed's look-alike."""
    pytest.importorskip("opacus")
    pytest.importorskip("sklearn")
    assert "target eps=3" in _run([*PYTHON, "examples/opacus_migrated.py", "--epochs", "1", "--library", "opacus"],
                                  tmp_path)


def test_bench_on_a_custom_model(tmp_path):
    out = _run([sys.executable, "-m", "dpspeed", "bench", "--model", "py:examples/bench_custom_model.py:build",
                "--image-size", "16", "--max-batch", "8", "--min-batch", "8", "--modes", "bk", "--repeats", "1",
                "--warmup", "1", "--memory-styles", "all-layer", "--out", str(tmp_path), "--no-progress"], tmp_path)
    assert "recommended for py:examples/bench_custom_model.py:build" in " ".join(out.split())
    assert (tmp_path / "report.md").exists()


def test_every_example_is_tested():
    assert {p.name for p in (ROOT / "examples").glob("*.py")} == set(EXAMPLES) | {"bench_custom_model.py"}

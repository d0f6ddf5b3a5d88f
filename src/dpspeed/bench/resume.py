"""Resuming a bench run from the results.json it saved: every setup measured in full is kept and
skipped, what a run cut off in the middle of a setup left of it is dropped and measured again, and
the new run's models, precisions, modes and peers are added to the earlier ones. A run stopped by a
time limit (`timeout --signal=INT`) and started again with `--resume` ends with the union."""

from __future__ import annotations

import json
from pathlib import Path

#: settings under which earlier rows would not compare with new ones
MEASUREMENT_SETTINGS = ("image_size", "num_classes", "seq_len", "device", "max_batch", "min_batch", "memory_limit",
                        "repeats", "warmup", "memory_mode", "memory_styles", "memory_batch", "seed", "compile")
#: settings a resumed run adds to
UNION_SETTINGS = ("models", "precisions", "modes", "peers")
#: the lists of measured rows
ROWS = ("largest_batch", "throughput", "breakdown", "end_to_end", "memory")


def part(model: str, precision: str | None = None, setup: str | None = None) -> str:
    """The name of one unit of work: a (model, precision, setup), or a model's memory profile."""
    return f"{model}|memory" if precision is None else f"{model}|{precision}|{setup}"


def _part_of(kind: str, row: dict) -> str:
    return part(row["model"]) if kind == "memory" else part(row["model"], row["precision"], row["setup"])


def load_earlier(path: Path, config: dict) -> dict | None:
    """The earlier run's results at `path` with only its completed parts' rows, or None if there is
    no such file. Raises ValueError if it was measured under other MEASUREMENT_SETTINGS."""
    if not path.exists():
        return None
    earlier = json.loads(path.read_text())
    differing = [f"{name} {earlier['config'].get(name)!r} -> {config.get(name)!r}" for name in MEASUREMENT_SETTINGS
                 if earlier["config"].get(name) != config.get(name)]
    if differing:
        raise ValueError(f"--resume: {path} was measured with other settings ({'; '.join(differing)}); give the "
                         "same ones, or another --out")
    completed = set(earlier.get("completed", []))
    for kind in ROWS:
        earlier[kind] = [row for row in earlier.get(kind, []) if _part_of(kind, row) in completed]
    earlier.pop("interrupted", None)
    return earlier


def merge(results: dict, earlier: dict) -> None:
    """Start `results` (a new run's) from the earlier run's rows, completed parts and models, with
    both runs' settings and environments."""
    for kind in ROWS:
        results[kind] = earlier[kind]
    results["completed"] = earlier.get("completed", [])
    results["models"] = earlier.get("models", {})
    results["runs"] = [*earlier.get("runs", [earlier["environment"]]), results["environment"]]
    for name in UNION_SETTINGS:
        new = results["config"][name]
        results["config"][name] = [*earlier["config"][name], *[v for v in new if v not in earlier["config"][name]]]


def config_as_saved(config: object) -> dict:
    """The settings as results.json holds them (lists, not tuples)."""
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(config), default=str))

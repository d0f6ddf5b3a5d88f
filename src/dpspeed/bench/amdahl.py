"""Amdahl's law for data-parallel throughput: speed-up(n) = 1 / ((1 - p) + p / n)."""

from __future__ import annotations


def speedup(p: float, n: float) -> float:
    return 1.0 / ((1.0 - p) + p / n)


def fit_parallel_fraction(processes: list[int], throughputs: list[float]) -> float:
    """The parallel fraction p in [0, 1] that best fits the measured speed-ups over one process:
    least squares on 1/speed-up = 1 - p (1 - 1/n), which is linear in p."""
    if 1 not in processes:
        raise ValueError("the fit needs the throughput on one process")
    base = throughputs[processes.index(1)]
    xs = [1.0 - 1.0 / n for n in processes]
    ys = [1.0 - base / t for t in throughputs]  # 1 - 1/speed-up
    denominator = sum(x * x for x in xs)
    if denominator == 0:
        raise ValueError("the fit needs throughputs on more than one process count")
    p = sum(x * y for x, y in zip(xs, ys)) / denominator
    return min(max(p, 0.0), 1.0)

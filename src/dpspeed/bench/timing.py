"""Honest timings of a setup: synchronised clocks, warm-up excluded, median and quartiles over
repeats; the per-part breakdown of one step; and an end-to-end figure fed by a data loader."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ..profiling import SectionTimer, sync
from .setups import Setup
from .workload import Workload


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


Clock = Callable[[], float]


def timed_step(setup: Setup, x: torch.Tensor, y: torch.Tensor, precision: str, last: bool = False,
               clock: Clock = time.perf_counter) -> float:
    sync(x.device)
    start = clock()
    setup.step(x, y, precision, last=last)
    sync(x.device)
    return clock() - start


def whole_step_ms(base: nn.Module, modes: list[str], x: torch.Tensor, y: torch.Tensor, precision: str, steps: int,
                  warmup: int) -> list[dict]:
    """Per mode, on its own copy of `base`: the median milliseconds of a whole step (the last
    physical batch of a logical one: noise and update included)."""
    rows = []
    for mode in modes:
        setup = Setup(base, mode)
        for _ in range(warmup):
            setup.step(x, y, precision, last=True)
        times = [timed_step(setup, x, y, precision, last=True) for _ in range(steps)]
        setup.close()
        rows.append({"mode": mode, "ms_median": 1e3 * statistics.median(times)})
    return rows


def throughput(setup: Setup, x: torch.Tensor, y: torch.Tensor, precision: str, repeats: int, warmup: int) -> dict:
    """Examples per second over physical batches (a private setup clips and accumulates; noise and
    the update, once per logical batch, are in the breakdown)."""
    for _ in range(warmup):
        timed_step(setup, x, y, precision)
    seconds = [timed_step(setup, x, y, precision) for _ in range(repeats)]
    q1, median, q3 = quartiles(seconds)
    batch = len(x)
    return {"batch": batch, "seconds": seconds, "seconds_median": median, "spread": (q3 - q1) / median,
            "per_second": batch / median, "per_second_q1": batch / q3, "per_second_q3": batch / q1}


def breakdown(setup: Setup, x: torch.Tensor, y: torch.Tensor, precision: str, repeats: int,
              clock: Clock = time.perf_counter) -> dict:
    """Median seconds of each part of a whole step (one physical batch that is also the last of its
    logical batch), measured with synchronised section timers, next to the median of uninstrumented
    whole steps; the two runs alternate so that drift hits both alike. (`clock`: seconds; the tests
    count operations instead, which no load on the machine disturbs.)"""
    device = x.device
    timed_step(setup, x, y, precision, last=True, clock=clock)  # warm-up
    runs: list[dict[str, float]] = []
    whole: list[float] = []
    for _ in range(repeats):
        with SectionTimer(device, clock) as timer:
            setup.step(x, y, precision, last=True)
        runs.append(timer.seconds)
        whole.append(timed_step(setup, x, y, precision, last=True, clock=clock))
    names = list(dict.fromkeys(n for run in runs for n in run))
    parts = {n: statistics.median(run.get(n, 0.0) for run in runs) for n in names}
    if "step" in parts:
        parts["bookkeeping"] = parts.pop("step")  # the optimizer step outside its named parts
    # the instrumented step's total is the median of each run's sum (a sum of medians runs low when
    # spikes hit different parts in different runs)
    parts_sum = statistics.median(sum(run.values()) for run in runs)
    return {"batch": len(x), "parts": parts, "parts_sum": parts_sum, "step_seconds": statistics.median(whole)}


def end_to_end(setup: Setup, workload: Workload, batch: int, precision: str, steps: int, device: torch.device) -> dict:
    """Examples per second including the data loader and the copy to the device."""
    if steps < 2:
        raise ValueError("end_to_end needs at least 2 steps (the first is warm-up)")
    x, y = workload.batch(batch * steps, "cpu")
    batches = iter(DataLoader(TensorDataset(x, y), batch_size=batch, pin_memory=device.type == "cuda"))

    def step(xb: torch.Tensor, yb: torch.Tensor) -> None:
        setup.step(xb.to(device, non_blocking=True), yb.to(device, non_blocking=True), precision)

    step(*next(batches))  # warm-up
    sync(device)
    start = time.perf_counter()
    for xb, yb in batches:
        step(xb, yb)
    sync(device)
    return {"batch": batch, "per_second": batch * (steps - 1) / (time.perf_counter() - start)}

"""Named sections of a training step (forward, norms, clipped sums, noise, ...) for time breakdowns.

The library marks its parts with `section(name)`; this costs nothing unless a `SectionTimer` is
active, as in `dpspeed bench`. The timer synchronises the device at every boundary, so each
section's time is the device time spent in it, and reports exclusive times: a section nested in
another (norms computed during the backward pass when memory is released early) is subtracted
from its parent, so the parts add up to the whole.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

import torch

_active: "SectionTimer | None" = None


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read after it covers that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SectionTimer:
    """Collects the exclusive seconds of every section entered while it is active."""

    def __init__(self, device: torch.device | str = "cpu", clock: Callable[[], float] = time.perf_counter):
        self.device = torch.device(device)
        self.clock = clock  # seconds by default; any increasing count works (the tests count operations)
        self.seconds: dict[str, float] = {}
        self._stack: list[list[float]] = []  # [start, seconds of nested sections]

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        sync(self.device)
        frame = [self.clock(), 0.0]
        self._stack.append(frame)
        try:
            yield
        finally:
            sync(self.device)
            total = self.clock() - frame[0]
            self._stack.pop()
            if self._stack:
                self._stack[-1][1] += total
            self.seconds[name] = self.seconds.get(name, 0.0) + total - frame[1]

    def __enter__(self) -> "SectionTimer":
        global _active
        if _active is not None:
            raise RuntimeError("a SectionTimer is already active")
        _active = self
        return self

    def __exit__(self, *exc) -> None:
        global _active
        _active = None


def section(name: str):
    """Time the enclosed code as `name` when a SectionTimer is active; otherwise do nothing."""
    if _active is None:
        return contextlib.nullcontext()
    return _active.section(name)

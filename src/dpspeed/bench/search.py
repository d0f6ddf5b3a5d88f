"""The largest physical batch that fits: double until out of memory, then bisect, recovering from
each out-of-memory error without keeping any of the failed attempt's tensors alive."""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

logger = logging.getLogger(__name__)


def is_out_of_memory(err: BaseException) -> bool:
    """torch's, or XLA's (the JAX peer: RESOURCE_EXHAUSTED), which are RuntimeErrors too."""
    message = str(err)
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and ("out of memory" in message.lower() or "RESOURCE_EXHAUSTED" in message))


@dataclass
class SearchResult:
    largest: int  # 0 when not even the first size fits
    at_limit: bool  # the search stopped at its upper limit, not at an out-of-memory error
    tried: dict[int, bool] = field(default_factory=dict)  # size -> fitted


def free_memory() -> None:
    """Collect what a failed or finished step left unreachable and hand cached GPU blocks back."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _fits(run: Callable[[int], None], size: int, cleanup: Callable[[], None]) -> bool:
    failed = False
    try:
        run(size)
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not is_out_of_memory(err):
            raise
        failed = True  # leave the except block first: its traceback holds the failed step's tensors
    if failed:
        cleanup()
        free_memory()
    return not failed


def largest_batch(run: Callable[[int], None], limit: int, start: int = 1,
                  cleanup: Callable[[], None] = lambda: None) -> SearchResult:
    """The largest size in [start, limit] for which `run(size)` raises no out-of-memory error,
    assuming that what fits at some size fits at every smaller one."""
    if not 1 <= start <= limit:
        raise ValueError(f"need 1 <= start <= limit, got start={start}, limit={limit}")
    tried: dict[int, bool] = {}

    def fits(size: int) -> bool:
        tried[size] = _fits(run, size, cleanup)
        logger.debug("batch %d %s", size, "fits" if tried[size] else "is out of memory")
        return tried[size]

    good, bad = 0, None
    size = start
    while True:
        if not fits(size):
            bad = size
            break
        good = size
        if size == limit:
            return SearchResult(good, True, tried)
        size = min(2 * size, limit)
    while bad - good > 1:
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return SearchResult(good, False, tried)

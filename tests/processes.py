"""Helpers for tests that start torch.distributed process groups on the CPU (gloo)."""

from __future__ import annotations

import contextlib
import socket
from typing import Iterator

import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def single_process_group() -> Iterator[None]:
    """A gloo process group of this process alone, destroyed afterwards."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()

"""torch.distributed process groups on the CPU (gloo) for the multi-process tests: one spawn harness
that runs a function on every rank and collects what each rank returns."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator

import torch.distributed as dist
import torch.multiprocessing as mp


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


def _rank_main(rank: int, port: int, out: str, world: int, timeout: float, work: Callable, args: tuple) -> None:
    """One spawned rank: joins the gloo group, runs work(rank, *args) and writes what it returns (or
    its error) to out/rank{rank}.json."""
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout))
        record = work(rank, *args)
        dist.barrier()  # no rank tears its connections down while another still communicates
    except Exception as err:  # reported to the test
        record = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:
            pass
    # the record is written: leave without the interpreter's teardown, where a gloo thread still being
    # destroyed once aborted a rank ("terminate called without an active exception") after its work
    # had succeeded (twice in clean-clone CI runs, never reproduced locally)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(out: Path, work: Callable, *args, world: int = 2, timeout: float = 60, check: bool = True) -> list[dict]:
    """Run the module-level function `work(rank, *args)` on `world` spawned processes of one gloo
    group; returns each rank's JSON-able record. With `check`, a rank's error fails the test."""
    mp.start_processes(_rank_main, args=(free_port(), str(out), world, timeout, work, args), nprocs=world,
                       join=True, start_method="spawn")
    files = [Path(out) / f"rank{r}.json" for r in range(world)]
    ranks = [json.loads(f.read_text()) if f.exists() else {"error": "the rank exited without a record"} for f in files]
    if check:
        assert all("error" not in r for r in ranks), [r.get("trace") for r in ranks]
    return ranks

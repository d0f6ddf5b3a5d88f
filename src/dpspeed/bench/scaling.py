"""`torchrun --nproc-per-node N -m dpspeed bench --scaling`: throughput of data-parallel training on
1..N processes, non-private (DistributedDataParallel) and private (dpspeed: one all-reduce per
logical batch), each on process groups of the first k ranks; Amdahl's law fitted to the speed-ups;
and a model of the efficiency at larger scale from the measured compute and all-reduce times."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import torch
import torch.distributed as dist

from ..profiling import SectionTimer
from .amdahl import fit_parallel_fraction
from .setups import NON_PRIVATE, Setup
from .study import DEFAULT_MODES, BenchConfig, environment
from .workload import Workload


def ring_all_reduce_seconds(nbytes: int, processes: int, bandwidth: float, latency: float = 20e-6) -> float:
    """Time of a ring all-reduce of `nbytes` over `processes` at `bandwidth` bytes/s per link."""
    if processes <= 1:
        return 0.0
    return 2 * (processes - 1) * (nbytes / processes / bandwidth + latency)


def modeled_efficiency(compute_seconds: float, gradient_bytes: int, processes: int, bandwidth: float) -> float:
    """Throughput on `processes` over `processes` times one process's, with the all-reduce not overlapped."""
    return compute_seconds / (compute_seconds + ring_all_reduce_seconds(gradient_bytes, processes, bandwidth))


def _init() -> torch.device:
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise RuntimeError("--scaling runs under torchrun: torchrun --nproc-per-node N -m dpspeed bench --scaling")
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _logical_step(setup: Setup, x, y, precision: str, accumulate: int) -> dict[str, float]:
    with SectionTimer(x.device) as timer:
        with timer.section("total"):
            for i in range(accumulate):
                setup.step(x, y, precision, last=i == accumulate - 1)
    return {"all-reduce": timer.seconds.get("all-reduce", 0.0), "total": sum(timer.seconds.values())}


def _measure(setup: Setup, workload: Workload, config: BenchConfig, device, group) -> dict:
    x, y = workload.batch(config.scaling_batch, device)
    for _ in range(config.warmup):
        _logical_step(setup, x, y, config.precisions[0], config.accumulate)
    runs = []
    for _ in range(config.repeats):
        dist.barrier(group)
        runs.append(_logical_step(setup, x, y, config.precisions[0], config.accumulate))
    seconds = statistics.median(r["total"] for r in runs)
    return {"step_seconds": seconds, "all_reduce_seconds": statistics.median(r["all-reduce"] for r in runs)}


def run_scaling(config: BenchConfig) -> dict | None:
    """Measure on every process count 1..N; rank 0 returns (and saves) the results, others None."""
    device = _init()
    rank, world = dist.get_rank(), dist.get_world_size()
    workload = Workload(config.models[0], config.image_size, 3, config.num_classes, config.seq_len, config.seed)
    base = workload.build(device)
    modes = ["auto"] if config.modes == DEFAULT_MODES else config.modes
    rows = []
    for k in range(1, world + 1):
        group = dist.new_group(list(range(k)))  # every rank takes part in creating every group
        if rank < k:
            for label in [NON_PRIVATE, *modes]:
                setup = Setup(base, label, process_group=group)
                measured = _measure(setup, workload, config, device, group)
                setup.close()
                per_second = k * config.scaling_batch * config.accumulate / measured["step_seconds"]
                rows.append({"setup": label, "processes": k, "per_second": per_second, **measured})
        dist.barrier()
    if rank != 0:
        return None
    for row in rows:
        one = next(r for r in rows if r["setup"] == row["setup"] and r["processes"] == 1)
        row["efficiency"] = row["per_second"] / (row["processes"] * one["per_second"])
    fits = {}
    if world > 1:
        for label in dict.fromkeys(r["setup"] for r in rows):
            mine = [r for r in rows if r["setup"] == label]
            fits[label] = fit_parallel_fraction([r["processes"] for r in mine], [r["per_second"] for r in mine])
    gradient_bytes = 4 * sum(p.numel() for p in base.parameters() if p.requires_grad)
    single = {r["setup"]: r for r in rows if r["processes"] == 1}
    model = [{"setup": label, "processes": n, "bandwidth": config.bandwidth,
              "efficiency": modeled_efficiency(r["step_seconds"], gradient_bytes, n, config.bandwidth)}
             for label, r in single.items() for n in (8, 32, 80)]
    results = {
        "environment": environment(device), "config": {**vars(config)}, "seed": config.seed,
        "models": {workload.model: {"unit": workload.unit, "parameters": gradient_bytes // 4}},
        "scaling": {"backend": dist.get_backend(), "world": world, "batch_per_process": config.scaling_batch,
                    "accumulate": config.accumulate, "gradient_bytes": gradient_bytes, "throughput": rows,
                    "parallel_fraction": fits, "modeled": model},
    }
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return results

"""The cost of secure_mode's noise against the default noise, per logical step, for the parameter
counts of the bench's models: seconds to add noise to every coordinate once.

    python -m benchmarks.secure_noise --device cpu --out benchmarks/results/secure_noise_cpu.json

`--cpu-streams 1` times the default noise drawn from one stream on a CPU (the library draws from
`noise.CPU_STREAMS`, in threads side by side).
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import time
from pathlib import Path

import torch

from dpspeed.bench.study import environment
from dpspeed import noise
from dpspeed.noise import NoiseSource, SecureNoiseSource
from dpspeed.profiling import sync

MODELS = {"small_cnn (digits)": 5_000, "vit_tiny_patch16_224": 5_717_416, "vit_base_patch16_224": 86_567_656}


def seconds(source, coordinates: int, device: torch.device, repeats: int) -> float:
    total = torch.zeros(coordinates, device=device)
    times = []
    for _ in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        source.new_step()
        source.add_to([total], 1.0)
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--largest", type=int, default=10_000_000, help="skip models with more coordinates")
    parser.add_argument("--cpu-streams", type=int, default=noise.CPU_STREAMS, help="streams of the default noise on a CPU")
    parser.add_argument("--out", default="benchmarks/results/secure_noise_cpu.json")
    args = parser.parse_args()
    noise.CPU_STREAMS = args.cpu_streams
    device = torch.device(args.device)
    default = NoiseSource.create(None, 0, 1, False, device)
    secure = SecureNoiseSource(lambda: secrets.token_bytes(32))
    rows = []
    for name, coordinates in MODELS.items():
        if coordinates > args.largest:
            continue
        row = {"model": name, "coordinates": coordinates,
               "default_seconds": seconds(default, coordinates, device, args.repeats),
               "secure_seconds": seconds(secure, coordinates, device, args.repeats)}
        row["secure_ns_per_coordinate"] = 1e9 * row["secure_seconds"] / coordinates
        rows.append(row)
        print(json.dumps(row))
    Path(args.out).write_text(json.dumps({"environment": environment(device), "args": vars(args), "rows": rows},
                                         indent=1))


if __name__ == "__main__":
    main()

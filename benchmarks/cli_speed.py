"""How long the command line takes to answer `--help`, as a user starts it (a new process each
time, the console script installed by pip), median of repeats.

    python benchmarks/cli_speed.py --out benchmarks/results/cpu_cli_speed.json
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from dpspeed.bench.study import write_result

COMMANDS = [["--help"], ["train", "--help"], ["epsilon", "--help"], ["--version"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    executable = shutil.which("dpspeed") or str(Path(sys.executable).with_name("dpspeed"))
    rows = []
    for command in COMMANDS:
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            subprocess.run([executable, *command], check=True, capture_output=True)
            seconds.append(time.perf_counter() - start)
        rows.append({"command": " ".join(["dpspeed", *command]), "seconds": seconds, "median_s": statistics.median(seconds)})
        print(f"{rows[-1]['command']:24s} {rows[-1]['median_s']:.3f} s")
    if args.out:
        write_result(args.out, torch.device("cpu"), args, rows)


if __name__ == "__main__":
    main()

"""Peak tensor memory of DP training of the sharding test's model (6 hidden layers of 256, Adam, two
logical steps): one process, and each rank of two sharded by fully_shard (gloo on the CPU).

Measured with the tests' meter (tests/helpers/memory_cap.py: live tensor storages at their current size).

    python -m benchmarks.sharded_memory
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dpspeed.bench.study import environment
from tests.helpers.processes import run_ranks
from tests.parallel import test_fsdp

OUT = Path("benchmarks/results/sharded_memory_cpu.json")


def main() -> None:
    single = test_fsdp._train_within_budget(1, budget=None)
    folder = Path("/tmp/dpspeed_sharded_memory")
    folder.mkdir(exist_ok=True)
    ranks = run_ranks(folder, test_fsdp._measure_run)
    result = {"environment": environment(torch.device("cpu")), "budget_in_test": test_fsdp.BUDGET,
              "one_process_peak_bytes": single["peak"], "sharded_rank_peak_bytes": [r["peak"] for r in ranks]}
    OUT.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "environment"}))


if __name__ == "__main__":
    main()

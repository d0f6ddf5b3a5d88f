"""Peak tensor memory of DP training of the sharding test's model (6 hidden layers of 256, Adam, two
logical steps): one process, and each rank of two sharded by fully_shard (gloo on the CPU).

Measured with the tests' meter (tests/memory_cap.py: live tensor storages at their current size).

    python benchmarks/sharded_memory.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_sharding  # noqa: E402
from processes import free_port  # noqa: E402

from dpspeed.bench.study import environment  # noqa: E402

OUT = Path("benchmarks/results/sharded_memory_cpu.json")


def main() -> None:
    single = test_sharding._train_within_budget(1, budget=None)
    folder = Path("/tmp/dpspeed_sharded_memory")
    folder.mkdir(exist_ok=True)
    mp.start_processes(test_sharding._spawned, args=(free_port(), str(folder), "measure"), nprocs=2, join=True,
                       start_method="spawn")
    ranks = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(2)]
    result = {"environment": environment(torch.device("cpu")), "budget_in_test": test_sharding.BUDGET,
              "one_process_peak_bytes": single["peak"], "sharded_rank_peak_bytes": [r["peak"] for r in ranks]}
    OUT.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "environment"}))


if __name__ == "__main__":
    main()

"""The accountant's cost on the digits configuration (N = 1437 training examples, batch 128,
20 epochs: 240 steps, delta = 1e-5, target epsilon 8): make_private_with_epsilon end to end
(calibration included) and one get_epsilon after the 240 steps, median over repeats; Opacus's
(RDP accountant, its default) beside it when installed.

    python benchmarks/accountant_speed.py --out benchmarks/results/cpu_accountant_speed.json
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpspeed import PrivacyEngine
from dpspeed.bench.study import write_result

N, BATCH, EPOCHS, DELTA, TARGET = 1437, 128, 20, 1e-5, 8.0


def _timed(engine_class, repeats: int) -> dict:
    make, query, epsilons = [], [], []
    for _ in range(repeats):
        model = nn.Linear(64, 10)
        loader = DataLoader(TensorDataset(torch.randn(N, 64), torch.randint(0, 10, (N,))), batch_size=BATCH)
        engine = engine_class()
        start = time.perf_counter()
        _, optimizer, _ = engine.make_private_with_epsilon(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                         data_loader=loader, target_epsilon=TARGET, target_delta=DELTA,
                                         epochs=EPOCHS, max_grad_norm=1.0)
        make.append(time.perf_counter() - start)
        sigma, rate = optimizer.noise_multiplier, BATCH / N
        for _ in range(EPOCHS * len(loader)):
            engine.accountant.step(noise_multiplier=sigma, sample_rate=rate)
        start = time.perf_counter()
        epsilons.append(engine.get_epsilon(DELTA))
        query.append(time.perf_counter() - start)
    return {"make_private_with_epsilon_s": statistics.median(make), "get_epsilon_s": statistics.median(query),
            "epsilon": epsilons[-1], "noise_multiplier": sigma}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    rows = [{"library": "dpspeed (PLD)", **_timed(PrivacyEngine, args.repeats)}]
    try:
        import opacus
        rows.append({"library": f"Opacus {opacus.__version__} (RDP)", **_timed(opacus.PrivacyEngine, args.repeats)})
    except ImportError:
        pass
    for row in rows:
        print(f"{row['library']:22s} make_private_with_epsilon {row['make_private_with_epsilon_s']:6.2f} s   "
              f"get_epsilon {1e3 * row['get_epsilon_s']:7.1f} ms   epsilon {row['epsilon']:.4f}  sigma {row['noise_multiplier']:.4f}")
    if args.out:
        write_result(args.out, torch.device("cpu"), args, rows)


if __name__ == "__main__":
    main()

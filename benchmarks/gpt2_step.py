"""Step time of a small GPT-2 (transformers, 4 layers of width 64, sequence 64, batch 8) on one CPU
thread, non-private beside dpspeed's modes: GPT-2's projections are transformers' Conv1D.

    python benchmarks/gpt2_step.py --out benchmarks/results/cpu_gpt2_step.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import transformers
from torch import nn

from dpspeed.bench.setups import NON_PRIVATE
from dpspeed.bench.study import write_result
from dpspeed.bench.timing import whole_step_ms


class LastLogits(nn.Module):
    """The language model's logits at the last position: one class per example."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits[:, -1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=["bk", "auto"])
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = transformers.GPT2Config(vocab_size=500, n_positions=64, n_embd=64, n_layer=4, n_head=4)
    base = LastLogits(transformers.GPT2LMHeadModel(config))
    x, y = torch.randint(0, 500, (8, 64)), torch.randint(0, 500, (8,))
    rows = whole_step_ms(base, [NON_PRIVATE, *args.modes], x, y, "fp32", args.steps, warmup=2)
    for row in rows:
        print(f"{row['mode']:12s} {row['ms_median']:7.1f} ms/step")
    if args.out:
        write_result(args.out, torch.device("cpu"), args, rows)


if __name__ == "__main__":
    main()

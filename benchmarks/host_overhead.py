"""Host (Python and dispatch) time of one step: a 12-block ViT of width 32 at 32x32, batch 2, one
CPU thread, where the arithmetic is negligible and the step time is mostly per-op overhead.

    python benchmarks/host_overhead.py --precision bf16 --out benchmarks/results/host_overhead_cpu.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import timm
import torch

from dpspeed.bench.study import write_result
from dpspeed.bench.timing import whole_step_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=["non-private", "bk", "auto"])
    parser.add_argument("--precision", default="bf16", choices=["fp32", "tf32", "bf16"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = timm.create_model("vit_base_patch16_224", embed_dim=32, num_heads=2, img_size=32, num_classes=10)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    rows = whole_step_ms(base, args.modes, x, y, args.precision, args.steps, warmup=3)
    for row in rows:
        print(f"{row['mode']:12s} {row['ms_median']:7.1f} ms/step")
    if args.out:
        write_result(args.out, torch.device("cpu"), args, rows)


if __name__ == "__main__":
    main()

"""Where one physical step's time goes: the PyTorch profiler's table of operators for one setup.

    python benchmarks/profile_step.py --model timm:vit_base_patch16_224 --image-size 224 --mode bk --batch 32 512 --precision bf16
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from dpspeed.bench.setups import Setup
from dpspeed.bench.workload import Workload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="timm:vit_tiny_patch16_224")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--mode", default="bk")
    parser.add_argument("--batch", type=int, nargs="+", default=[32])
    parser.add_argument("--precision", default="bf16", choices=["fp32", "tf32", "bf16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    device = torch.device(args.device)
    workload = Workload(args.model, args.image_size, 3, args.classes, 128, 0)
    setup = Setup(workload.build(device), args.mode)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    for batch in args.batch:
        x, y = workload.batch(batch, device)
        for _ in range(3):
            setup.step(x, y, args.precision, last=True)
        with profile(activities=activities) as prof:
            setup.step(x, y, args.precision, last=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
        print(f"=== {args.model} {args.mode} batch {batch} {args.precision}")
        print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()

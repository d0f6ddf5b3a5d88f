"""Peak memory of one training step above its start, per clipping mode and style, non-private
beside them (the storages a step allocates; on a GPU the allocator's peak):

    python -m benchmarks.step_memory --models vit_tiny_patch16_224 resnetv2_50x1_bit --image-size 64 \
        --batch 32 --out benchmarks/results/step_memory_cpu.json

What the clipping keeps beyond non-private training is the layers' inputs and output gradients
until their clipping unit is complete (all-layer: the end of the backward pass) and, for the
modes that take them, explicit per-example gradients.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dpspeed.apps import models
from dpspeed.bench.memory import peak_bytes
from dpspeed.bench.setups import NON_PRIVATE, Setup
from dpspeed.bench.study import write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vit_tiny_patch16_224"])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--modes", nargs="+", default=["bk", "auto"])
    parser.add_argument("--styles", nargs="+", default=["all-layer", "layer-wise"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        base = models.build(name if name in models.BUILTIN else f"timm:{name}", 3, args.image_size, args.classes)
        base = base.to(device)
        x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
        y = torch.randint(0, args.classes, (args.batch,), device=device)
        setups = [(NON_PRIVATE, "all-layer")] + [(m, s) for m in args.modes for s in args.styles]
        baseline = None
        for mode, style in setups:
            setup = Setup(base, mode, style)
            setup.step(x, y, args.precision, last=True)  # warm: optimizer state, plans
            peak = peak_bytes(lambda: setup.step(x, y, args.precision, last=True), device)
            setup.close()
            baseline = baseline or peak
            rows.append({"model": name, "mode": mode, "style": style, "batch": args.batch, "peak_bytes": peak,
                         "relative_to_non_private": peak / baseline})
            print(f"{name:24s} {mode:12s} {style:11s} {peak / 2**20:8.1f} MiB ({peak / baseline:.2f}x)", flush=True)
    if args.out:
        write_result(args.out, device, args, rows)


if __name__ == "__main__":
    main()

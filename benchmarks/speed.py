"""Throughput of DP modes against non-private training, side by side in one run.

Each physical batch is forward + backward (+ clip and accumulate for DP), as in the seed paper;
noise and the update once per logical batch are not in the figures. Same model weights, same
inputs, warm-up excluded; the modes are timed in interleaved rounds (one step each per round) so
that drifts of a shared machine hit all of them alike; median over rounds.

    python benchmarks/speed.py                       # CPU: vit_tiny at 64x64 and a small CNN
    python benchmarks/speed.py --models vit_base_patch16_224 --image-size 224 --device cuda --precision bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from dpspeed.apps import models
from dpspeed.bench.setups import NON_PRIVATE, Setup
from dpspeed.bench.study import environment
from dpspeed.bench.timing import timed_step

MODES = ["per-example", "ghost", "mix-ghost", "bk", "bk-mix-ghost", "bk-mix-opt", "auto"]


def measure_model(name: str, args) -> list[dict]:
    """Every mode on copies of one model and the same inputs, timed in interleaved rounds."""
    torch.manual_seed(0)
    base = models.build(name if name in models.BUILTIN else f"timm:{name}", 3, args.image_size, args.classes)
    base = base.to(args.device)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=args.device)
    y = torch.randint(0, args.classes, (args.batch,), device=args.device)
    labels = [NON_PRIVATE, *args.modes] + ([f"opacus-{m}" for m in ("hooks", "ghost")] if "opacus" in args.peers else [])
    setups = [Setup(base, label, args.style) for label in labels]
    times: dict[str, list[float]] = {s.label: [] for s in setups}
    for round_ in range(args.warmup + args.repeats):
        for setup in setups:
            seconds = timed_step(setup, x, y, args.precision)
            if round_ >= args.warmup:
                times[setup.label].append(seconds)
    rows = []
    base_rate = args.batch / statistics.median(times["non-private"])
    for setup in setups:
        median = statistics.median(times[setup.label])
        rows.append({
            "model": name, "mode": setup.label, "batch": args.batch, "precision": args.precision,
            "seconds_median": median, "seconds_all": times[setup.label], "images_per_second": args.batch / median,
            "ratio_to_non_private": args.batch / median / base_rate,
        })
        setup.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit_tiny_patch16_224", "small_cnn"])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--modes", nargs="+", default=MODES)
    parser.add_argument("--style", default="all-layer")
    parser.add_argument("--peers", nargs="*", default=[], choices=["opacus"], help="peers timed in the same rounds")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()

    rows = [row for name in args.models for row in measure_model(name, args)]
    print(f"{'model':24} {'mode':14} {'batch':>5} {'img/s':>9} {'ratio':>6}")
    for r in rows:
        print(f"{r['model']:24} {r['mode']:14} {r['batch']:5d} {r['images_per_second']:9.1f} {r['ratio_to_non_private']:6.2f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"environment": environment(torch.device(args.device)), "args": vars(args), "results": rows}, indent=2))


if __name__ == "__main__":
    main()

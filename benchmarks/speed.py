"""Throughput of DP modes against non-private training, side by side in one run.

Each physical batch is forward + backward (+ clip and accumulate for DP), as in the seed paper;
noise and the update once per logical batch are not in the figures. Same model weights, same
inputs, warm-up excluded, median over repeats.

    python benchmarks/speed.py                       # CPU: vit_tiny at 64x64 and a small CNN
    python benchmarks/speed.py --models vit_base_patch16_224 --image-size 224 --device cuda --precision bf16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import dpspeed
from dpspeed import PrivacyEngine
from dpspeed.models import small_cnn

MODES = ["per-example", "bk", "bk-mix-ghost", "bk-mix-opt", "auto"]


def build(name: str, image_size: int, classes: int) -> torch.nn.Module:
    if name == "small_cnn":
        return small_cnn(3, classes)
    import timm

    try:
        return timm.create_model(name, pretrained=False, num_classes=classes, img_size=image_size)
    except TypeError:
        return timm.create_model(name, pretrained=False, num_classes=classes)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _autocast(device: str, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
    return contextlib.nullcontext()


def time_steps(model, optimizer, x, y, device, precision, repeats, warmup) -> list[float]:
    """Seconds per physical batch (forward, backward, optimizer.step)."""
    times = []
    for i in range(warmup + repeats):
        _sync(device)
        start = time.perf_counter()
        with _autocast(device, precision):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def measure(name: str, mode: str | None, batch: int, args) -> dict:
    torch.manual_seed(0)
    model = build(name, args.image_size, args.classes).to(args.device)
    x = torch.randn(batch, 3, args.image_size, args.image_size, device=args.device)
    y = torch.randint(0, args.classes, (batch,), device=args.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    engine = None
    if mode is not None:
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x.cpu(), y.cpu()), batch_size=batch)
        engine = PrivacyEngine()
        model, optimizer, _ = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
            clipping_mode=mode, clipping_style=args.style,
        )
        optimizer.is_last_physical_batch = False  # accumulate only: the per-physical-batch cost
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = time_steps(model, optimizer, x, y, args.device, args.precision, args.repeats, args.warmup)
    if engine is not None:
        engine.detach()
    median = statistics.median(times)
    return {
        "model": name, "mode": mode or "non-private", "batch": batch, "precision": args.precision,
        "seconds_median": median, "seconds_all": times, "images_per_second": batch / median,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else None,
    }


def environment(device: str) -> dict:
    import timm

    return {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "timm": timm.__version__,
        "dpspeed": dpspeed.__version__, "python": platform.python_version(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit_tiny_patch16_224", "small_cnn"])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--modes", nargs="+", default=MODES)
    parser.add_argument("--style", default="all-layer")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.precision == "tf32"

    rows = []
    for name in args.models:
        base = measure(name, None, args.batch, args)
        rows.append(base)
        for mode in args.modes:
            row = measure(name, mode, args.batch, args)
            row["ratio_to_non_private"] = row["images_per_second"] / base["images_per_second"]
            rows.append(row)
    print(f"{'model':24} {'mode':14} {'batch':>5} {'img/s':>9} {'ratio':>6}")
    for r in rows:
        print(f"{r['model']:24} {r['mode']:14} {r['batch']:5d} {r['images_per_second']:9.1f} {r.get('ratio_to_non_private', 1.0):6.2f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"environment": environment(args.device), "args": vars(args), "results": rows}, indent=2))


if __name__ == "__main__":
    main()

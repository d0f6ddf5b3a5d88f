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
import contextlib
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import dpspeed
from dpspeed import PrivacyEngine
from dpspeed.models import small_cnn

MODES = ["per-example", "ghost", "mix-ghost", "bk", "bk-mix-ghost", "bk-mix-opt", "auto"]


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


def one_step(setup: dict, x, y, device: str, precision: str) -> float:
    """Seconds for one physical batch: forward, backward, optimizer.step (clip and accumulate)."""
    model, optimizer, criterion = setup["model"], setup["optimizer"], setup["criterion"]
    _sync(device)
    start = time.perf_counter()
    with _autocast(device, precision):
        loss = criterion(model(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    _sync(device)
    return time.perf_counter() - start


def make_setup(base: torch.nn.Module, mode: str | None, x, y, args) -> dict:
    model = copy.deepcopy(base)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    criterion = torch.nn.CrossEntropyLoss()
    engine = None
    if mode is not None:
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x.cpu(), y.cpu()), batch_size=len(x))
        engine = PrivacyEngine()
        model, optimizer, criterion, _ = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
            clipping_mode=mode, clipping_style=args.style, criterion=criterion,
        )
        optimizer.is_last_physical_batch = False  # accumulate only: the per-physical-batch cost
    return {"mode": mode or "non-private", "model": model, "optimizer": optimizer, "criterion": criterion, "engine": engine}


def make_opacus_setup(base: torch.nn.Module, mode: str, x, y) -> dict:
    """Opacus 1.6 as a peer: grad_sample_mode 'hooks' or 'ghost', skipping the logical step so that
    only the per-physical-batch work is timed, like dpspeed's."""
    from opacus import PrivacyEngine as OpacusEngine

    model = copy.deepcopy(base)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x.cpu(), y.cpu()), batch_size=len(x))
    engine = OpacusEngine()
    made = engine.make_private(module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0,
                               max_grad_norm=1.0, grad_sample_mode=mode, criterion=torch.nn.CrossEntropyLoss())
    model, optimizer = made[0], made[1]
    criterion = made[2] if len(made) == 4 else torch.nn.CrossEntropyLoss()  # only ghost returns its criterion
    step = optimizer.step

    def skipped_step():
        optimizer.signal_skip_step(do_skip=True)
        return step()

    optimizer.step = skipped_step
    return {"mode": f"opacus-{mode}", "model": model, "optimizer": optimizer, "criterion": criterion, "engine": None}


def measure_model(name: str, args) -> list[dict]:
    """Every mode on copies of one model and the same inputs, timed in interleaved rounds."""
    torch.manual_seed(0)
    base = build(name, args.image_size, args.classes).to(args.device)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=args.device)
    y = torch.randint(0, args.classes, (args.batch,), device=args.device)
    setups = [make_setup(base, mode, x, y, args) for mode in [None, *args.modes]]
    if "opacus" in args.peers:
        setups += [make_opacus_setup(base, mode, x, y) for mode in ("hooks", "ghost")]
    times: dict[str, list[float]] = {s["mode"]: [] for s in setups}
    for round_ in range(args.warmup + args.repeats):
        for setup in setups:
            seconds = one_step(setup, x, y, args.device, args.precision)
            if round_ >= args.warmup:
                times[setup["mode"]].append(seconds)
    rows = []
    base_rate = args.batch / statistics.median(times["non-private"])
    for setup in setups:
        median = statistics.median(times[setup["mode"]])
        rows.append({
            "model": name, "mode": setup["mode"], "batch": args.batch, "precision": args.precision,
            "seconds_median": median, "seconds_all": times[setup["mode"]], "images_per_second": args.batch / median,
            "ratio_to_non_private": args.batch / median / base_rate,
        })
        if setup["engine"] is not None:
            setup["engine"].detach()
    return rows


def environment(device: str) -> dict:
    import timm

    try:
        from opacus import __version__ as opacus_version
    except ImportError:
        opacus_version = None
    return {"opacus": opacus_version,
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
    parser.add_argument("--peers", nargs="*", default=[], choices=["opacus"], help="peers timed in the same rounds")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.precision == "tf32"

    rows = [row for name in args.models for row in measure_model(name, args)]
    print(f"{'model':24} {'mode':14} {'batch':>5} {'img/s':>9} {'ratio':>6}")
    for r in rows:
        print(f"{r['model']:24} {r['mode']:14} {r['batch']:5d} {r['images_per_second']:9.1f} {r['ratio_to_non_private']:6.2f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"environment": environment(args.device), "args": vars(args), "results": rows}, indent=2))


if __name__ == "__main__":
    main()

"""The largest ViT that trains with DP (dpspeed, AdamW) on this machine, with and without fully_shard.

For each placement, models are tried from small to large: one logical batch of two physical
batches (forward, backward, clipping, reduce-scatter, noise, AdamW step), then its peak memory
and step time; the first out-of-memory error ends that placement. Placements:
- plain: the model on the device;
- sharded: fully_shard on every block and the root, over all ranks (torchrun for N > 1);
- sharded+offload: the same with CPUOffloadPolicy (parameters, gradients and optimizer state on
  the CPU; CUDA only).

    python benchmarks/largest_model.py --device cuda --precision bf16
    torchrun --nproc-per-node 8 benchmarks/largest_model.py --device cuda --placements sharded
    python benchmarks/largest_model.py --device cpu --models vit_tiny_patch16_224 --image-size 32   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpspeed import PrivacyEngine
from dpspeed.apps import models
from dpspeed.bench.memory import peak_bytes
from dpspeed.bench.search import free_memory, is_out_of_memory
from dpspeed.bench.setups import autocast, tensor_cores
from dpspeed.bench.study import environment
from dpspeed.profiling import sync

SIZES = ["vit_base_patch16_224", "vit_large_patch16_224", "vit_huge_patch14_224", "vit_giant_patch14_224",
         "vit_gigantic_patch14_224", "vit_3b_patch14_224", "vit_5b_patch14_224"]
# ViTs larger than timm's largest (gigantic, 1.8B), in the same family: width, depth, heads
LARGER = {"vit_3b_patch14_224": (2560, 32, 32), "vit_5b_patch14_224": (3072, 44, 32)}


def build(name: str, image_size: int, classes: int) -> nn.Module:
    if name not in LARGER:
        return models.build(f"timm:{name}", 3, image_size, classes)
    from timm.models.vision_transformer import VisionTransformer

    width, depth, heads = LARGER[name]
    return VisionTransformer(img_size=image_size, patch_size=14, num_classes=classes, embed_dim=width, depth=depth,
                             num_heads=heads, mlp_ratio=4.0)


def _process_group(device: torch.device) -> None:
    """torchrun's group, or a group of this process alone."""
    if dist.is_initialized():
        return
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    else:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29613")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    if device.type == "cuda":
        torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())


def _place(model: nn.Module, placement: str, device: torch.device) -> nn.Module:
    if placement == "plain":
        return model.to(device)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    _process_group(device)
    if placement == "sharded+offload" and device.type != "cuda":
        raise ValueError("sharded+offload needs --device cuda")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = CPUOffloadPolicy() if placement == "sharded+offload" else OffloadPolicy()
    if placement == "sharded":
        model = model.to(device)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, offload_policy=policy)
    return fully_shard(model, mesh=mesh, offload_policy=policy)


def train_once(name: str, placement: str, args) -> dict:
    """One logical batch of two physical batches; its peak memory and seconds."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    with torch.device(device if placement == "plain" else "cpu"):  # initialised where it will live
        model = build(name, args.image_size, args.classes)
    model = _place(model, placement, device)
    params = sum(p.numel() for p in model.parameters())
    x = torch.randn(2 * args.batch, 3, args.image_size, args.image_size)
    y = torch.randint(0, args.classes, (2 * args.batch,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, optimizer, loader = PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=DataLoader(TensorDataset(x, y), batch_size=2 * args.batch),
        noise_multiplier=1.0, max_grad_norm=1.0, clipping_mode="auto", clipping_style=args.style,
        max_physical_batch_size=args.batch, fixed_physical_batch=True, seed=0,
    )

    def logical_step() -> None:
        steps = optimizer.logical_steps
        with tensor_cores(args.precision):
            for xb, yb in loader:
                with autocast(args.precision, device):
                    loss = nn.functional.cross_entropy(model(xb.to(device)), yb.to(device))
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                if optimizer.logical_steps > steps:
                    return

    seconds = []

    def timed_logical_step() -> None:  # timed inside the peak measurement, without its cache flush
        sync(device)
        start = time.perf_counter()
        logical_step()
        sync(device)
        seconds.append(time.perf_counter() - start)

    logical_step()  # warm-up: the trace, the optimizer state
    peak = peak_bytes(timed_logical_step, device)
    return {"model": name, "placement": placement, "parameters": params, "batch": args.batch,
            "peak_bytes": peak, "seconds_per_logical_step": seconds[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=SIZES, help="timm names, smallest first")
    parser.add_argument("--placements", nargs="+", default=["plain", "sharded", "sharded+offload"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "tf32", "bf16"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--batch", type=int, default=32, help="physical batch size")
    parser.add_argument("--style", default="layer-wise")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/largest_model.json"))
    args = parser.parse_args()
    rows = []

    def save() -> None:  # after every model, so that a run stopped at its time limit keeps what it measured
        if not dist.is_initialized() or dist.get_rank() == 0:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"environment": environment(torch.device(args.device)),
                                            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                                            "precision": args.precision, "rows": rows}, indent=1))

    for placement in args.placements:
        for name in args.models:
            try:
                row = train_once(name, placement, args)
            except Exception as err:
                if not is_out_of_memory(err):
                    raise
                rows.append({"model": name, "placement": placement, "out_of_memory": True})
                print(f"{placement:16s} {name:28s} out of memory", flush=True)
                free_memory()
                save()
                break
            rows.append(row)
            save()
            print(f"{placement:16s} {name:28s} {row['parameters'] / 1e6:8.1f} M params  peak "
                  f"{row['peak_bytes'] / 2**30:6.2f} GiB  {row['seconds_per_logical_step']:.2f} s", flush=True)
            free_memory()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""The fused ghost-norm kernel against the torch path (Gram matrices), on ViT-base's Linear layers
at batch B, each alone and a block's four in one call (one launch): time per call and peak
memory above the operands, side by side in one run.

    python -m benchmarks.ghost_norm_kernel --device cuda --dtype bf16 --out benchmarks/results/h100/ghost_norm_kernel.json

Needs a GPU (on the CPU, Triton's interpreter is a correctness check, not a timing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from dpspeed.bench.study import environment
from dpspeed.kernels import ghost_norm
from dpspeed.layers import _gram
from dpspeed.profiling import sync

#: ViT-base/16 at 224²: T = 197 positions; (d, p) of qkv, proj, fc1, fc2
LAYERS = {"qkv": (768, 2304), "proj": (768, 768), "fc1": (768, 3072), "fc2": (3072, 768)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _norms(layers: list[tuple[torch.Tensor, torch.Tensor]], kernel: bool) -> torch.Tensor:
    """The raised squared norms of `layers` taken together, as training takes them: one fused launch
    (`kernel`) or the torch path's Gram products."""
    os.environ[ghost_norm.ENABLE_VARIABLE] = "1" if kernel else "0"
    return torch.stack([sq for sq, *_ in _gram.ghost_sq_norms_and_spreads([(a, g, None) for a, g in layers])])


def measure(fn, layers: list, device: torch.device, repeats: int) -> dict:
    fn(layers)  # compile, warm up
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn(layers)
        sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None
    return {"ms": 1e3 * statistics.median(times), "extra_bytes": peak, "result": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--positions", type=int, default=197)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    operands = {name: (torch.randn(args.batch, args.positions, d, device=device).to(dtype),
                       torch.randn(args.batch, args.positions, p, device=device).to(dtype))
                for name, (d, p) in LAYERS.items()}
    rows = []
    for name, layers in [*((n, [o]) for n, o in operands.items()), ("block (4 layers)", list(operands.values()))]:
        torch_run = measure(lambda ls: _norms(ls, kernel=False), layers, device, args.repeats)
        kernel_run = measure(lambda ls: _norms(ls, kernel=True), layers, device, args.repeats)
        agree = float(((kernel_run["result"] - torch_run["result"]).abs() / torch_run["result"]).max())
        rows.append({"layers": name, "torch_ms": torch_run["ms"], "kernel_ms": kernel_run["ms"],
                     "torch_extra_bytes": torch_run["extra_bytes"], "kernel_extra_bytes": kernel_run["extra_bytes"],
                     "max_relative_difference": agree})
        print(f"{name:16s}: torch {torch_run['ms']:8.3f} ms, kernel {kernel_run['ms']:8.3f} ms, "
              f"max rel. diff {agree:.1e}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"environment": environment(device), "args": {**vars(args), "out": str(args.out)},
                                        "results": rows}, indent=1))


if __name__ == "__main__":
    main()

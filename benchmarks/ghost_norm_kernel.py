"""The fused ghost-norm kernel against the torch path (Gram matrices), on ViT-base's Linear layers
at batch B: time per call and peak memory above the operands, side by side in one run.

    python -m benchmarks.ghost_norm_kernel --device cuda --dtype bf16 --out benchmarks/results/h100/ghost_norm_kernel.json

Needs a GPU (on the CPU, Triton's interpreter is a correctness check, not a timing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from dpspeed.bench.study import environment
from dpspeed.kernels import ghost_norm
from dpspeed.layers import _gram
from dpspeed.layers.precision import gram_error
from dpspeed.profiling import sync

#: ViT-base/16 at 224²: T = 197 positions; (d, p) of qkv, proj, fc1, fc2
LAYERS = {"qkv": (768, 2304), "proj": (768, 768), "fc1": (768, 3072), "fc2": (3072, 768)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _torch_path(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    gram_a, gram_g = _gram.gram(a), _gram.gram(g)
    inner = torch.linalg.vecdot(gram_a.flatten(1), gram_g.flatten(1)).clamp(min=0)
    m = (torch.diagonal(gram_a, dim1=1, dim2=2) * torch.diagonal(gram_g, dim1=1, dim2=2)).sqrt().sum(1)
    return inner + gram_error(torch.float32) * m.square()


def _kernel_path(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    inner, m = ghost_norm.ghost_sq_norm_and_spread(a, g)
    return inner.clamp(min=0) + gram_error(torch.float32) * m.square()


def measure(fn, a: torch.Tensor, g: torch.Tensor, device: torch.device, repeats: int) -> dict:
    fn(a, g)  # compile, warm up
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn(a, g)
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
    rows = []
    for name, (d, p) in LAYERS.items():
        a = torch.randn(args.batch, args.positions, d, device=device).to(dtype)
        g = torch.randn(args.batch, args.positions, p, device=device).to(dtype)
        torch_run = measure(_torch_path, a, g, device, args.repeats)
        kernel_run = measure(_kernel_path, a, g, device, args.repeats)
        agree = float(((kernel_run["result"] - torch_run["result"]).abs() / torch_run["result"]).max())
        rows.append({"layer": name, "d": d, "p": p, "torch_ms": torch_run["ms"], "kernel_ms": kernel_run["ms"],
                     "torch_extra_bytes": torch_run["extra_bytes"], "kernel_extra_bytes": kernel_run["extra_bytes"],
                     "max_relative_difference": agree})
        print(f"{name:5s} d={d:4d} p={p:4d}: torch {torch_run['ms']:8.3f} ms, kernel {kernel_run['ms']:8.3f} ms, "
              f"max rel. diff {agree:.1e}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"environment": environment(device), "args": {**vars(args), "out": str(args.out)},
                                        "results": rows}, indent=1))


if __name__ == "__main__":
    main()

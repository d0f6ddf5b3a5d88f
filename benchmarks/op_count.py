"""Operations per training step: aten operators that launch a kernel (on a GPU each is a launch, a
few microseconds of host time at least), counted on the CPU with a TorchDispatchMode, per
category and per section of the step, for non-private training and dpspeed's modes side by side.

    python -m benchmarks.op_count --precision bf16 --out benchmarks/results/op_count_cpu_bf16.json

The model is ViT-base's 12 blocks at width 32 (as benchmarks/host_overhead.py): the count of
per-layer operations is ViT-base's, while the noise, drawn in chunks of a fixed number of
coordinates (many more on the CPU than on a GPU), stays a few dozen operations as on a GPU.
The issue's figure: a bk step issues at most 1.5x the operations of a non-private one.
Counted on the CPU, the ghost norms' Gram operands are not padded to 8 positions as on a GPU
(layers/_gram.py): a GPU's bk step issues about one more operation per Gram matrix (~100 on
ViT-base) than this count.

The noise is drawn from one stream, as on a GPU: a CPU's second stream runs in a thread of its
own, whose operations a dispatch mode (entered on one thread) does not see.

With the fused ghost-norm kernel, as a GPU step takes it, Triton's interpreter standing in for
the GPU (each launch counts as one operation, the interpreter's own copies none):

    TRITON_INTERPRET=1 DPSPEED_FUSED_GHOST_NORM=1 python -m benchmarks.op_count --fused-kernel ...
"""

from __future__ import annotations

import argparse
import collections
import os
from pathlib import Path

import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dpspeed.bench.setups import NON_PRIVATE, Setup
from dpspeed.bench.study import write_result
from dpspeed import noise
from dpspeed.kernels import ghost_norm as fused
from dpspeed.profiling import SectionTimer

MATMUL = {"mm", "bmm", "addmm", "baddbmm", "convolution", "convolution_backward", "_convolution", "linear", "matmul",
          "mkldnn_convolution", "_scaled_dot_product_flash_attention_for_cpu",
          "_scaled_dot_product_flash_attention_for_cpu_backward"}
COPY = {"clone", "copy_", "constant_pad_nd", "cat", "stack", "index", "index_select", "repeat", "_unsafe_index",
        "where", "masked_fill", "index_put_", "scatter_add", "gather", "contiguous"}
NO_KERNEL = {"detach", "lift_fresh", "empty", "empty_like", "empty_strided", "sym_size", "sym_stride", "sym_numel",
             "set_", "resize_", "_has_compatible_shallow_copy_type", "alias", "_unsafe_view", "view", "_reshape_alias",
             "result_type", "promote_types"}
SYNC = {"_local_scalar_dense", "is_nonzero", "item", "equal"}


def category(name: str, func, args) -> str | None:
    """The op's kind; None for an op that launches no kernel (a view, metadata)."""
    if name in SYNC:
        return "sync"
    returns = func._schema.returns
    if name in NO_KERNEL or (returns and any(r.alias_info is not None and not r.alias_info.is_write for r in returns)):
        return None
    if name in ("_to_copy", "copy_") and len(args) > 0 and isinstance(args[0], torch.Tensor):
        source = args[1] if name == "copy_" and len(args) > 1 and isinstance(args[1], torch.Tensor) else args[0]
        target_dtype = args[0].dtype if name == "copy_" else None
        return "dtype conversion" if name == "_to_copy" or source.dtype != target_dtype else "copy"
    if name in MATMUL:
        return "matmul"
    return "copy" if name in COPY else "elementwise/reduction"


class OpCounter(TorchDispatchMode):
    """Counts kernel-like aten ops by kind and by name."""

    def __init__(self):
        super().__init__()
        self.kernels = 0
        self.by_category: collections.Counter = collections.Counter()
        self.by_name: collections.Counter = collections.Counter()
        self.paused = False

    def count_launch(self, name: str) -> None:
        self.kernels += 1
        self.by_category["fused kernel"] += 1
        self.by_name[name] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        kind = None if self.paused else category(name, func, args)
        if kind is not None:
            self.kernels += 1
            self.by_category[kind] += 1
            self.by_name[name] += 1
        return func(*args, **(kwargs or {}))


class _CountedLaunches:
    """The fused kernel with each launch counted as one operation and the interpreter's copies not."""

    def __init__(self, kernel, counter: OpCounter):
        self.kernel, self.counter = kernel, counter

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.counter.count_launch("ghost_norm_kernel")
            self.counter.paused = True
            try:
                return self.kernel[grid](*args, **kwargs)
            finally:
                self.counter.paused = False
        return launch


def count_step(setup: Setup, x: torch.Tensor, y: torch.Tensor, precision: str) -> dict:
    counter = OpCounter()
    timer = SectionTimer("cpu", clock=lambda: float(counter.kernels))  # exclusive op counts per section
    kernel = fused._ghost_norm_kernel if fused.triton is not None else None
    if kernel is not None:
        fused._ghost_norm_kernel = _CountedLaunches(kernel, counter)
    try:
        with timer, counter:
            setup.step(x, y, precision, last=True)
    finally:
        if kernel is not None:
            fused._ghost_norm_kernel = kernel
    return {"kernels": counter.kernels, "by_category": dict(counter.by_category.most_common()),
            "by_section": {k: int(v) for k, v in sorted(timer.seconds.items(), key=lambda kv: -kv[1])},
            "top_ops": dict(counter.by_name.most_common(25))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "tf32", "bf16"])
    parser.add_argument("--modes", nargs="+", default=["bk", "auto"])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--fused-kernel", action="store_true",
                        help="count the fused ghost-norm kernel's path (TRITON_INTERPRET=1 DPSPEED_FUSED_GHOST_NORM=1)")
    args = parser.parse_args()
    interpreted = {os.environ.get("TRITON_INTERPRET"), os.environ.get(fused.ENABLE_VARIABLE)} == {"1"}
    if args.fused_kernel != interpreted:
        parser.error("--fused-kernel goes with TRITON_INTERPRET=1 DPSPEED_FUSED_GHOST_NORM=1 in the environment, "
                     "and they with it")
    noise.CPU_STREAMS = 1  # one stream, as on a GPU: every draw on this thread, where it is counted
    torch.manual_seed(0)
    base = timm.create_model(args.model, img_size=args.image_size, num_classes=10, embed_dim=args.width,
                             num_heads=max(1, args.width // 16))
    x, y = torch.randn(args.batch, 3, args.image_size, args.image_size), torch.randint(0, 10, (args.batch,))
    rows = {}
    for mode in [NON_PRIVATE, *args.modes]:
        setup = Setup(base, mode)
        for _ in range(2):
            setup.step(x, y, args.precision, last=True)
        rows[mode] = count_step(setup, x, y, args.precision)
        setup.close()
        ratio = rows[mode]["kernels"] / rows[NON_PRIVATE]["kernels"]
        print(f"{mode:12s} {rows[mode]['kernels']:6d} ops ({ratio:.2f}x non-private)  {rows[mode]['by_category']}",
              flush=True)
    if args.out:
        write_result(args.out, torch.device("cpu"), args, rows)


if __name__ == "__main__":
    main()

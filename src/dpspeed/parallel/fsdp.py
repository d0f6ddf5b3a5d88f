"""Parameters sharded by `fully_shard` (FSDP2): the clipped sums reduced to their shards.

Per-example norms and clipped sums come from each layer's inputs and output gradients, so no
full weight is needed after the forward pass. As soon as the clipped sum of a set of layers is
formed, it is reduce-scattered over the mesh: each rank keeps the rows of its shard only (dim 0,
`torch.chunk` layout, as FSDP2 shards), and the full sum is dropped. The noise is drawn by each
rank for its own shard from a generator seeded per rank, so every coordinate gets its noise once.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from ..capture.records import Recording
from ..layers.precision import acc_dtype
from ..profiling import section

Sums = dict[str, torch.Tensor]


def is_sharded(p: torch.Tensor) -> bool:
    return isinstance(p, DTensor)


def sharded_params(params: dict[str, nn.Parameter]) -> dict[str, DTensor]:
    """The parameters that are DTensors, checked to be sharded the way dpspeed supports: dim 0 of
    one 1-D mesh (fully_shard's default), the same mesh for all of them."""
    sharded = {n: p for n, p in params.items() if is_sharded(p)}
    for name, p in sharded.items():
        if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
            raise ValueError(
                f"parameter {name!r} is placed as {tuple(p.placements)} on a {p.device_mesh.ndim}-d mesh; dpspeed "
                "supports fully_shard on a 1-d mesh (Shard(0)) only, not tensor parallelism or HSDP"
            )
    first = next(iter(sharded.values()), None)
    if any(p.device_mesh != first.device_mesh for p in sharded.values()):
        raise ValueError("the sharded parameters lie on different device meshes; use one mesh for fully_shard")
    return sharded


def mesh_group(sharded: dict[str, DTensor]) -> dist.ProcessGroup:
    return next(iter(sharded.values())).device_mesh.get_group()


def _rows(param: DTensor) -> tuple[int, int]:
    """The rows of dim 0 per shard (padded) and this rank's rows, in torch.chunk's layout."""
    world = param.device_mesh.size()
    rank = param.device_mesh.get_local_rank()
    per_shard = -(-param.shape[0] // world)
    return per_shard, max(0, min(per_shard, param.shape[0] - rank * per_shard))


def reduce_to_shard(full: torch.Tensor, param: DTensor) -> torch.Tensor:
    """`full` summed over the ranks of the mesh, and only this rank's shard of it kept."""
    world = param.device_mesh.size()
    per_shard, mine = _rows(param)
    if full.shape[0] == per_shard * world:
        padded = full.contiguous()
    else:
        padded = full.new_zeros(per_shard * world, *full.shape[1:])
        padded[: full.shape[0]] = full
    shard = full.new_empty(per_shard, *full.shape[1:])
    try:
        dist.reduce_scatter_tensor(shard, padded, group=param.device_mesh.get_group())
    except RuntimeError as err:
        raise RuntimeError(
            f"the reduce-scatter of the clipped gradients failed: another rank died or timed out ({err})"
        ) from err
    return shard[:mine]


def compute_device(param: DTensor) -> torch.device:
    """Where the mesh computes and communicates (the shard itself may be offloaded to the CPU)."""
    kind = param.device_mesh.device_type
    return torch.device(kind, torch.cuda.current_device()) if kind == "cuda" else torch.device(kind)


def zeros_for_shard(param: DTensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(param.to_local().shape, dtype=dtype, device=compute_device(param))


def as_sharded_grad(local: torch.Tensor, param: DTensor) -> DTensor:
    """This rank's shard of a gradient, as the DTensor `.grad` of a sharded parameter (on the
    shard's device)."""
    # laid out as the parameter, its shard where the parameter's is (DTensor.from_local would move an
    # offloaded shard to the mesh's device)
    grad = torch.empty_like(param, requires_grad=False)
    grad.to_local().copy_(local)
    return grad


def clip_with_shards(recorded: Recording, shards: dict[str, DTensor], clip: Callable[[Callable[[Sums], None]], object],
                     add: Callable[[str, torch.Tensor], None]):
    """Run `clip(on_sums)` on one recorded pass, reduce-scattering each layer's sums of sharded
    parameters as soon as they are formed and handing only this rank's shard to `add` (the other
    sums go to `add` whole). Every rank goes through the pass's layers in the same order, with
    zeros where it has no examples, so the collectives match. Returns what `clip` returns."""
    order = dict.fromkeys(n for b, calls in recorded.items() if any(c.has_grads for c in calls)
                          for n in b.params.values() if n in shards)
    pending = iter(order)

    def reduce(name: str, full: torch.Tensor) -> None:
        with section("reduce-scatter"):
            add(name, reduce_to_shard(full, shards[name]))

    def on_sums(part: Sums) -> None:
        for name, s in part.items():
            if name not in shards:
                add(name, s)
                continue
            if next(pending, None) != name:
                raise RuntimeError(f"the clipped sum of {name!r} came out of order; ranks would not match")
            reduce(name, s)
        part.clear()  # the full sums go as soon as they are scattered

    clipped = clip(on_sums)
    for name in pending:  # no examples here: zeros, for the other ranks' collectives
        param = shards[name]
        reduce(name, torch.zeros(param.shape, dtype=acc_dtype(param.dtype), device=compute_device(param)))
    return clipped

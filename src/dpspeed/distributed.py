"""Data-parallel DP across processes (torchrun): one all-reduce of the clipped sums per logical batch.

Each rank Poisson-samples its own shard of the data set at the common rate q (the union is a
Poisson sample of the whole data set), clips and accumulates its examples with no communication,
and at the end of the logical batch the summed clipped gradients of all ranks are added up in one
all-reduce over a single flat buffer. The Gaussian noise is drawn from a generator seeded alike on
every rank and added after the all-reduce: it enters the global sum once, and every rank applies
the same update.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def active(group: dist.ProcessGroup | None = None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank_and_world(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """This process's rank in `group` and the group's size; (0, 1) when not distributed."""
    if not active(group):
        return 0, 1
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the process_group given to make_private")
    return rank, dist.get_world_size(group)


def _source(group: dist.ProcessGroup | None) -> int:
    """The global rank of the group's first member."""
    return 0 if group is None else dist.get_global_rank(group, 0)


def check_not_wrapped(module: nn.Module) -> None:
    if isinstance(module, nn.parallel.DistributedDataParallel):
        raise ValueError(
            "do not wrap the model in DistributedDataParallel: dpspeed all-reduces the clipped gradients "
            "itself, once per logical batch; pass the bare model"
        )


def broadcast_state(module: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Every rank starts from rank 0's parameters and buffers (sharded ones are each rank's own)."""
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if not isinstance(tensor, DTensor):
                dist.broadcast(tensor.data, src=_source(group), group=group)


def most(value: int, group: dist.ProcessGroup | None, device: torch.device) -> int:
    """The largest of `value` over the ranks (`device`: where the group's backend communicates)."""
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


def shared_seed(seed: int | None, group: dist.ProcessGroup | None, device: torch.device) -> int:
    """A seed equal on every rank (rank 0's draw when none is given); `device`: where the group's
    backend communicates (NCCL takes CUDA tensors only)."""
    value = torch.tensor([seed if seed is not None else int(torch.randint(2**62, ()).item())], dtype=torch.int64,
                         device=device)
    dist.broadcast(value, src=_source(group), group=group)
    return int(value.item())


def all_reduce_sums(sums: dict[str, torch.Tensor], params: dict[str, torch.Tensor],
                    group: dist.ProcessGroup | None = None) -> dict[str, torch.Tensor]:
    """The clipped sums of all ranks added up, in one all-reduce over one flat buffer (zeros for
    parameters this rank has no sum for, so every rank sends the same layout)."""
    names = list(params)
    parts = [sums[n] if n in sums else torch.zeros_like(params[n], dtype=torch.promote_types(params[n].dtype, torch.float32)) for n in names]
    dtype = parts[0].dtype
    flat = torch.cat([p.to(dtype).reshape(-1) for p in parts])
    try:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    except RuntimeError as err:
        raise RuntimeError(
            "the all-reduce of the clipped gradients failed: another rank died or timed out "
            f"({type(err).__name__}: {err})"
        ) from err
    out, offset = {}, 0
    for name, part in zip(names, parts):
        out[name] = flat[offset : offset + part.numel()].view_as(part)
        offset += part.numel()
    return out

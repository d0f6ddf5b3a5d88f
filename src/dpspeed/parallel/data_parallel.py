"""Data-parallel DP across processes (torchrun): one all-reduce of the clipped sums per logical batch.

Each rank Poisson-samples its own shard of the data set at the common rate q (the union is a
Poisson sample of the whole data set), clips and accumulates its examples with no communication,
and at the end of the logical batch the summed clipped gradients of all ranks are added up once,
in buckets: a bucket's all-reduce starts during the last physical batch's backward pass as soon
as its sums are final, the rest at the step. The Gaussian noise is drawn from a generator seeded
alike on every rank and added after the all-reduce: it enters the global sum once, and every rank
applies the same update.
"""

from __future__ import annotations

import secrets

import torch
import torch.distributed as dist
from torch import nn

from ..layers.precision import acc_dtype
from ..noise import draw_seed


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


def gathered(values: list[int], group: dist.ProcessGroup | None, device: torch.device) -> list[list[int]]:
    """Every rank's `values`, in rank order."""
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    return [t.tolist() for t in every]


def shared_bytes(count: int, group: dist.ProcessGroup | None, device: torch.device) -> bytes:
    """`count` bytes of rank 0's operating-system entropy, on every rank."""
    value = torch.tensor(list(secrets.token_bytes(count)), dtype=torch.uint8, device=device)
    dist.broadcast(value, src=_source(group), group=group)
    return bytes(value.cpu().tolist())


def shared_seed(seed: int | None, group: dist.ProcessGroup | None, device: torch.device) -> int:
    """A seed equal on every rank (rank 0's draw when none is given); `device`: where the group's
    backend communicates (NCCL takes CUDA tensors only)."""
    value = torch.tensor([seed if seed is not None else draw_seed()], dtype=torch.int64, device=device)
    dist.broadcast(value, src=_source(group), group=group)
    return int(value.item())


def _failed(err: RuntimeError) -> RuntimeError:
    return RuntimeError(
        "the all-reduce of the clipped gradients failed: another rank died or timed out "
        f"({type(err).__name__}: {err})"
    )


BUCKET_BYTES = 25 * 2**20  # of float32 sums per bucket (DistributedDataParallel's default)


class BucketedAllReduce:
    """The clipped sums of all ranks added up in buckets of at most `bucket_bytes`, in one fixed
    order (the parameters' reverse order, as DistributedDataParallel's buckets): a bucket's
    asynchronous all-reduce starts as soon as all its sums are final (`final`), the others at the
    step (`finish`). Every rank issues the same collectives in the same order, also a rank whose
    last physical batch is empty; a parameter without a sum on this rank sends zeros."""

    def __init__(self, params: dict[str, torch.Tensor], group: dist.ProcessGroup | None = None,
                 bucket_bytes: int | None = None):
        self.params, self.group = params, group
        self.buckets: list[list[str]] = []
        bucket_bytes = bucket_bytes or BUCKET_BYTES
        size = bucket_bytes
        for name in reversed(list(params)):
            nbytes = params[name].numel() * 4
            if size + nbytes > bucket_bytes:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(name)
            size += nbytes
        self.reset()

    def reset(self) -> None:
        """Forget the buckets of the current logical batch."""
        self._final: set[str] = set()
        self._next = 0
        self._started: list[tuple[list[str], list[torch.Tensor], torch.Tensor, object]] = []  # ..., Work
        self.started_names: set[str] = set()

    def _zeros(self, name: str) -> torch.Tensor:
        """The sum of a parameter this rank has no examples for, in the sums' dtype."""
        p = self.params[name]
        return torch.zeros_like(p, dtype=acc_dtype(p.dtype))

    def _start(self, sums: dict[str, torch.Tensor]) -> None:
        names = self.buckets[self._next]
        self._next += 1
        parts = [sums[n] if n in sums else self._zeros(n) for n in names]
        flat = torch.cat([part.reshape(-1).to(parts[0].dtype) for part in parts])
        try:
            work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        except RuntimeError as err:
            raise _failed(err) from err
        self._started.append((names, parts, flat, work))
        self.started_names.update(names)

    def final(self, names: set[str], sums: dict[str, torch.Tensor]) -> None:
        """`names` will get nothing more this logical batch: start every bucket whose turn has come
        and whose sums are all final."""
        self._final.update(names)
        while self._next < len(self.buckets) and all(n in self._final for n in self.buckets[self._next]):
            self._start(sums)

    def finish(self, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Start the remaining buckets, wait for all, and return the added-up sums."""
        while self._next < len(self.buckets):
            self._start(sums)
        out = {}
        for names, parts, flat, work in self._started:
            try:
                work.wait()
            except RuntimeError as err:
                raise _failed(err) from err
            offset = 0
            for name, part in zip(names, parts):
                out[name] = flat[offset : offset + part.numel()].view_as(part)
                offset += part.numel()
        self.reset()
        return out

"""Which processes train together: this rank, the group's size, the device the group communicates
on, and the parameters sharded by fully_shard. One process without sharding is the trivial case."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from ..noise import draw_seed
from . import data_parallel, fsdp


@dataclass(eq=False)
class Topology:
    group: dist.ProcessGroup | None = None  # None: every process (or not distributed)
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives run
    shards: dict[str, DTensor] = field(default_factory=dict)  # parameters sharded by fully_shard

    @classmethod
    def of(cls, params: dict[str, nn.Parameter], process_group: dist.ProcessGroup | None) -> "Topology":
        """The topology of a model's trainable parameters: the mesh's group for a sharded model
        (`process_group`, if given, must be the same processes), else `process_group`."""
        shards = fsdp.sharded_params(params)
        if shards:
            group = fsdp.mesh_group(shards)
            if process_group is not None and dist.get_process_group_ranks(process_group) != dist.get_process_group_ranks(group):
                raise ValueError("process_group differs from the device mesh the model is sharded on; leave it out")
            process_group = group
        rank, world = data_parallel.rank_and_world(process_group)
        device = fsdp.compute_device(next(iter(shards.values()))) if shards else next(iter(params.values())).device
        return cls(process_group, rank, world, device, shards)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def physical_batch_counter(self) -> Callable[[int], int] | None:
        """For a sharded model over several processes, the function n -> the largest n over the
        ranks: every rank runs as many physical batches, since each one communicates."""
        if not (self.shards and self.distributed):
            return None
        return lambda n: data_parallel.most(n, self.group, self.device)

    def shared_seed(self, seed: int | None) -> int:
        """`seed`, or one drawn from the operating system's entropy when none is given; across
        processes rank 0's, on every rank."""
        if self.distributed:
            return data_parallel.shared_seed(seed, self.group, self.device)
        return seed if seed is not None else draw_seed()

    def check_same_data(self, examples: torch.Tensor, batch_size: int) -> None:
        """Every rank samples the same examples (`examples`: the sorted indices Poisson sampling
        ranges over) at the same rate: each takes its share of them, so ranks holding different
        data sets, subsets or batch sizes would draw with different rates from different
        populations (an example in two ranks' shares twice as often), and epsilon would describe
        none of them."""
        if not self.distributed:
            return
        digest = int(hashlib.sha256(examples.cpu().numpy().tobytes()).hexdigest()[:12], 16)
        ranks = data_parallel.gathered([len(examples), batch_size, digest], self.group, self.device)
        if any(r != ranks[0] for r in ranks):
            seen = ", ".join(f"rank {i}: {n} examples, batch_size {b}" for i, (n, b, _) in enumerate(ranks))
            raise ValueError(
                f"the ranks' data loaders differ ({seen}, or the same number of different examples): every rank "
                "must load the whole data set (or the same subset of it) with the same batch_size (the expected "
                "logical batch size over all ranks); dpspeed gives each rank its share of the examples itself. "
                "Data split across ranks beforehand: give every rank a data set over all of it (each rank reads "
                "only the examples of its share)"
            )

    def shared_key(self) -> bytes:
        """32 bytes of entropy, rank 0's on every rank (one process: its own)."""
        if self.distributed:
            return data_parallel.shared_bytes(32, self.group, self.device)
        return secrets.token_bytes(32)

    def broadcast_state(self, module: nn.Module) -> None:
        """Every rank starts from rank 0's parameters and buffers."""
        if self.distributed:
            data_parallel.broadcast_state(module, self.group)

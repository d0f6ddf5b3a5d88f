"""The Gaussian noise of DP-SGD, and the seed policy of every random draw (noise and sampling).

Seeds: a seed the user passes is used as given; otherwise one is drawn by `draw_seed`. Across
processes, rank 0's seed is broadcast (`parallel/data_parallel.shared_seed`). From that seed:
- each rank's Poisson sampler: seed + rank (`sampling_seed`), so the ranks draw independently;
- the noise of parameters every rank holds whole: seed + 7919, alike on every rank, so the noise
  enters the global sum once (in one process without a user generator: torch's global one);
- the noise of a rank's shard of a fully_shard model: differently on every rank, so each
  coordinate gets its noise once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


def draw_seed() -> int:
    """A seed when the user gives none, drawn from torch's global random number generator."""
    return int(torch.randint(2**62, ()).item())


def sampling_seed(seed: int | None, rank: int) -> int:
    """The seed of a rank's Poisson sampler."""
    return (seed if seed is not None else draw_seed()) + rank


@dataclass(eq=False)
class NoiseSource:
    """Where the noise of each parameter comes from: `replicated` for parameters every rank holds
    whole, `sharded` for the shards of a fully_shard model (None: torch's global generator)."""

    replicated: torch.Generator | None = None
    sharded: torch.Generator | None = None

    @classmethod
    def create(cls, generator: torch.Generator | None, seed: int | None, world: int, sharded: bool,
               device: torch.device) -> "NoiseSource":
        """The user's `generator`, if any, for replicated parameters; across processes (`world` > 1,
        `seed` then shared by all ranks) generators seeded from `seed`."""
        if world == 1:
            return cls(generator, None)
        shard_generator = None
        if sharded:
            rank = dist.get_rank()
            shard_generator = torch.Generator(device=device)
            start = generator.initial_seed() if generator is not None else seed
            shard_generator.manual_seed((start + 104729 * (rank + 1)) % 2**63)
        if generator is None:  # the same noise on every rank: it enters the global sum once
            generator = torch.Generator(device=device)
            generator.manual_seed(seed + 7919)
        return cls(generator, shard_generator)

    def add_to(self, total: torch.Tensor, std: float, sharded: bool = False) -> None:
        """total += N(0, std²) per coordinate, in place."""
        generator = self.sharded if sharded else self.replicated
        noise = torch.randn(total.shape, generator=generator, device=total.device, dtype=total.dtype)
        total.add_(noise, alpha=std)

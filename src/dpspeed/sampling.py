"""Poisson sampling of logical batches and their split into physical batches (virtual batching)."""

from __future__ import annotations

import secrets
from collections import deque
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import (BatchSampler, DataLoader, Dataset, IterableDataset, RandomSampler, Sampler,
                              SequentialSampler, WeightedRandomSampler)
from torch.utils.data.distributed import DistributedSampler
from torch.utils.data._utils.collate import default_collate
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .noise import SecureStream, sampling_seed, seeded_generator


def population(loader: DataLoader) -> torch.Tensor:
    """The indices of the loader's data set that its sampler ranges over, each once and sorted:
    Poisson sampling draws from exactly these, and N is their number. Never an index the user's sampler
    excludes; a sampler whose index set cannot be read, or whose examples are not equally likely,
    is refused with what to do instead."""
    size = len(loader.dataset)
    sampler, name = loader.sampler, type(loader.sampler).__name__
    if type(loader.batch_sampler) is not BatchSampler:
        raise ValueError(f"dpspeed cannot read which examples the batch sampler {type(loader.batch_sampler).__name__} "
                         "draws: give the loader a batch_size (and a sampler over the examples to train on, or a "
                         "torch.utils.data.Subset of the data set); dpspeed forms the batches by Poisson sampling")
    if isinstance(sampler, (WeightedRandomSampler, DistributedSampler)) or (
            isinstance(sampler, RandomSampler) and (sampler.replacement or sampler.num_samples != size)):
        why = ("draws examples with unequal or repeated chances" if not isinstance(sampler, DistributedSampler) else
               "splits the data set across ranks, which dpspeed does itself")
        raise ValueError(f"the loader's {name} {why}; Poisson sampling gives every example the same rate. Give the "
                         "loader the plain data set (or a Subset of it, or a SubsetRandomSampler over the indices "
                         "to train on)")
    if type(sampler) in (RandomSampler, SequentialSampler):
        return torch.arange(size)
    indices = getattr(sampler, "indices", None)
    if indices is None:
        raise ValueError(f"dpspeed cannot read which examples the loader's {name} ranges over: give it an `indices` "
                         "attribute, or use a SubsetRandomSampler over those indices, or a "
                         "torch.utils.data.Subset of the data set")
    chosen = torch.as_tensor(list(indices), dtype=torch.long)
    if chosen.numel() and (int(chosen.min()) < 0 or int(chosen.max()) >= size):
        raise ValueError(f"the loader's {name} has indices outside the data set of {size} examples")
    distinct = chosen.unique()  # sorted: every rank, whatever its order, takes the same share
    if distinct.numel() != chosen.numel():
        raise ValueError(f"the loader's {name} repeats indices: an example listed twice would be sampled at twice "
                         "the rate the accounting assumes; list each once")
    return distinct


def population_size(loader: DataLoader, poisson_sampling: bool = True) -> int:
    """N: the number of examples Poisson sampling ranges over (the whole data set's for batches
    that are not Poisson-sampled)."""
    return len(population(loader)) if poisson_sampling else len(loader.dataset)


class PoissonBatchSampler(Sampler[list[int]]):
    """Each logical batch takes every index independently with probability `sample_rate`.

    An epoch has `steps` batches (make_private passes the user's loader's length, ceil(N /
    batch_size); round(1 / sample_rate) without it); some may be empty. The RNG state is part of
    `state_dict` of a reproducible sampler (given a `seed`), so a run resumed from it draws the batches it would have
    drawn; without one the state is empty, so that no checkpoint (Lightning saves every loader that
    has a state_dict) lets anyone regenerate which examples were drawn. Across processes, each
    rank samples its own shard (the indices at positions rank, rank + world, ... of the sorted
    population) at the same rate, so the union of the ranks' batches is a Poisson sample of the
    whole population.
    """

    def __init__(self, indices: int | torch.Tensor, sample_rate: float, steps: int | None = None,
                 seed: int | None = None, rank: int = 0, world_size: int = 1, secure: bool = False,
                 reproducible: bool | None = None):
        """`indices`: the indices to sample from (an int n: all of range(n)); `reproducible`: whether
        the state is saved (default: when a seed is given; never in secure mode)."""
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        indices = torch.arange(indices) if isinstance(indices, int) else torch.as_tensor(indices, dtype=torch.long)
        self.num_samples = len(indices)
        self.shard = indices[rank::world_size]  # this rank's part of the data set
        self.sample_rate = sample_rate
        self.steps = steps if steps is not None else max(1, round(1 / sample_rate))
        #: secure_mode: each batch from a secure stream, rekeyed from the operating system; no state
        self.secure = SecureStream(lambda: secrets.token_bytes(32)) if secure else None
        self.generator = None if secure else seeded_generator(sampling_seed(seed, rank))  # ranks draw independently
        self.reproducible = (seed is not None if reproducible is None else reproducible) and not secure

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            if self.secure is not None:
                self.secure.rekey()
                draws = self.secure.uniform(torch.device("cpu"))(len(self.shard))
            else:
                draws = torch.rand(len(self.shard), generator=self.generator)
            yield self.shard[draws < self.sample_rate].tolist()

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()} if self.reproducible else {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.generator.set_state(state["generator"])


def check_batching(dataset: Dataset, max_physical_batch_size: int | None, fixed_physical_batch: bool) -> None:
    """What a DPDataLoader needs of its arguments (make_private checks them before it attaches)."""
    if isinstance(dataset, IterableDataset):
        raise TypeError("an IterableDataset cannot be Poisson-sampled; use a map-style Dataset")
    if max_physical_batch_size is not None and max_physical_batch_size < 1:
        raise ValueError(f"max_physical_batch_size must be >= 1, got {max_physical_batch_size}")
    if fixed_physical_batch and max_physical_batch_size is None:
        raise ValueError("fixed_physical_batch=True needs max_physical_batch_size: the shape to pad to")


class _PhysicalBatches(Sampler[list[int]]):
    """Splits each logical batch into physical ones and queues, for each, whether it ends its logical
    batch and the logical sampler's state once that batch was drawn (a data loader with workers
    draws ahead of what it yields, so the sampler's own state runs ahead of the training)."""

    def __init__(self, logical: Sampler[list[int]] | Any, max_size: int | None,
                 common_count: Callable[[int], int] | None = None):
        self.logical = logical
        self.max_size = max_size
        self.common_count = common_count  # sharded models: every rank runs as many physical batches
        self.ends: deque[tuple[bool, dict | None]] = deque()

    def __len__(self) -> int:
        return len(self.logical)

    def __iter__(self) -> Iterator[list[int]]:
        self.ends.clear()
        for indices in self.logical:
            indices = list(indices)
            drawn = self.logical.state_dict() if hasattr(self.logical, "state_dict") else None
            size = self.max_size or max(len(indices), 1)
            chunks = [indices[i : i + size] for i in range(0, len(indices), size)] or [[]]
            if self.common_count is not None:
                chunks += [[] for _ in range(self.common_count(len(chunks)) - len(chunks))]
            for k, chunk in enumerate(chunks):
                self.ends.append((k == len(chunks) - 1, drawn))
                yield chunk


class _CollateOrEmpty:
    """The user's collate function, and for an empty batch the same structure with zero rows."""

    def __init__(self, collate_fn, empty_batch):
        self.collate_fn = collate_fn
        self.empty_batch = empty_batch

    def __call__(self, samples: list):
        return self.collate_fn(samples) if samples else self.empty_batch


def _empty_like(batch: Any) -> Any:
    return tree_map(lambda t: t[:0] if isinstance(t, torch.Tensor) else t, batch)


def _pad(batch: Any, filler: Any, size: int) -> tuple[Any, torch.Tensor]:
    """The batch with rows of `filler` appended up to `size`, and the mask of its real rows."""
    rows = next(t.shape[0] for t in tree_flatten(batch)[0] if isinstance(t, torch.Tensor))
    if rows > size:
        raise ValueError(f"a physical batch of {rows} rows is larger than the fixed size {size}")

    def pad(t, f):
        if not isinstance(t, torch.Tensor):
            return t
        return torch.cat([t, f.expand(size - rows, *f.shape[1:]).to(t.device)]) if rows < size else t

    flat, spec = tree_flatten(batch)
    padded = [pad(t, f) for t, f in zip(flat, tree_flatten(filler)[0])]
    mask = torch.arange(size) < rows
    return tree_unflatten(padded, spec), mask


class DPDataLoader:
    """Yields physical batches; before each one, tells its listeners (the optimizer) whether it ends
    a logical batch (`on_physical_batch`).

    `len()` is the number of logical batches (optimizer steps) per epoch. An empty logical batch
    yields one batch with zero rows, so that the step (noise only) still happens. With
    `fixed_physical_batch`, every batch is padded to `max_physical_batch_size` rows (copies of the
    first example) that the optimizer masks out: they contribute nothing, and every forward pass
    sees one shape (for torch.compile and CUDA graphs). A mean-reduced loss then averages over the
    padded size, which dpspeed accounts for; only the logged loss value includes the padding.
    `common_count(n)` turns this rank's n physical batches of a logical batch into the number all
    ranks run (empty batches make up the difference): sharded models communicate in every pass.
    """

    def __init__(
        self,
        dataset: Dataset,
        logical_batches: Sampler[list[int]] | Any,
        *,
        batch_size: int | None = None,
        max_physical_batch_size: int | None = None,
        fixed_physical_batch: bool = False,
        collate_fn=None,
        common_count: Callable[[int], int] | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        **loader_kwargs,
    ):
        check_batching(dataset, max_physical_batch_size, fixed_physical_batch)
        collate_fn = collate_fn or default_collate
        self.dataset = dataset
        self.batch_size = batch_size  # the expected logical batch size (Opacus's loaders have it too)
        self.source: DataLoader | None = None  # the user's loader this one was made from
        self.fixed_size = max_physical_batch_size if fixed_physical_batch else None
        self.logical_batches = logical_batches
        self.batches = _PhysicalBatches(logical_batches, max_physical_batch_size, common_count)
        self.filler = collate_fn([dataset[0]])
        empty = _empty_like(self.filler)
        self.loader = DataLoader(
            dataset,
            batch_sampler=self.batches,
            collate_fn=_CollateOrEmpty(collate_fn, empty),
            num_workers=num_workers,
            pin_memory=pin_memory,
            **loader_kwargs,
        )
        self._on_physical_batch: list[Callable[[bool, torch.Tensor | None, bool, int | None], None]] = []
        self._yielded_through: dict | None = None  # the sampler's state after the last full logical batch

    def on_physical_batch(self, callback: Callable[[bool, torch.Tensor | None, bool, int | None], None]) -> None:
        """Call `callback(last, row_mask, starting, rows)` before each physical batch is yielded:
        whether it ends its logical batch, for fixed-shape batches which rows are real (None
        otherwise), whether it is the first of a new pass over the loader, and its rows."""
        self._on_physical_batch.append(callback)

    def defer_announcements(self) -> Callable[[], None]:
        """Hold each physical batch's announcement until the returned function is called, once per
        batch and in order: for a loop that fetches batches ahead of the step it trains them in
        (Lightning prefetches one), which would otherwise announce a batch before the last was stepped."""
        listeners, pending = list(self._on_physical_batch), deque()

        def hold(*announcement) -> None:
            if announcement[2]:  # a new pass: what an earlier pass, broken off, fetched ahead is never trained
                pending.clear()
            pending.append(announcement)

        self._on_physical_batch[:] = [hold]

        def announce_next() -> None:
            if not pending:
                raise RuntimeError("a training step on a batch dpspeed's loader did not yield")
            announcement = pending.popleft()
            for callback in listeners:
                callback(*announcement)

        return announce_next

    def __len__(self) -> int:
        return len(self.logical_batches)

    def __iter__(self) -> Iterator:
        starting = True
        for batch in self.loader:
            end, drawn = self.batches.ends.popleft()
            if end:
                self._yielded_through = drawn
            mask = None
            if self.fixed_size is not None:
                batch, mask = _pad(batch, self.filler, self.fixed_size)
            rows = next((t.shape[0] for t in tree_flatten(batch)[0] if isinstance(t, torch.Tensor) and t.dim() > 0), None)
            for callback in self._on_physical_batch:
                callback(end, mask, starting, rows)
            starting = False
            yield batch

    @property
    def sample_rate(self) -> float | None:
        return getattr(self.logical_batches, "sample_rate", None)

    def state_dict(self) -> dict:
        """The logical sampler's state after the last logical batch yielded in full: a resumed run
        draws the batches that would have come next, whatever the workers had drawn ahead."""
        if self._yielded_through is not None:
            return self._yielded_through
        sd = getattr(self.logical_batches, "state_dict", None)
        return sd() if sd else {}

    def load_state_dict(self, state: dict) -> None:
        if state and hasattr(self.logical_batches, "load_state_dict"):
            self.logical_batches.load_state_dict(state)
            self._yielded_through = state


def loader_options(loader: DataLoader) -> dict:
    """The options of a user's DataLoader that a DPDataLoader keeps."""
    options = {
        "collate_fn": loader.collate_fn,
        "num_workers": loader.num_workers,
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context,
    }
    if loader.num_workers > 0:
        options["prefetch_factor"] = loader.prefetch_factor
        options["persistent_workers"] = loader.persistent_workers
    return options

"""The Gaussian noise of DP-SGD, and the seed policy of every random draw (noise and sampling).

Seeds: unless the user passes `seed=`, the seed (63 bits) comes from the operating system's
entropy (`secrets`), never from torch's global generator, which scripts seed with a constant;
every bit of it matters (`seeded_generator`: torch's CPU generator alone would keep 32). Across
processes, rank 0 draws and broadcasts it
(`parallel/data_parallel.shared_seed`). From that seed:
- each rank's Poisson sampler: seed + rank (`sampling_seed`), so the ranks draw independently;
- the noise of parameters every rank holds whole: seed + 7919, alike on every rank, so the noise
  enters the global sum once (on a CPU, CPU_STREAMS streams from seeds derived from it, drawn in
  threads side by side, chunk k from stream k mod CPU_STREAMS);
- the noise of a rank's shard of a fully_shard model: differently on every rank, so each
  coordinate gets its noise once.
A user's seed makes all of this reproducible by anyone who knows it; the engine says so.

The tails: torch.randn draws float32 Box-Muller pairs whose radius never exceeds 5.77 standard
deviations, so a coordinate beyond that is impossible without the target example and possible
with it, which δ does not account for (δ ≥ 8e-5 per step at σ = 0.5). `gaussian` draws the radius
from an exponential that continues past float64's grid (`exponential`): its support ends at
`TAIL_RADIUS` (14.8 standard deviations), where the Gaussian's remaining mass is 2^-159 per pair;
that cut-off adds (1 + e^ε)·T·d·2^-160 to δ over T steps on d coordinates, less than 10^-24 for
any d < 10^12, T < 10^9 and ε < 50. Like every floating-point sampler, the draws lie on a grid
(finest near 0, coarser in the tails: no radius between 8.49 and 8.57 standard deviations but by
the continuation), which the analysis of the Gaussian mechanism does not see; `secure_mode`
hardens the noise against attacks on its low-order bits.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import secrets
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable

import torch
import torch.distributed as dist

#: -ln of the smallest positive value of float64's 53-bit uniform grid: where -ln(U) stops
GRID_END = 53 * math.log(2)
#: draws of the exponential; each continues the previous one past GRID_END (probability 2^-53)
ROUNDS = 3
#: the largest radius of a Box-Muller pair, in standard deviations
TAIL_RADIUS = math.sqrt(2 * ROUNDS * GRID_END)
#: coordinates drawn at once: the temporaries take 8 bytes per coordinate of a chunk, a few MB on
#: the CPU; a GPU takes larger chunks, in fewer kernel launches
_CHUNK = {"cpu": 1 << 18}
_DEVICE_CHUNK = 1 << 22
#: independent streams a CPU draws its noise from at once, one thread each: torch's CPU generator
#: is sequential, and its draws are most of a small model's DP overhead there. A constant, not the
#: machine's core count, so that a seeded run draws the same noise on every machine. A GPU draws
#: from one stream (Philox, parallel in itself)
CPU_STREAMS = 2

Uniform = Callable[[int], torch.Tensor]  # n -> n float64 draws, uniform on [0, 1)


def draw_seed() -> int:
    """A seed when the user gives none, from the operating system's entropy."""
    return secrets.randbits(63)


#: torch's CPU generator state: (int64 seed, int32 left, int32 seeded, uint64 next), then 624 words
_MT_WORDS_OFFSET, _MT_WORDS, _MT_STATE_BYTES = 24, 624, 5056


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator whose whole state depends on all the bits of `seed`. torch's CPU generator keeps
    only 32 bits of a manual seed, few enough to try every one against a released update; its 624
    state words are filled from SHAKE-256 of the seed instead. GPU generators (Philox) take 64."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed % 2**64)
    state = generator.get_state()
    if torch.device(device).type == "cpu" and state.numel() == _MT_STATE_BYTES:
        stream = hashlib.shake_256(seed.to_bytes(16, "little")).digest(4 * _MT_WORDS)
        words = torch.frombuffer(bytearray(stream), dtype=torch.int32).to(torch.int64) & 0xFFFFFFFF
        words[0] |= 1  # the generator's state must not be all zeros
        state = state.clone()
        state[_MT_WORDS_OFFSET : _MT_WORDS_OFFSET + 8 * _MT_WORDS] = words.view(torch.uint8)
        generator.set_state(state)
    return generator


def sampling_seed(seed: int | None, rank: int) -> int:
    """The seed of a rank's Poisson sampler."""
    return (seed if seed is not None else draw_seed()) + rank


def exponential(n: int, uniform: Uniform, branch_free: bool | None = None) -> torch.Tensor:
    """n draws of Exp(1) in float64, support up to ROUNDS·GRID_END. -ln(1 - U) stops at GRID_END,
    where 1 - U reaches the grid's smallest value (the mass of Exp(1) beyond that point, 2^-53);
    such a draw continues with a fresh one, since X given X >= t is t + Exp(1). On a GPU without
    any data-dependent branch (`branch_free`), so nothing waits for the device: every round draws
    n; on the CPU, where a branch waits for nothing, a round draws only for the draws still going
    (almost never one). In place, so that at most two float64 tensors of n are alive."""
    x, going = _round(uniform(n))
    if branch_free is None:
        branch_free = x.device.type != "cpu"
    for _ in range(ROUNDS - 1):
        if branch_free:
            more, at_end = _round(uniform(n))
            x.add_(more.masked_fill_(~going, 0.0))
            going &= at_end
            continue
        where = going.nonzero().view(-1)
        if not where.numel():
            break
        more, at_end = _round(uniform(where.numel()))
        x.index_add_(0, where, more)
        going = torch.zeros_like(going).index_fill_(0, where[at_end], True)
    return x


def _round(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-ln(1 - u) for uniform draws u, GRID_END where 1 - u is the grid's smallest value (which
    also says where the draw goes on)."""
    at_end = u >= 1.0 - 2.0**-53  # 1 - U (exact on the grid) at its smallest value, 2^-53
    return u.neg_().log1p_().neg_().masked_fill_(at_end, GRID_END), at_end


def gaussian(n: int, uniform: Uniform, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """n draws of N(0, 1): Box-Muller pairs, radius sqrt(2·Exp(1)) (float64 until it is cast to
    `dtype`), uniform angle."""
    pairs = (n + 1) // 2
    radius = exponential(pairs, uniform).mul_(2.0).sqrt_().to(dtype)
    angle = uniform(pairs).mul_(2 * math.pi).to(dtype)
    out = torch.empty(2 * pairs, dtype=dtype, device=radius.device)
    torch.cos(angle, out=out[:pairs]).mul_(radius)
    torch.sin(angle, out=out[pairs:]).mul_(radius)
    return out[:n]


Draw = Callable[[int, torch.dtype], torch.Tensor]  # (n, dtype) -> n draws of N(0, 1)


def _add_noise(totals: list[torch.Tensor], std: float, draws: list[Draw]) -> None:
    """Each total += std · draw(n, dtype), the totals (of one device and dtype) taken as one
    sequence of coordinates drawn in chunks: the draw's dozens of operations run per chunk (a few
    MB of temporaries on the CPU), not per tensor, of which a model has hundreds. With several
    independent streams (`draws`), chunk k comes from stream k mod their number, each stream
    drawing its chunks in order in a thread of its own: what each coordinate gets does not depend
    on how the threads are scheduled."""
    flats = []
    for total in totals:
        if not total.is_contiguous():  # (a channels-last gradient): one draw of its whole size
            total.add_(draws[0](total.numel(), total.dtype).view(total.shape), alpha=std)
        elif total.numel():
            flats.append(total.view(-1))
    if not flats:
        return
    chunks = _chunks(flats, _CHUNK.get(flats[0].device.type, _DEVICE_CHUNK))

    def drawn_by(stream: int) -> None:
        for targets, size in chunks[stream :: len(draws)]:
            noise, used = draws[stream](size, flats[0].dtype), 0
            parts = []
            for target in targets:
                parts.append(noise[used : used + target.numel()])
                used += target.numel()
            torch._foreach_add_(targets, parts, alpha=std)  # one launch for the chunk's pieces

    if len(draws) == 1:
        drawn_by(0)
    else:
        running = [_threads().submit(drawn_by, stream) for stream in range(len(draws))]
        wait(running)  # both done before a failure is raised: no thread adds noise after this returns
        for done in running:
            done.result()


def _chunks(flats: list[torch.Tensor], chunk: int) -> list[tuple[list[torch.Tensor], int]]:
    """The flat totals cut into runs of `chunk` coordinates (the last one shorter), each run as the
    pieces of totals it covers, in order, and its length."""
    runs, pieces, size = [], [], 0
    for flat in flats:
        offset = 0
        while offset < flat.numel():
            take = min(chunk - size, flat.numel() - offset)
            pieces.append(flat[offset : offset + take])
            offset, size = offset + take, size + take
            if size == chunk:
                runs.append((pieces, size))
                pieces, size = [], 0
    if pieces:
        runs.append((pieces, size))
    return runs


@functools.cache
def _threads() -> ThreadPoolExecutor:
    """The threads the CPU streams draw in (torch's operations let go of the GIL)."""
    return ThreadPoolExecutor(max_workers=CPU_STREAMS, thread_name_prefix="dpspeed-noise")


os.register_at_fork(after_in_child=_threads.cache_clear)  # a forked child has none of its parent's threads


def _by_device_and_dtype(totals: list[torch.Tensor]) -> dict[tuple, list[torch.Tensor]]:
    """The totals grouped by (device, dtype), each group in the given order (the same on every rank)."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for total in totals:
        groups.setdefault((total.device, total.dtype), []).append(total)
    return groups


def _uniform(generator: torch.Generator | None, device: torch.device) -> Uniform:
    return lambda n: torch.rand(n, dtype=torch.float64, generator=generator, device=device)


class NoiseSource:
    """Where the noise of each parameter comes from: for parameters every rank holds whole, a stream
    seeded alike on every rank (one per device the parameters lie on, in the order the parameters
    first meet them, so that no two devices repeat each other's noise); for this rank's shards of a
    fully_shard model, a stream that differs on every rank."""

    def __init__(self, seed: int, generator: torch.Generator | None = None, sharded: torch.Generator | None = None):
        self.seed = seed
        self.user_generator = generator
        self.sharded = sharded
        self._replicated: dict[torch.device, list[torch.Generator]] = {}

    @classmethod
    def create(cls, generator: torch.Generator | None, seed: int, world: int, sharded: bool,
               device: torch.device) -> "NoiseSource":
        """The user's `generator`, if any, for replicated parameters; otherwise generators seeded
        from `seed` (shared by all ranks)."""
        shard_generator = None
        if sharded and world > 1:
            start = generator.initial_seed() if generator is not None else seed
            shard_generator = seeded_generator((start + 104729 * (dist.get_rank() + 1)) % 2**63, device)
        source = cls(seed, generator, shard_generator)
        source.generators_for(torch.device(device))
        return source

    def generators_for(self, device: torch.device) -> list[torch.Generator]:
        """The replicated streams on `device`: CPU_STREAMS on a CPU, one on a GPU, the user's one
        generator if given."""
        if self.user_generator is not None:
            if torch.device(self.user_generator.device).type != device.type:
                raise ValueError(f"noise_generator lives on {self.user_generator.device}, a parameter on {device}")
            return [self.user_generator]
        if device not in self._replicated:
            seed = self.seed + 7919 + 1_000_003 * len(self._replicated)
            streams = CPU_STREAMS if device.type == "cpu" else 1
            self._replicated[device] = [seeded_generator((seed + 998_244_353 * k) % 2**63, device)
                                        for k in range(streams)]
        return self._replicated[device]

    def add_to(self, totals: list[torch.Tensor], std: float, sharded: bool = False) -> None:
        """Each total += N(0, std²) per coordinate, in place, with no cut-off in the tails."""
        for (device, _), group in _by_device_and_dtype(totals).items():
            generators = [self.sharded] if sharded and self.sharded is not None else self.generators_for(device)
            _add_noise(group, std, [_gaussian_draw(_uniform(g, device)) for g in generators])

    def new_step(self) -> None:
        """A new logical step (the streams simply go on)."""

    def state_dict(self) -> dict:
        """The generators' states: a run resumed from them continues their streams exactly."""
        replicated = {str(self.user_generator.device): [self.user_generator]} if self.user_generator is not None \
            else {str(d): gs for d, gs in self._replicated.items()}
        return {"replicated": {d: [g.get_state() for g in gs] for d, gs in replicated.items()},
                "sharded": self.sharded.get_state() if self.sharded is not None else None}

    def load_state_dict(self, state: dict) -> None:
        for device, saved in state["replicated"].items():
            # one state: a checkpoint of one stream per device, whose stream goes on as the first; the
            # others (seeded apart, never drawn from) start afresh
            saved = saved if isinstance(saved, list) else [saved]
            generators = self.generators_for(torch.device(device))
            if len(saved) > len(generators):
                raise RuntimeError(
                    f"the checkpoint's noise on {device} comes from {len(saved)} streams, this run draws it from "
                    f"{len(generators)}: it was saved with another noise_generator setting")
            for generator, one in zip(generators, saved):
                generator.set_state(one)
        if self.sharded is not None and state["sharded"] is not None:
            self.sharded.set_state(state["sharded"])


def _gaussian_draw(uniform: Uniform) -> Draw:
    return lambda n, dtype: gaussian(n, uniform, dtype)


class SecureStream:
    """Uniforms from a cryptographically secure generator: SHAKE-256 keyed with 32 bytes from
    `key_source` (the operating system's entropy, or rank 0's broadcast), a new key at every
    `rekey`, blocks of the stream told apart by a counter. Nobody without the key can predict a
    draw, whatever they saw before."""

    def __init__(self, key_source: Callable[[], bytes]):
        self.key_source = key_source
        self._key = key_source()
        self._block = 0

    def rekey(self) -> None:
        self._key, self._block = self.key_source(), 0

    def uniform(self, device: torch.device) -> Uniform:
        def draw(n: int) -> torch.Tensor:
            self._block += 1
            raw = hashlib.shake_256(self._key + self._block.to_bytes(8, "little")).digest(8 * n)
            words = torch.frombuffer(bytearray(raw), dtype=torch.int64)
            return ((words >> 11) & ((1 << 53) - 1)).to(torch.float64).mul_(2.0**-53).to(device)

        return draw


def secure_gaussian(n: int, uniform: Uniform, dtype: torch.dtype) -> torch.Tensor:
    """N(0, 1) as the mean of four independent draws, times 2: a floating-point attack on one
    Box-Muller draw's low-order bits (Mironov 2012; Holohan & Braghin 2021) no longer sees them."""
    total = gaussian(n, uniform, torch.float64)
    for _ in range(3):
        total.add_(gaussian(n, uniform, torch.float64))
    return total.mul_(0.5).to(dtype)


class SecureNoiseSource:
    """secure_mode's noise: secure streams, rekeyed from the operating system at every logical
    step; for replicated parameters the key is shared by all ranks (`replicated_key`), for this
    rank's shards it is its own. Nothing of it is saved in a checkpoint."""

    def __init__(self, replicated_key: Callable[[], bytes], shard_key: Callable[[], bytes] = lambda: secrets.token_bytes(32)):
        self.replicated = SecureStream(replicated_key)
        self.sharded = SecureStream(shard_key)

    def new_step(self) -> None:
        self.replicated.rekey()
        self.sharded.rekey()

    def add_to(self, totals: list[torch.Tensor], std: float, sharded: bool = False) -> None:
        """Each total += N(0, std²) per coordinate, in place."""
        for (device, _), group in _by_device_and_dtype(totals).items():
            uniform = (self.sharded if sharded else self.replicated).uniform(device)
            _add_noise(group, std, [lambda n, dtype: secure_gaussian(n, uniform, dtype)])

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

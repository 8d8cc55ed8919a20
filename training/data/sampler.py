"""Deterministic, resumable, rank-aware batch order.

The order of epoch ``e`` is a permutation drawn from a generator seeded by (seed, e) alone, so a
run resumed in the middle of an epoch replays exactly the batches it had not yet seen. Under
DDP, rank r takes every world-th index of the permutation; training truncates every rank to the
same number of batches (ranks must step together), evaluation keeps every sample exactly once.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator()
    g.manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of indices for one rank. Call `set_epoch` before iterating."""

    def __init__(self, n: int, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True, rank: int = 0, world_size: int = 1) -> None:
        if n < world_size:
            raise ValueError(f"{n} samples cannot be split over {world_size} processes")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Iterate epoch ``epoch``, skipping its first ``start_batch`` batches (resume)."""
        self.epoch, self.start_batch = epoch, start_batch

    def _indices(self) -> list[int]:
        order = epoch_permutation(self.n, self.seed, self.epoch) if self.shuffle else torch.arange(self.n)
        mine = order[self.rank :: self.world_size].tolist()
        if self.drop_last:  # every rank the same number of full batches
            per_rank = self.n // self.world_size
            full = (per_rank // self.batch_size) * self.batch_size
            mine = mine[: full if full > 0 else per_rank]
        return mine

    def batches_per_epoch(self) -> int:
        mine = len(self._indices())
        return mine // self.batch_size if self.drop_last and mine >= self.batch_size else -(-mine // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        idx = self._indices()
        for b in range(self.start_batch, self.batches_per_epoch()):
            yield idx[b * self.batch_size : (b + 1) * self.batch_size]

    def __len__(self) -> int:
        return self.batches_per_epoch() - self.start_batch

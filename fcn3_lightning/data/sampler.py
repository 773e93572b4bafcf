"""A shuffling sampler whose order depends on (seed, epoch) only, so a resumed run sees the same order."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler[int]):
    """Random permutation of ``range(n)`` seeded by ``seed + epoch``; Lightning calls ``set_epoch`` every epoch.

    A DataLoader's own ``shuffle=True`` draws from a generator that advances from epoch to epoch, so a run
    resumed from a checkpoint would replay another order than the uninterrupted run.
    """

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n

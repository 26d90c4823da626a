"""Seeded, rank-sharded, resumable batch sampling.

:class:`EpochBatchSampler` draws one permutation of the dataset per epoch from
``torch.Generator().manual_seed(seed + epoch)``; global batch ``t`` is
``perm[t·B·W : (t+1)·B·W]`` (B per-rank batch, W ranks) and rank ``r`` takes its elements
``r, r+W, r+2W, ...``. So W ranks with batch B see exactly the samples one process with batch
B·W sees, and ``skip(k)`` resumes after k batches without loading them.
"""
from __future__ import annotations

import torch


class EpochBatchSampler:
    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1,
                 shuffle: bool = True, drop_last: bool = True):
        if n <= 0:
            raise ValueError("cannot sample batches from an empty dataset")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world, self.shuffle, self.drop_last = rank, world, shuffle, drop_last
        self.epoch = 0
        self._skip = 0
        gb = batch_size * world
        if drop_last and n < gb:
            raise ValueError(f"data: {n} training images are fewer than one global batch ({batch_size} x {world} "
                             f"ranks); lower data.batch_size or set data.drop_last=false")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._skip = 0

    def skip(self, n_batches: int) -> None:
        """The next iteration starts after ``n_batches`` batches (used when resuming mid-epoch)."""
        self._skip = n_batches

    def _global_batches(self) -> int:
        gb = self.batch_size * self.world
        return self.n // gb if self.drop_last else -(-self.n // gb)

    def __len__(self) -> int:
        return self._global_batches()

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
        else:
            perm = list(range(self.n))
        gb = self.batch_size * self.world
        for t in range(self._skip, self._global_batches()):
            chunk = perm[t * gb:(t + 1) * gb]
            mine = chunk[self.rank::self.world]
            if mine:
                yield mine


def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """Evaluation sharding: rank r takes r, r+W, ... (no padding, so sums over ranks are exact)."""
    return list(range(rank, n, world))

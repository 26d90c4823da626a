"""Class-balanced P×K batch sampler: every batch holds P groups of K images of one class.

SMKD's supervised losses (spec ``shared/methods/smkd.md`` §2.2) need same-class pairs inside a batch;
the reference drew batches uniformly, so on datasets with many classes a batch often had none. This
sampler guarantees them (a declared improvement over the reference).

Per epoch, from ``torch.Generator().manual_seed(seed + epoch)``:

1. every class c with at least 2 images is shuffled and cut into ⌈n_c / K⌉ chunks of K indices; a
   short last chunk is filled with other images of c (drawn from the rest of the shuffled class,
   cycling when n_c < K), so every chunk holds ≥ 2 distinct images of one class;
2. all chunks are shuffled together; global batch t takes chunks ``[t·P·W, (t+1)·P·W)`` and rank r
   takes chunks ``r, r + W, …`` of it — P chunks, i.e. ``P·K`` indices per rank;
3. an incomplete last global batch is dropped.

Classes with a single image are never sampled (they cannot form a pair). ``len()`` is the number of
batches per epoch, the same on every rank; ``skip(k)`` resumes after k batches.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch


class PKBatchSampler:
    """Yields lists of ``P·K`` dataset indices (``P`` classes × ``K`` images). See the module doc."""

    def __init__(self, labels: Sequence[int], n_classes_per_batch: int, n_per_class: int, seed: int = 0,
                 rank: int = 0, world: int = 1):
        if n_per_class < 2:
            raise ValueError(f"P×K sampler: K (images per class) must be >= 2 to form pairs, got {n_per_class}")
        if n_classes_per_batch < 1:
            raise ValueError(f"P×K sampler: P (classes per batch) must be >= 1, got {n_classes_per_batch}")
        if not 0 <= rank < world:
            raise ValueError(f"P×K sampler: rank {rank} outside world of size {world}")
        by_class: dict[int, list[int]] = defaultdict(list)
        for i, y in enumerate(labels):
            by_class[int(y)].append(i)
        self.classes = sorted(c for c, idx in by_class.items() if len(idx) >= 2)
        self.by_class = {c: by_class[c] for c in self.classes}
        self.skipped_classes = sorted(c for c, idx in by_class.items() if len(idx) < 2)
        self.P, self.K, self.seed, self.rank, self.world = int(n_classes_per_batch), int(n_per_class), seed, rank, world
        self.n_chunks = sum(-(-len(idx) // self.K) for idx in self.by_class.values())
        if self.n_chunks < self.P * world:
            raise ValueError(f"P×K sampler: only {self.n_chunks} class chunks of K={self.K} for one global batch of "
                             f"P={self.P} × {world} ranks; lower P or K")
        self.epoch = 0
        self._skip = 0

    @property
    def batch_size(self) -> int:
        return self.P * self.K

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._skip = 0

    def skip(self, n_batches: int) -> None:
        """The next iteration starts after ``n_batches`` batches (resume mid-epoch)."""
        self._skip = int(n_batches)

    def __len__(self) -> int:
        return self.n_chunks // (self.P * self.world)

    def _chunks(self, g: torch.Generator) -> list[list[int]]:
        chunks = []
        for c in self.classes:
            idx = self.by_class[c]
            perm = [idx[i] for i in torch.randperm(len(idx), generator=g).tolist()]
            for start in range(0, len(perm), self.K):
                chunk = perm[start:start + self.K]
                if len(chunk) < self.K:
                    # fill from the class's other images; a class smaller than K cycles its own images
                    pool = (perm[:start] + perm[start + len(chunk):]) or list(chunk)
                    j = 0
                    while len(chunk) < self.K:
                        chunk.append(pool[j % len(pool)])
                        j += 1
                chunks.append(chunk)
        order = torch.randperm(len(chunks), generator=g).tolist()
        return [chunks[i] for i in order]

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        chunks = self._chunks(g)
        per_global = self.P * self.world
        for t in range(self._skip, len(self)):
            mine = chunks[t * per_global:(t + 1) * per_global][self.rank::self.world]
            yield [i for ch in mine for i in ch]

"""LengthGroupedSampler: shuffled, DDP-aware, resumable, optionally grouping rows of similar length.

Each epoch: a seeded permutation of all rows (seed + epoch), padded by wrapping to a whole number
of global batches (batch_size x world_size) unless drop_last; with grouping, it is cut into
mega-batches of `group_mult` global batches, each sorted by length so the rows of one batch are
close in length (dynamic padding then pads little), and the global batches are shuffled again.
Rank r takes the r-th `batch_size` slice of every global batch. Use with
`DataLoader(dataset, batch_size=batch_size, sampler=sampler)`.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


class LengthGroupedSampler(Sampler[int]):
    def __init__(self, lengths: Sequence[int] | np.ndarray | int, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, group_by_length: bool = True, shuffle: bool = True,
                 drop_last: bool = False, group_mult: int = 50):
        """`lengths`: per-row token lengths (or just the number of rows when not grouping)."""
        if isinstance(lengths, int):
            if group_by_length:
                raise ValueError("group_by_length needs the row lengths, not just their number")
            lengths = np.zeros(lengths, dtype=np.int64)
        self.lengths = np.asarray(lengths)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.group_by_length, self.shuffle, self.drop_last = seed, group_by_length, shuffle, drop_last
        self.group_mult = group_mult
        self.epoch, self.start = 0, 0
        n, g = len(self.lengths), batch_size * world_size
        self.num_global_batches = n // g if drop_last else -(-n // g)
        if self.num_global_batches == 0:
            raise ValueError(f"{n} rows make no batch of {batch_size} x {world_size} ranks")

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order; `start` skips this rank's first `start` samples (resume mid-epoch)."""
        self.epoch, self.start = epoch, start

    def global_order(self) -> np.ndarray:
        """[num_global_batches, batch_size * world_size] row indices of this epoch, the same on every rank."""
        n, g = len(self.lengths), self.batch_size * self.world_size
        rng = np.random.default_rng((self.seed, self.epoch))
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        total = self.num_global_batches * g
        order = np.resize(order, total) if total > n else order[:total]  # wrap around to fill the last batch
        if self.group_by_length:
            mega = g * self.group_mult
            chunks = [c[np.argsort(-self.lengths[c], kind="stable")] for c in np.split(order, range(mega, total, mega))]
            batches = np.concatenate(chunks).reshape(-1, g)
            # the longest batch goes first (an out-of-memory shows at step 0), the rest shuffled
            longest = int(np.argmax(self.lengths[batches].max(axis=1)))
            rest = np.delete(np.arange(len(batches)), longest)
            rest = rng.permutation(rest) if self.shuffle else rest
            batches = batches[np.concatenate([[longest], rest])]
            return batches
        return order.reshape(-1, g)

    def __iter__(self) -> Iterator[int]:
        mine = self.global_order()[:, self.rank * self.batch_size:(self.rank + 1) * self.batch_size].reshape(-1)
        return iter(mine[self.start:].tolist())

    def __len__(self) -> int:
        return self.num_global_batches * self.batch_size - self.start

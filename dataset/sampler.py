"""LengthGroupedSampler: an epoch's order of rows in batches, shuffled, optionally grouping rows of similar length.

Each epoch: a seeded permutation of all rows (seed + epoch), wrapped around to a whole number of
batches; with grouping, it is cut into mega-batches of `group_mult` batches, each sorted by length
so the rows of one batch are close in length (dynamic padding then pads little), and the batches
are shuffled again. The order is one process's view: trainer/data.py's `RankSampler` deals its
batches to the DDP ranks and skips what a resumed run already consumed.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


class LengthGroupedSampler(Sampler[int]):
    def __init__(self, lengths: Sequence[int] | np.ndarray, batch_size: int, seed: int = 0,
                 group_by_length: bool = True, group_mult: int = 50):
        """`lengths`: per-row token lengths (only their number matters when not grouping)."""
        self.lengths = np.asarray(lengths)
        self.batch_size, self.seed, self.group_by_length, self.group_mult = batch_size, seed, group_by_length, group_mult
        self.epoch = 0
        self.num_global_batches = -(-len(self.lengths) // batch_size)
        if self.num_global_batches == 0:
            raise ValueError("no rows to sample")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_order(self) -> np.ndarray:
        """[num_global_batches, batch_size] row indices of this epoch."""
        n, b = len(self.lengths), self.batch_size
        rng = np.random.default_rng((self.seed, self.epoch))
        total = self.num_global_batches * b
        order = np.resize(rng.permutation(n), total)  # wrap around to fill the last batch
        if not self.group_by_length:
            return order.reshape(-1, b)
        mega = b * self.group_mult
        chunks = [c[np.argsort(-self.lengths[c], kind="stable")] for c in np.split(order, range(mega, total, mega))]
        batches = np.concatenate(chunks).reshape(-1, b)
        # the longest batch goes first (an out-of-memory shows at step 0), the rest shuffled
        longest = int(np.argmax(self.lengths[batches].max(axis=1)))
        rest = rng.permutation(np.delete(np.arange(len(batches)), longest))
        return batches[np.concatenate([[longest], rest])]

    def __iter__(self) -> Iterator[int]:
        return iter(self.global_order().reshape(-1).tolist())

    def __len__(self) -> int:
        return self.num_global_batches * self.batch_size

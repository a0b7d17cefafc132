"""The trainer's data loader: a uniformly shuffled order (every batch a random sample of the epoch,
as in the original), dealt to ranks so that the sequence of samples does not depend on the world size.

The order of an epoch is a list of `batch_size`-row batches, a function of (seed, epoch, batch
size) only: `LengthGroupedSampler` as seen by a single process. Grouping rows of similar length
(`group_by_length=True`) is opt-in: where the kind of row sets its length, it makes nearly every
batch one kind of row, and the model then learns one answer format at a time. Ranks take batches round-robin
(step k: global batches k*W .. k*W+W-1, rank r the r-th), the list wrapped to a multiple of W.
"Samples consumed" is then one number for every world size, and a run resumed on more or fewer
processes continues at the right sample.
"""
from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler


class RankSampler(Sampler[int]):
    def __init__(self, lengths: np.ndarray, batch_size: int, rank: int, world_size: int, seed: int,
                 group_by_length: bool = False):
        from dataset.lm_dataset import LengthGroupedSampler
        self.order = LengthGroupedSampler(lengths, batch_size=batch_size, seed=seed, group_by_length=group_by_length)
        self.batch_size, self.rank, self.world = batch_size, rank, world_size
        self.num_batches = self.order.num_global_batches  # of the epoch, before wrapping
        self.set_epoch(0)

    @property
    def epoch_samples(self) -> int:
        """Samples an epoch holds (the last batch completed by wrapping); consumed that many, it is over."""
        return self.num_batches * self.batch_size

    @property
    def batches_per_rank(self) -> int:
        """Micro-batches per rank of a whole epoch."""
        return -(-self.num_batches // self.world)

    def set_epoch(self, epoch: int, skip_samples: int = 0) -> None:
        """Select the epoch; skip its first `skip_samples` samples (counted over all ranks; a batch
        size changed since they were counted rounds up to whole batches)."""
        self.order.set_epoch(epoch)
        self.skip = -(-skip_samples // self.batch_size)
        # Batches still to deal, wrapped around the epoch's start to a multiple of the world size.
        self.count = -(-max(self.num_batches - self.skip, 0) // self.world) * self.world

    def __iter__(self) -> Iterator[int]:
        order = self.order.global_order()  # [num_batches, batch_size], world-size free
        todo = order[np.arange(self.skip, self.skip + self.count) % self.num_batches]
        return iter(todo[self.rank::self.world].reshape(-1).tolist())

    def __len__(self) -> int:
        return self.count // self.world * self.batch_size


def make_loader(dataset, batch_size: int, rank: int, world_size: int, seed: int, epoch: int, skip_samples: int,
                num_workers: int, pin_memory: bool, show_progress: bool = True,
                group_by_length: bool = False, pack_len: int = 0) -> DataLoader:
    """This rank's batches of `epoch` after the first `skip_samples` samples; with `pack_len`, each
    batch's rows are packed into sequences of at most that many tokens (the same rows, laid out densely)."""
    from dataset.lm_dataset import collate_fn, collate_packed
    sampler = RankSampler(dataset.lengths(show_progress=show_progress), batch_size, rank, world_size, seed,
                          group_by_length)
    sampler.set_epoch(epoch, skip_samples)
    # A private generator: creating the iterator must not draw from the global RNG (resume equivalence).
    collate = partial(collate_packed, capacity=pack_len) if pack_len else collate_fn
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                      num_workers=num_workers, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(seed * 1000 + epoch))

"""Exact resume of the data: the same samples, in the same order, with the same augmentations, from any batch.

A resumed run must neither repeat nor skip samples, and must see the same random crops and flips as an
uninterrupted one. Three pieces make the training stream a pure function of (seed, epoch, position):

* every sample's augmentation draws from its own generator, seeded from (seed, epoch, sample), never from the
  process's global RNG (which the training step also uses) or a worker's (which depends on the worker layout);
* the order of an epoch is a permutation seeded from (seed, epoch) (map-style sources: :class:`ResumableSampler`,
  which also splits it between ranks), or the WebDataset pipeline is rebuilt for each epoch with seeds from
  (seed, epoch) (:class:`EpochStream`);
* :class:`ResumableLoader`, when an epoch's iterator is made, asks the Trainer which epoch this is and how many
  batches of it are already done (non-zero only right after a mid-epoch resume) and starts there: map-style sources
  skip indices without reading them, streams replay and drop the done batches (decoding them again: a resumed
  epoch costs a pass over its done part).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils.data import DistributedSampler, IterableDataset, get_worker_info

from emu.data.batches import BatchLoader


def sample_seed(seed: int, epoch: int, key: Any) -> int:
    """A 63-bit seed for one sample's augmentation, the same in every process (unlike Python's ``hash``)."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@contextmanager
def seeded(seed: int | None):
    """Inside the block the global torch RNG is seeded with ``seed``; outside it is untouched (None: no-op)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class ResumableSampler(DistributedSampler):
    """An epoch's order as a permutation seeded by (seed, epoch), split between ranks, startable at any batch.

    Yields ``(index, sample_seed)`` pairs; :class:`~emu.data.sources.PreparedDataset` seeds the sample's
    augmentation with the second. Lightning leaves it in place under DDP (it is a ``DistributedSampler``).
    """

    def __init__(self, n: int, shuffle: bool, seed: int, num_replicas: int = 1, rank: int = 0, drop_last: bool = True):
        super().__init__(range(n), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)  # fmt: skip
        self.n, self.skip = n, 0

    def set_position(self, epoch: int, skip: int) -> None:
        """The epoch to draw and how many of this rank's samples of it are already done."""
        self.set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(self.n))
        per_rank = self.num_samples
        if self.drop_last:
            order = order[: per_rank * self.num_replicas]
        else:
            order += order[: per_rank * self.num_replicas - len(order)]  # pad as DistributedSampler does
        mine = order[self.rank :: self.num_replicas]
        for i in mine[self.skip :]:
            yield i, sample_seed(self.seed, self.epoch, i)


class EpochStream(IterableDataset):
    """A WebDataset pipeline rebuilt for each epoch by ``make(epoch)``, started ``skip`` batches into the epoch.

    With ``W`` loader workers the DataLoader takes batch ``j`` from worker ``j % W``, so worker ``w`` drops the
    first ``ceil((skip - w) / W)`` batches of its own stream. That holds while every worker still has batches: once
    one runs out the DataLoader goes on round-robin over the others, so a resume in that tail of an epoch is exact
    only when the workers' streams are equally long (``data.source.epoch_size`` makes them so: each worker yields
    ``epoch_size / (batch x ranks x workers)`` batches).
    """

    def __init__(self, make: Callable[[int], IterableDataset], length: int | None = None):
        self.make, self.length, self.epoch, self.skip = make, length, 0, 0

    def set_position(self, epoch: int, skip: int) -> None:
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("this stream has no length (set data.source.epoch_size)")
        return self.length

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        drop = max(0, -(-(self.skip - worker) // workers))
        for i, batch in enumerate(self.make(self.epoch)):
            if i >= drop:
                yield batch


class ResumableLoader(BatchLoader):
    """A DataLoader that positions its sampler or stream (``set_position``) each time an epoch's iterator is made.

    ``position()`` returns ``(epoch, batches_done)``; the sampler is told the items it yielded: samples (batches x
    batch size), or batches when it yields whole ones (``batch_size=None``: :class:`~emu.data.buckets.BucketSampler`).
    The Trainer counts every batch it was given, empty ones too (``empty="keep"``, :mod:`emu.data.batches`), so its
    count is the sampler's.
    """

    def __init__(self, *args, position: Callable[[], tuple[int, int]], **kwargs):
        super().__init__(*args, **kwargs)
        self.position = position

    def __iter__(self):
        epoch, done = self.position()
        if isinstance(self.dataset, EpochStream):
            self.dataset.set_position(epoch, done)
        elif isinstance(self.sampler, ResumableSampler):
            self.sampler.set_position(epoch, done * (self.batch_size or 1))
        return super().__iter__()

"""EmuDataModule: the one LightningDataModule every stage uses.

Batches are dicts: ``image`` (float in [-1, 1], B x 3 x H x W), ``caption`` (list of str), ``key`` (list of
str) and ``meta`` (list of the samples' metadata dicts). Samples that cannot be used are skipped and counted
per reason in :attr:`EmuDataModule.skipped` (``{"train": Counter, "val": Counter}``), exactly, whichever
worker met them. A map-style batch left with no good sample is skipped, never refilled with a repeat
(:mod:`emu.data.batches`), and counted in :attr:`EmuDataModule.empty_batches`.

The batching paths. Every map-style batch is made by one method, :meth:`~emu.data.sources.PreparedDataset.__getitems__`
(read, drop and count the bad samples, collate; an empty batch when none is good), and read through a
:class:`~emu.data.batches.BatchLoader`, whose one policy says what becomes of empty batches; every stream batch is
made in the webdataset pipeline after its bad samples were dropped, so it is never empty. The paths differ in who
picks the indices and how a run resumes, each for a reason:

* map-style, square crops, training: :class:`~emu.data.resume.ResumableSampler` (a permutation of (seed, epoch), dealt
  to the ranks sample by sample as ``DistributedSampler`` does), batched by the DataLoader; resumed by
  :class:`~emu.data.resume.ResumableLoader` skipping the done batches' indices unread. Stays beside the bucketed path
  (it is that path's base class): as one bucket of it, every multi-rank run would give its ranks other samples than
  today, and ``trainer.overfit_batches`` (which swaps in a per-sample sampler) would break.
* map-style, buckets, training: :class:`~emu.data.buckets.BucketSampler`, the same permutation grouped into whole
  batches of one bucket, dealt to the ranks batch by batch; resumed the same way, by batches. Stays: a batch must
  hold one shape, which a per-sample sampler cannot promise.
* map-style validation: in order (Lightning's ``DistributedSampler`` with several ranks; ``BucketSampler`` with
  buckets); no resume: a validation starts over each time.
* map-style pieces (:meth:`EmuDataModule.piece_loader`: precompute, curation): a :class:`~emu.data.sources.SourceSlice`
  in order, without augmentation; resumed by piece (finished pieces are kept, a cut one is redone whole). Stays: the
  unit of work dealt to ranks that never step together, so its empty batches are simply dropped.
* streams (:class:`~emu.data.sources.WebDatasetSource`, and the precomputed latents of
  :class:`~emu.diffusion.latents.LatentSource`), training: :class:`~emu.data.resume.EpochStream`, the pipeline
  rebuilt each epoch with seeds from (seed, epoch), shards split by rank and worker, batched in the workers; resumed
  by replaying the epoch and dropping the done batches. Stays: tar shards have no random access, so there are no
  indices to skip; their validation and pieces read the pipeline in order, not resumed.
"""

from __future__ import annotations

import copy
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from emu.data.batches import BatchLoader
from emu.data.buckets import BucketSampler, resolve_buckets
from emu.data.resume import EpochStream, ResumableLoader, ResumableSampler
from emu.data.samples import SamplePreparer, as_is
from emu.data.sources import IndexedSource, PreparedDataset, SkipCounter, SourceSlice, WebDatasetSource
from emu.errors import ConfigError


class EmuDataModule(L.LightningDataModule):
    """Shared data pipeline.

    Args:
        source: a :class:`~emu.data.sources.IndexedSource` or :class:`~emu.data.sources.WebDatasetSource`.
        resolution: square output size (the model checks that it is a multiple of its downsampling:
            :mod:`emu.utils.resolution`); with ``buckets``, the side of their pixel count.
        buckets: aspect-ratio buckets (:mod:`emu.data.buckets`): a list of ``[width, height]``, or
            ``{multiple, max_aspect}`` to make them around ``resolution``; every batch then holds one bucket.
            None: every image is cropped to a ``resolution`` square.
        crop: ``center`` or ``random`` for training (validation always crops the center).
        hflip: flip probability for training; captions get 'left'/'right' swapped (``flip_captions``).
        min_size: images with a shorter side below this many pixels are skipped.
        require_caption: skip samples without a usable caption.
        batch_size, val_batch_size, num_workers, pin_memory, persistent_workers, drop_last: loader settings.
        max_skip_rate: the largest fraction of skipped training samples (bad files, broken shards) a run accepts once
            ``skip_rate_min_samples`` have been read; above it :class:`~emu.data.callbacks.DataHealth` stops the run.
        seed: the seed of the training order and augmentations (see :mod:`emu.data.resume`: a resumed run sees
            exactly the samples an uninterrupted one would).
    """

    def __init__(
        self,
        source: IndexedSource | WebDatasetSource,
        resolution: int = 64,
        crop: str = "center",
        hflip: float = 0.0,
        flip_captions: bool = True,
        min_size: int = 0,
        require_caption: bool = True,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        drop_last: bool = True,
        max_skip_rate: float = 0.25,
        skip_rate_min_samples: int = 1000,
        seed: int = 0,
        buckets: list | dict | None = None,
    ):
        super().__init__()
        if resolution <= 0:
            raise ConfigError("data.resolution", f"must be positive, got {resolution}")
        if crop not in ("center", "random"):
            raise ConfigError("data.crop", f"must be 'center' or 'random', got {crop!r}")
        if not 0.0 <= hflip <= 1.0:
            raise ConfigError("data.hflip", f"is a probability in [0, 1], got {hflip}")
        if batch_size <= 0:
            raise ConfigError("data.batch_size", f"must be positive, got {batch_size}")
        source.check_loader_settings(resolution=resolution, batch_size=batch_size, drop_last=drop_last, hflip=hflip,
                                     flip_captions=flip_captions, num_workers=num_workers,
                                     persistent_workers=persistent_workers)  # fmt: skip
        self.source = source
        self.resolution = resolution
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers, self.pin_memory, self.drop_last, self.seed = num_workers, pin_memory, drop_last, seed
        if not 0.0 < max_skip_rate <= 1.0:
            raise ConfigError("data.max_skip_rate", f"is a fraction in (0, 1], got {max_skip_rate}")
        self.max_skip_rate, self.skip_rate_min_samples = max_skip_rate, skip_rate_min_samples
        self.persistent_workers = persistent_workers and num_workers > 0
        self.buckets = resolve_buckets(buckets, resolution)
        common = dict(resolution=resolution, min_size=min_size, require_caption=require_caption, buckets=self.buckets)
        self.train_prepare = SamplePreparer(crop=crop, hflip=hflip, flip_captions=flip_captions, **common)
        self.val_prepare = SamplePreparer(crop="center", hflip=0.0, **common)
        self._skips = {split: SkipCounter(num_workers) for split in ("train", "val")}
        self._restored: dict[str, Counter] = {"train": Counter(), "val": Counter()}
        self._restored_empty = {"train": 0, "val": 0}

    # ---------------------------------------------------------------------------------------- loaders
    def has_split(self, split: str) -> bool:
        if isinstance(self.source, IndexedSource):
            return self.source.size(split) > 0
        return self.source.has_split(split)

    def dataloader(self, split: str, shuffle: bool | None = None, for_steps: bool = False) -> DataLoader:
        """A loader over ``split`` (``train`` shuffles and uses the training transform).

        The training loader is resumable (:mod:`emu.data.resume`): its order and augmentations depend only on the
        seed and the epoch, and it starts where the Trainer's progress says (mid-epoch after a resume).
        A map-style batch with no good sample is dropped from the loader, unless ``for_steps`` (the Trainer's loaders,
        :meth:`train_dataloader` and :meth:`val_dataloader`): training then gets it, with its stand-in, for the step to
        skip in step with the other ranks; validation over several ranks gets its stand-in (:mod:`emu.data.batches`)."""
        train = split == "train"
        prepare = self.train_prepare if train else self.val_prepare
        batch_size = self.batch_size if train else self.val_batch_size
        drop_last = self.drop_last and train
        common: dict[str, Any] = dict(
            num_workers=self.num_workers, pin_memory=self.pin_memory, persistent_workers=self.persistent_workers,
            generator=torch.Generator().manual_seed(self.seed),  # never draws from the global RNG
        )  # fmt: skip
        skips = self._skips["train" if train else "val"]
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        if isinstance(self.source, WebDatasetSource):
            make = partial(self.source.stream, split, prepare, skips, batch_size, drop_last, world, self.num_workers)
            if not train:
                return DataLoader(make(), batch_size=None, **common)
            probe = make(0)
            length = len(probe) if hasattr(probe, "__len__") and self.source.epoch_size else None
            return ResumableLoader(EpochStream(make, length), batch_size=None, position=self._position, empty="keep",
                                   **common)  # a stream's batches are never empty  # fmt: skip
        empty = ("keep" if train else "stand_in" if world > 1 else "drop") if for_steps else "drop"
        dataset = PreparedDataset(self.source, split, prepare, skips, stand_ins=empty != "drop")
        common["empty"] = empty
        shuffle = train if shuffle is None else shuffle
        if self.buckets and self.trainer is not None and self.trainer.overfit_batches:
            raise ConfigError("data.buckets", "cannot be used with trainer.overfit_batches (Lightning swaps in a "
                              "sampler of single samples); overfit without buckets")  # fmt: skip
        if self.buckets:  # whole batches of one bucket from the sampler (a batch per item: batch_size=None)
            sampler = BucketSampler(self._bucket_of(self.source, split), batch_size, shuffle, self.seed, world, rank,
                                    drop_last)  # fmt: skip
            loader = ResumableLoader if train else BatchLoader
            extra = {"position": self._position} if train else {}
            return loader(dataset, batch_size=None, sampler=sampler, collate_fn=as_is, **extra, **common)
        if not train:
            return BatchLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                               collate_fn=as_is, **common)  # fmt: skip
        sampler = ResumableSampler(len(dataset), shuffle, self.seed, world, rank, drop_last)
        return ResumableLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                               collate_fn=as_is, position=self._position, **common)  # fmt: skip

    def _bucket_of(self, source: IndexedSource, split: str) -> list[int]:
        """The bucket number of every image of a map-style ``split`` (an unreadable one: 0; it is skipped anyway)."""
        target = self.train_prepare.target
        return [self.buckets.index(target(*wh)) if wh else 0 for wh in source.image_sizes(split)]

    # ------------------------------------------------------------------------------ pieces (precompute, curation)
    def num_pieces(self, split: str, piece_size: int) -> int:
        """How many pieces :meth:`piece_loader` reads ``split`` in: one per input shard of a stream, else one per
        ``piece_size`` indices."""
        if isinstance(self.source, WebDatasetSource):
            return len(self._piece_urls(split))
        return -(-self.source.size(split) // piece_size)

    def _piece_urls(self, split: str) -> list[str]:
        src = self.source
        return src.val_shards if split == "val" and src.val_shards else src.shards

    def piece_loader(self, split: str, piece: int, piece_size: int) -> DataLoader:
        """The samples of piece ``piece`` of ``split``, each once and in order, without augmentation (center crops in
        their buckets, no flips): the unit of work that precompute and curation deal out to the ranks of a job. The
        pieces of a split together are the split; a piece reads the same samples whatever the number of ranks."""
        prepare, skips = self.val_prepare, self._skips[split]
        common: dict[str, Any] = dict(num_workers=self.num_workers, pin_memory=self.pin_memory)
        if isinstance(self.source, WebDatasetSource):
            src = copy.copy(self.source)
            url = self._piece_urls(split)[piece]
            src.shards, src.val_shards = [url], ([url] if src.val_shards else None)
            src.shuffle_buffer, src.resampled, src.epoch_size = 0, False, None
            workers = min(self.num_workers, 1)  # one shard: one worker reads it (more would wait)
            stream = src.stream(split, prepare, skips, self.val_batch_size, False, 1, workers)
            return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=self.pin_memory)
        start = piece * piece_size
        view = SourceSlice(self.source, split, start, min(start + piece_size, self.source.size(split)))
        dataset = PreparedDataset(view, split, prepare, skips)
        if self.buckets:
            sampler = BucketSampler(self._bucket_of(view, split), self.val_batch_size, False, self.seed, 1, 0, False)
            return BatchLoader(dataset, batch_size=None, sampler=sampler, collate_fn=as_is, **common)
        return BatchLoader(dataset, batch_size=self.val_batch_size, shuffle=False, collate_fn=as_is, **common)

    def _position(self) -> tuple[int, int]:
        """(epoch, batches of it already done): where a training loader starts (non-zero only after a resume)."""
        trainer = self.trainer
        if trainer is None or trainer.fit_loop is None:
            return 0, 0
        # a checkpoint taken at the end of a batch restores it as processed but not completed
        progress = trainer.fit_loop.epoch_loop.batch_progress
        if progress.is_last_batch and progress.current.processed > 0:
            # saved on the epoch's last batch (before the epoch-end hooks): Lightning moves on to the next epoch
            # without asking for another iterator, so this one must already be the next epoch's
            return trainer.current_epoch + 1, 0
        return trainer.current_epoch, progress.current.processed

    def train_dataloader(self) -> DataLoader:
        return self.dataloader("train", for_steps=True)

    def val_dataloader(self) -> DataLoader | list:
        return self.dataloader("val", for_steps=True) if self.has_split("val") else []

    # ------------------------------------------------------------------------------------ skip counts
    @property
    def skipped(self) -> dict[str, Counter]:
        """Samples skipped so far, per split and reason (exact across workers; restored from checkpoints)."""
        return {split: self._restored[split] + c.totals() for split, c in self._skips.items()}

    @property
    def empty_batches(self) -> dict[str, int]:
        """Batches left with no good sample so far, per split (map-style sources; restored from checkpoints)."""
        return {split: self._restored_empty[split] + int(c.empty.sum()) for split, c in self._skips.items()}

    def skip_rate(self, split: str = "train") -> tuple[float, int, int]:
        """(fraction skipped, skipped, read) over the samples read so far in this process's loaders."""
        skipped = sum(self._skips[split].totals().values())
        read = skipped + int(self._skips[split].delivered.sum())
        return (skipped / read if read else 0.0), skipped, read

    def skip_summary(self) -> str:
        """One line per split with counts per reason, e.g. ``train: 3 skipped (empty_file 1, not_an_image 2)``."""
        lines = []
        empty = self.empty_batches
        for split, counts in self.skipped.items():
            if counts:
                detail = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
                batches = f", {empty[split]} batches with none left skipped" if empty[split] else ""
                lines.append(f"{split}: {sum(counts.values())} skipped ({detail}){batches}")
        return "; ".join(lines) if lines else "no samples skipped"

    def describe(self) -> dict[str, Any]:
        """What is trained on, for checkpoints and model cards: the source's kind and settings, size and batching."""
        src = self.source
        fields = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(src).items()
                  if not k.startswith("_") and isinstance(v, int | float | str | bool | Path)}  # fmt: skip
        for key in ("shards", "val_shards"):
            shards = getattr(src, key, None)
            if shards:
                fields[key] = f"{len(shards)} shards: {shards[0]}" + (f" ... {shards[-1]}" if len(shards) > 1 else "")
        buckets = {"buckets": [list(b) for b in self.buckets]} if self.buckets else {}
        return {"source": type(src).__name__, **fields, "resolution": self.resolution, "batch_size": self.batch_size,
                "seed": self.seed, **buckets}  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": {k: dict(v) for k, v in self.skipped.items()}, "empty_batches": self.empty_batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for split, counts in state_dict.get("skipped", {}).items():
            self._restored[split] = Counter(counts) - self._skips[split].totals()
        for split, n in state_dict.get("empty_batches", {}).items():
            self._restored_empty[split] = int(n) - int(self._skips[split].empty.sum())

"""Aspect-ratio buckets: training on images of many shapes without cropping each to a square (SDXL, NovelAI).

A bucket is a ``(width, height)`` of about the same pixel count as ``resolution²``, both sides multiples of the
model's downsampling. Each image goes to the bucket nearest its aspect ratio (:func:`nearest_bucket`), is resized to
cover it and cropped to it (:class:`~emu.data.samples.SamplePreparer`), and every batch holds one bucket:

* map-style sources: :class:`BucketSampler` groups an epoch's shuffled indices by bucket, a pure function of (seed,
  epoch) like :class:`~emu.data.resume.ResumableSampler`, and deals whole batches to the ranks, so a resume is exact
  and every rank's batches keep their shapes;
* streams (WebDataset, precomputed latents): :func:`bucket_batches` keeps one buffer per shape and lets a batch go
  when its buffer fills; the stream is already deterministic per epoch, so its batches are too.

``data.buckets`` is a list of ``[width, height]``, or ``{multiple, max_aspect}`` to generate them around
``data.resolution`` (:func:`make_buckets`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from emu.data.resume import ResumableSampler, sample_seed
from emu.errors import ConfigError

Bucket = tuple[int, int]  # (width, height) in pixels


def make_buckets(resolution: int, multiple: int, max_aspect: float = 2.0) -> list[Bucket]:
    """Buckets of about ``resolution²`` pixels with sides that are multiples of ``multiple``, aspect ratios up to
    ``max_aspect`` both ways (SDXL's list is this with 1024, 64 and 4): for each width from ``resolution`` up, the
    height that brings the area closest; each wide bucket has its tall twin. Sorted from tallest to widest."""
    if resolution <= 0 or multiple <= 0 or resolution % multiple:
        raise ConfigError("data.buckets.multiple", f"{multiple} must divide data.resolution={resolution}")
    if max_aspect < 1:
        raise ConfigError("data.buckets.max_aspect", f"must be >= 1, got {max_aspect}")
    area, wide = resolution * resolution, []
    w = resolution
    while True:
        h = max(multiple, round(area / w / multiple) * multiple)
        if w / h > max_aspect + 1e-9:
            break
        wide.append((w, h))
        w += multiple
    buckets = set(wide) | {(h, w) for w, h in wide}
    return sorted(buckets, key=lambda b: (b[0] / b[1], b[0]))


def resolve_buckets(spec: Any, resolution: int) -> list[Bucket] | None:
    """``data.buckets`` as a list of ``(width, height)``: None (square ``resolution`` crops), a list of pairs, or
    ``{multiple, max_aspect}`` (:func:`make_buckets`)."""
    if spec is None:
        return None
    if hasattr(spec, "keys"):
        unknown = set(spec.keys()) - {"multiple", "max_aspect"}
        if unknown or "multiple" not in spec:
            raise ConfigError("data.buckets", f"takes multiple and max_aspect (or a list of [width, height]), got "
                              f"{sorted(spec.keys())}")  # fmt: skip
        return make_buckets(resolution, int(spec["multiple"]), float(spec.get("max_aspect", 2.0)))
    try:
        buckets = [(int(w), int(h)) for w, h in spec]
    except (TypeError, ValueError) as e:
        raise ConfigError("data.buckets", f"must be a list of [width, height] pairs, got {spec!r}") from e
    if not buckets or any(w <= 0 or h <= 0 for w, h in buckets):
        raise ConfigError("data.buckets", f"needs at least one bucket, all sides positive; got {buckets}")
    if len(set(buckets)) != len(buckets):
        raise ConfigError("data.buckets", f"lists a bucket twice: {buckets}")
    return buckets


def nearest_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest the image's (in log ratio); ties go to the earlier bucket."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - ratio))


def check_buckets(buckets: Iterable[Bucket], multiple: int, what: str) -> None:
    """Raise :class:`ConfigError` unless every side is a multiple of ``multiple`` (the model's downsampling)."""
    bad = [b for b in buckets if b[0] % multiple or b[1] % multiple]
    if bad:
        raise ConfigError("data.buckets", f"{bad} have sides that are not multiples of {multiple} ({what})")


class BucketSampler(ResumableSampler):
    """Whole batches of one bucket each, for map-style sources; yields a batch (a list of ``(index, sample_seed)``)
    at a time, so the DataLoader runs with ``batch_size=None``.

    An epoch: the indices in the order of a permutation seeded by (seed, epoch) (or in order without ``shuffle``),
    each put in its bucket's buffer; a full buffer becomes a batch. Left-over partial buffers are dropped
    (``drop_last``) or become the last batches, in the order of ``buckets``. The batches are dealt to the ranks in turn,
    each rank getting the same number (the last few are dropped, or repeated from the start without
    ``drop_last``, as :class:`~torch.utils.data.DistributedSampler` pads). ``set_position(epoch, skip)`` skips
    ``skip`` of this rank's batches (a mid-epoch resume). A subclass of ``DistributedSampler``: Lightning leaves it
    in place under DDP.
    """

    def __init__(self, bucket_of: Sequence[int], batch_size: int, shuffle: bool, seed: int, num_replicas: int = 1,
                 rank: int = 0, drop_last: bool = True):  # fmt: skip
        super().__init__(len(bucket_of), shuffle, seed, num_replicas, rank, drop_last)
        self.bucket_of, self.batch_size = list(bucket_of), batch_size
        self._cache: tuple[int, list[list[int]]] | None = None

    def batches(self, epoch: int) -> list[list[int]]:
        """Every batch of ``epoch``, all ranks', in the order they are dealt."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        else:
            order = range(self.n)
        buffers: dict[int, list[int]] = {}
        out = []
        for i in order:
            buf = buffers.setdefault(self.bucket_of[i], [])
            buf.append(i)
            if len(buf) == self.batch_size:
                out.append(buffers.pop(self.bucket_of[i]))
        if not self.drop_last:
            out += [buffers[b] for b in sorted(buffers)]
        self._cache = (epoch, out)
        return out

    def _mine(self) -> list[list[int]]:
        batches, world = self.batches(self.epoch), self.num_replicas
        if self.drop_last:
            batches = batches[: len(batches) // world * world]
        elif batches and len(batches) % world:
            batches = batches + batches[: world - len(batches) % world]
        return batches[self.rank :: world]

    def __len__(self) -> int:
        return len(self._mine())

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self._mine()[self.skip :]:
            yield [(i, sample_seed(self.seed, self.epoch, i)) for i in batch]


def bucket_batches(samples: Iterator[dict[str, Any]], batch_size: int, collate: Callable, partial: bool,
                   shape: Callable[[dict[str, Any]], tuple]) -> Iterator[Any]:  # fmt: skip
    """A stream's samples in batches of one ``shape(sample)`` each: a batch goes as soon as its buffer is full; at the
    end, the partial buffers too when ``partial`` (smallest shape first)."""
    buffers: dict[tuple, list[dict[str, Any]]] = {}
    for sample in samples:
        key = tuple(shape(sample))
        buf = buffers.setdefault(key, [])
        buf.append(sample)
        if len(buf) == batch_size:
            yield collate(buffers.pop(key))
    if partial:
        for key in sorted(buffers):
            yield collate(buffers[key])

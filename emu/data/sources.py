"""Data sources: where raw samples come from. The DataModule turns them into batches.

Two kinds:

* :class:`IndexedSource` (map-style): ``size(split)`` and ``raw(split, i)``. :class:`FolderSource` reads a folder of
  images with captions (the miniature's haystack, rendered on the fly, is one too: :mod:`emu.mini.source`).
* :class:`WebDatasetSource` (streaming): img2dataset-layout tar shards through the ``webdataset`` library;
  it batches inside the workers.

A bad sample is never fed to the model: every source drops it (map-style sources from its batch, streaming ones
from the stream), never replaces it, and counts it by reason in a :class:`SkipCounter` shared with the DataLoader
workers. A map-style batch left with no good sample is an empty batch (:mod:`emu.data.batches`), counted too; the
training step skips it.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import braceexpand
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from emu.data.batches import empty_batch
from emu.data.buckets import bucket_batches
from emu.data.resume import sample_seed, seeded
from emu.data.samples import BadSample, collate, decode_image
from emu.errors import ConfigError

log = logging.getLogger("emu.data")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
SPLITS = ("train", "val")
_WARN_LIMIT = 10  # warnings printed per skip reason and process before going quiet


SKIP_REASONS = (
    "empty_file",
    "not_an_image",
    "corrupt_image",
    "truncated_image",
    "too_large",
    "too_small",
    "missing_image",
    "missing_caption",
    "empty_caption",
    "caption_not_utf8",
    "corrupt_metadata",
    "unreadable_file",
    "missing_shard",
    "truncated_shard",
    "shard_error",
    "pair_mismatch",
    "other",
)


class SkipCounter:
    """Counts skipped samples by reason across DataLoader workers, and warns about the first few of each.

    The counts live in a shared-memory table with one row per process (main + each worker), so the main
    process reads exact totals at any time, even for workers that never produced a batch.
    """

    def __init__(self, workers: int = 0) -> None:
        self.table = torch.zeros(workers + 1, len(SKIP_REASONS), dtype=torch.int64).share_memory_()
        self.delivered = torch.zeros(workers + 1, dtype=torch.int64).share_memory_()  # good samples, per process
        self.empty = torch.zeros(workers + 1, dtype=torch.int64).share_memory_()  # batches with none, per process
        self._warned: Counter = Counter()
        self._last_shard_error: tuple | None = None

    def count(self, reason: str, where: str, detail: str = "") -> None:
        info = get_worker_info()
        row = 0 if info is None else min(info.id + 1, self.table.shape[0] - 1)
        col = SKIP_REASONS.index(reason) if reason in SKIP_REASONS else len(SKIP_REASONS) - 1
        self.table[row, col] += 1
        self._warned[reason] += 1
        if self._warned[reason] <= _WARN_LIMIT:
            more = " (further ones are counted silently)" if self._warned[reason] == _WARN_LIMIT else ""
            log.warning("skipping %s: %s %s%s", where, reason, detail[:200], more)

    def _row(self) -> int:
        info = get_worker_info()
        return 0 if info is None else min(info.id + 1, self.delivered.shape[0] - 1)

    def ok(self) -> None:
        """Count one sample delivered (the denominator of the skip rate)."""
        self.delivered[self._row()] += 1

    def empty_batch(self) -> None:
        """Count one batch left with no good sample (skipped by the training step)."""
        self.empty[self._row()] += 1

    def totals(self) -> Counter:
        sums = self.table.sum(0).tolist()
        return Counter({r: int(n) for r, n in zip(SKIP_REASONS, sums, strict=True) if n})

    def handler(self, exn: Exception) -> bool:
        """webdataset error handler: count the shard-level failure and keep going."""
        text = " ".join(map(str, exn.args))
        named = re.search(r"name='([^']+)'", text)
        shard = named.group(1) if named else (str(exn.args[-1]) if exn.args else "shard")
        if (shard, type(exn)) == self._last_shard_error:
            return True  # webdataset reports one broken tar to the handler at two levels: count it once
        self._last_shard_error = (shard, type(exn))
        if isinstance(exn, FileNotFoundError):
            reason = "missing_shard"
        elif isinstance(exn, (tarfile.ReadError, EOFError)) or "truncat" in text.lower():
            reason = "truncated_shard"
        else:
            reason = "shard_error"
        self.count(reason, shard, repr(exn))
        return True


def in_split(key: str, split: str, val_fraction: float) -> bool:
    """Deterministic train/val split by a hash of the sample key (stable across runs and machines)."""
    is_val = zlib.crc32(key.encode()) % 100_000 < val_fraction * 100_000
    return is_val if split == "val" else not is_val


# ------------------------------------------------------------------------------------------ map-style
class IndexedSource:
    """A map-style source: ``size(split)`` samples, each read by ``raw(split, i)``."""

    def check_loader_settings(self, *, batch_size: int, drop_last: bool, **_: Any) -> None:
        """Raise :class:`ConfigError` for DataModule settings this source cannot serve (every source has one)."""
        if (n := self.size("train")) < batch_size and drop_last:
            raise ConfigError("data.batch_size", f"{batch_size} is larger than the {n} training samples (drop_last)")

    def size(self, split: str) -> int:
        raise NotImplementedError

    def raw(self, split: str, index: int) -> dict[str, Any]:
        raise NotImplementedError

    def image_sizes(self, split: str) -> list[tuple[int, int] | None]:
        """(width, height) of every image of ``split``, upright, as the DataModule's buckets need them before any
        batch is drawn (None: unreadable; it is counted when read). Measured once (:meth:`measure_sizes`)."""
        cache = self.__dict__.setdefault("_image_sizes", {})
        if split not in cache:
            cache[split] = self.measure_sizes(split)
        return cache[split]

    def measure_sizes(self, split: str, start: int = 0, stop: int | None = None) -> list[tuple[int, int] | None]:
        """Images ``start`` to ``stop`` (default: all). This default decodes each; sources override it with something
        cheaper (headers, metadata)."""
        sizes = []
        for i in range(start, self.size(split) if stop is None else stop):
            try:
                sizes.append(decode_image(self.raw(split, i)["image"]).size)
            except BadSample:
                sizes.append(None)
        return sizes


class SourceSlice(IndexedSource):
    """Indices ``[start, stop)`` of one split of a map-style source, as a source of their own (the same split name)."""

    def __init__(self, source: IndexedSource, split: str, start: int, stop: int):
        self.source, self.split, self.start, self.stop = source, split, start, stop

    def size(self, split: str) -> int:
        return self.stop - self.start if split == self.split else 0

    def raw(self, split: str, index: int) -> dict[str, Any]:
        return self.source.raw(split, self.start + index)

    def measure_sizes(self, split: str, start: int = 0, stop: int | None = None) -> list[tuple[int, int] | None]:
        """Only this slice's images are measured (each rank of a job measures its own pieces)."""
        stop = self.size(split) if stop is None else stop
        return self.source.measure_sizes(split, self.start + start, self.start + stop)


class PreparedDataset(Dataset):
    """``source`` samples passed through ``prepare``, read a batch at a time; a bad one is dropped and counted.

    :meth:`__getitems__` (the DataLoader's batched fetch, and :meth:`__getitem__` of a list: a whole batch from
    :class:`~emu.data.buckets.BucketSampler`) returns the batch's good samples, collated: a bad sample is counted and
    left out, never replaced, so no sample is delivered twice in an epoch and no good neighbour of a run of bad files
    is over-weighted; its batch is that much smaller (a WebDataset stream drops bad samples too). A batch with no good
    sample is an empty batch (:mod:`emu.data.batches`), counted; with ``stand_ins`` it carries the next good sample
    after its first index as its stand-in (read, not delivered: what a rank runs at zero weight while its peers train;
    more than ``max_consecutive_bad`` bad ones in a row there mean a broken dataset, an error). Deterministic in the
    indices and seeds asked for, so exactly resumable.
    """

    def __init__(self, source: IndexedSource, split: str, prepare: Callable, skips: SkipCounter,
                 stand_ins: bool = False, max_consecutive_bad: int = 64):  # fmt: skip
        self.source, self.split, self.prepare, self.skips = source, split, prepare, skips
        self.stand_ins, self.max_consecutive_bad = stand_ins, max_consecutive_bad
        self.n = source.size(split)

    def __len__(self) -> int:
        return self.n

    def _prepare(self, index: int, seed: int | None) -> dict[str, Any]:
        with seeded(seed):
            return self.prepare(self.source.raw(self.split, index))

    def __getitems__(self, items: list[int | tuple[int, int]]) -> dict[str, Any]:
        """The batch of ``items`` (indices, or ``(index, seed)`` pairs from :class:`~emu.data.resume.ResumableSampler`:
        the seed of the sample's augmentation) without its bad samples, collated; an empty batch when none is good."""
        out = []
        for item in items:
            index, seed = item if isinstance(item, tuple) else (item, None)
            try:
                out.append(self._prepare(index, seed))
            except BadSample as e:
                self.skips.count(e.reason, f"{self.split}[{index}]", str(e))
                continue
            self.skips.ok()
        if out:
            return collate(out)
        self.skips.empty_batch()
        stand_in = collate([self._next_good(items[0])]) if self.stand_ins and items else None
        width, height = self.prepare.target(1, 1) if hasattr(self.prepare, "target") else (0, 0)  # its nominal size
        return empty_batch(width, height, stand_in=stand_in)

    def __getitem__(self, item: int | tuple[int, int] | list) -> dict[str, Any]:
        """A list: a whole batch (as :meth:`__getitems__`). An index or ``(index, seed)``: that one sample, prepared
        (:class:`~emu.data.samples.BadSample` when it is bad, counted)."""
        if isinstance(item, list):
            return self.__getitems__(item)
        index, seed = item if isinstance(item, tuple) else (item, None)
        try:
            sample = self._prepare(index, seed)
        except BadSample as e:
            self.skips.count(e.reason, f"{self.split}[{index}]", str(e))
            raise
        self.skips.ok()
        return sample

    def _next_good(self, item: int | tuple[int, int]) -> dict[str, Any]:
        """The first good sample after ``item`` (a stand-in: not counted; the bad ones on the way are counted when
        their own batches read them)."""
        index, seed = item if isinstance(item, tuple) else (item, None)
        tries = min(self.max_consecutive_bad, self.n)
        for offset in range(1, tries):  # offset 0: the batch's first item, known bad
            try:
                return self._prepare((index + offset) % self.n, seed)
            except BadSample:
                continue
        what = f"all {tries} samples" if tries == self.n else f"{tries} consecutive samples from index {index}"
        raise RuntimeError(
            f"{what} of the {self.split} split are unusable; the dataset looks broken "
            f"(skipped so far: {dict(self.skips.totals())})"
        )


class FolderSource(IndexedSource):
    """A folder of images (searched recursively) with captions.

    Captions come from ``metadata.jsonl`` files (Hugging Face imagefolder: ``file_name`` relative to the
    jsonl's folder, ``text``; other fields become ``meta``) or, for rows without ``text``, from ``.txt`` files
    beside the images.
    The val split is a deterministic ``val_fraction`` of files by hash of their relative path.
    """

    def __init__(self, root: str, val_fraction: float = 0.05, caption_column: str = "text"):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise ConfigError("data.source.root", f"'{self.root}' is not a directory")
        self.val_fraction, self.caption_column = val_fraction, caption_column
        self.metadata: dict[str, dict] = {}
        self.malformed_metadata = 0
        for jsonl in sorted(self.root.rglob("metadata.jsonl")):
            self._read_metadata(jsonl)
        files = sorted(
            p.relative_to(self.root).as_posix()
            for p in self.root.rglob("*")
            if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS and p.is_file()
        )
        if not files:
            raise ConfigError("data.source.root", f"'{self.root}' holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
        self.files = {s: [f for f in files if in_split(f, s, val_fraction)] for s in SPLITS}
        if not self.files["train"]:
            raise ConfigError("data.source.val_fraction", f"leaves no training images in '{self.root}'")

    def _read_metadata(self, jsonl: Path) -> None:
        base = jsonl.parent.relative_to(self.root)
        for lineno, line in enumerate(jsonl.read_bytes().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name = (base / row["file_name"]).as_posix()
            except (ValueError, KeyError, TypeError) as e:
                self.malformed_metadata += 1
                log.warning("%s:%d: malformed metadata line skipped (%s)", jsonl, lineno, e)
                continue
            self.metadata[name] = row

    def size(self, split: str) -> int:
        return len(self.files[split])

    def raw(self, split: str, index: int) -> dict[str, Any]:
        name = self.files[split][index]
        path = self.root / name
        try:
            data = path.read_bytes()
        except OSError as e:
            raise BadSample("unreadable_file", f"{path}: {e}") from e
        row = self.metadata.get(name, {})
        caption = row.get(self.caption_column)
        if caption is None:  # no caption in metadata.jsonl: a .txt file beside the image
            txt = path.with_suffix(".txt")
            caption = txt.read_bytes() if txt.is_file() else None
        meta = {k: v for k, v in row.items() if k not in ("file_name", self.caption_column)}
        return {"key": name, "image": data, "caption": caption, "meta": meta}

    def measure_sizes(self, split: str, start: int = 0, stop: int | None = None) -> list[tuple[int, int] | None]:
        """From the files' headers (no decoding), turned upright by their EXIF orientation."""
        return [header_size(self.root / name) for name in self.files[split][start:stop]]


def header_size(path: Path) -> tuple[int, int] | None:
    """An image file's upright (width, height) from its header; None when it cannot be read."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            orientation = img.getexif().get(0x0112, 1)  # EXIF Orientation: 5-8 are turned a quarter
    except Exception:  # unreadable or not an image: the sample is skipped (and counted) when read
        return None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


# ----------------------------------------------------------------------------------------- streaming
def expand_shards(spec: str | list[str], what: str = "data.source.shards") -> list[str]:
    """Brace- and glob-expand shard specs (``/d/{00000..00099}.tar``, ``/d/*.tar``, or lists of them)."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for s in specs:
        for u in braceexpand.braceexpand(str(s)):
            if "://" in u or u.startswith("pipe:"):
                urls.append(u)
            elif any(c in u for c in "*?["):
                urls.extend(sorted(glob.glob(os.path.expanduser(u))))
            else:
                urls.append(os.path.expanduser(u))
    if not urls:
        raise ConfigError(what, f"'{spec}' matches no shards")
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    if local and not any(os.path.exists(u) for u in local):
        raise ConfigError(what, f"none of the {len(local)} shard paths exists (first: '{local[0]}')")
    return urls


def _raw_from_wds(sample: dict[str, Any], extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> dict[str, Any]:
    image = next((sample[k] for k in extensions if k in sample), None)
    meta: Any = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except ValueError as e:
            raise BadSample("corrupt_metadata", str(e)) from e
    return {"key": sample.get("__key__", "?"), "image": image, "caption": sample.get("txt"), "meta": meta}


def _prepare_stream(
    src: Iterator[dict],
    *,
    prepare: Callable,
    skips: SkipCounter,
    split: str,
    val_fraction: float,
    key_split: bool,
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
    seed: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Decode and check a stream of webdataset samples, dropping (and counting) the bad ones. With ``seed``, each
    sample's augmentation draws from a generator seeded by (seed, key), not from the process's RNG."""
    for sample in src:
        key = sample.get("__key__", "?")
        if key_split and not in_split(key, split, val_fraction):
            continue
        try:
            with seeded(None if seed is None else sample_seed(seed, 0, key)):
                prepared = prepare(_raw_from_wds(sample, extensions))
            skips.ok()
            yield prepared
        except BadSample as e:
            skips.count(e.reason, f"{sample.get('__url__', '?')}:{key}", str(e))


class WebDatasetSource:
    """img2dataset-layout tar shards (``{key}.jpg|png|webp`` + ``.txt`` + ``.json``) via ``webdataset``.

    Args:
        shards: brace/glob pattern(s) of the training shards (local paths, URLs or ``pipe:`` commands).
        val_shards: shards of the val split; when absent, a ``val_fraction`` of samples by key hash is held
            out of ``shards`` (fine for small corpora; large ones should name val shards).
        resampled: draw shards with replacement forever (multi-node pre-training); needs ``epoch_size``.
        epoch_size: samples per epoch across all ranks; sets the epoch length of resampled streams.
        shuffle_buffer: samples in the shuffle buffer (train only).
    """

    image_extensions = IMAGE_EXTENSIONS  # the sample fields read as the image, first found wins

    def __init__(
        self,
        shards: str | list[str],
        val_shards: str | list[str] | None = None,
        val_fraction: float = 0.02,
        resampled: bool = False,
        epoch_size: int | None = None,
        shuffle_buffer: int = 1000,
        seed: int = 0,
    ):
        self.shards = expand_shards(shards)
        self.val_shards = expand_shards(val_shards, "data.source.val_shards") if val_shards else None
        if resampled and not epoch_size:
            raise ConfigError("data.source.epoch_size", "is required when data.source.resampled=true")
        self.val_fraction, self.resampled, self.epoch_size = val_fraction, resampled, epoch_size
        self.shuffle_buffer, self.seed = shuffle_buffer, seed

    def check_loader_settings(self, *, persistent_workers: bool, num_workers: int, **_: Any) -> None:
        if persistent_workers and num_workers > 0:
            raise ConfigError("data.persistent_workers", "must be false for shard sources: their stream is "
                              "rebuilt each epoch (new order, exact resume), which persistent workers would not "
                              "see")  # fmt: skip

    def has_split(self, split: str) -> bool:
        return split == "train" or self.val_shards is not None or self.val_fraction > 0

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return collate(samples)

    def bucketed(self, prepare: Callable) -> bool:
        """Whether samples come in several shapes, to be batched by :meth:`sample_shape`."""
        return bool(getattr(prepare, "buckets", None))

    @staticmethod
    def sample_shape(sample: dict[str, Any]) -> tuple:
        return tuple(sample["image"].shape)

    def stream(
        self,
        split: str,
        prepare: Callable,
        skips: SkipCounter,
        batch_size: int,
        drop_last: bool,
        world_size: int = 1,
        workers: int = 0,
        epoch: int | None = None,
    ) -> IterableDataset:
        """A webdataset pipeline yielding collated batches (batching happens in the workers). With ``epoch``, the
        shard order, the shuffle buffer and each sample's augmentation are seeded from (seed, epoch): the epoch's
        stream is the same in every run (:class:`~emu.data.resume.EpochStream` rebuilds it per epoch)."""
        import webdataset as wds

        train = split == "train"
        seed = self.seed if epoch is None else self.seed * 1_000_003 + epoch
        urls = self.val_shards if (not train and self.val_shards) else self.shards
        if world_size > 1 and train and not self.resampled:  # found by the CPU rehearsal: a hang, not an error
            raise ConfigError("data.source.resampled", f"must be true when {world_size} ranks train on shards: read "
                              "once, the ranks' shards hold different numbers of batches, the rank that runs out "
                              "first stops while the others wait for it in their gradient all-reduce, and the run "
                              "hangs; set data.source.resampled=true and data.source.epoch_size")  # fmt: skip
        if world_size > 1 and not train and self.val_shards and len(urls) < world_size:
            raise ConfigError("data.source.val_shards", f"{len(urls)} shards for {world_size} ranks: a rank without "
                              "validation data never reaches the metrics' all-gather the others wait in; write at "
                              "least one val shard a rank")  # fmt: skip
        if train and self.resampled:
            stages: list = [wds.ResampledShards(urls, seed=seed, deterministic=True)]
        else:
            stages = [wds.SimpleShardList(urls)]
            if train:
                stages.append(wds.shuffle(len(urls), seed=seed))
            if len(urls) < max(1, world_size) * max(1, workers):
                log.warning(
                    "%d %s shards for %d ranks x %d workers: some workers get no data; write more, smaller shards",
                    len(urls),
                    split,
                    world_size,
                    workers,
                )
            # by node only in a multi-rank fit: webdataset reads the rank from torch.distributed or the RANK variable,
            # which a multi-rank precompute also sets while each of its ranks reads whole shards of its own
            stages += [wds.split_by_node, wds.split_by_worker] if world_size > 1 else [wds.split_by_worker]
        stages.append(wds.tarfile_to_samples(handler=skips.handler))
        if train and self.shuffle_buffer > 1:
            stages.append(wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100), seed=seed))
        key_split = self.val_shards is None
        stages.append(
            partial(
                _prepare_stream,
                prepare=prepare,
                skips=skips,
                split=split,
                val_fraction=self.val_fraction,
                key_split=key_split,
                extensions=self.image_extensions,
                seed=None if epoch is None else seed,
            )
        )
        if self.bucketed(prepare):  # batches of one shape each (emu.data.buckets)
            stages.append(partial(bucket_batches, batch_size=batch_size, collate=self.collate, partial=not drop_last,
                                  shape=self.sample_shape))  # fmt: skip
        else:
            stages.append(wds.batched(batch_size, collation_fn=self.collate, partial=not drop_last))
        pipeline = wds.DataPipeline(*stages)
        if train and self.epoch_size:
            per_worker = self.epoch_size // (batch_size * max(1, world_size) * max(1, workers))
            pipeline = pipeline.with_epoch(max(1, per_worker)).with_length(max(1, per_worker) * max(1, workers))
        return pipeline

"""The haystack as a data source (``data=haystack``: ``_target_: emu.mini.source.HaystackSource``), rendered on the
fly: an :class:`~emu.data.sources.IndexedSource` like a folder of images, so the real DataModule reads it unchanged."""

from __future__ import annotations

from typing import Any

from emu.data.sources import IndexedSource
from emu.errors import ConfigError
from emu.mini import haystack


class HaystackSource(IndexedSource):
    """The built-in miniature, rendered on the fly: train is indices [0, n_train), val the next n_val.

    ``cache=True`` keeps each rendered image (~12 KB at 64px) so that later epochs skip the rendering; each loader
    worker has its own cache, so pair it with ``data.persistent_workers=true`` (or ``num_workers=0``).
    """

    def __init__(self, n_train: int = 4096, n_val: int = 256, seed: int = 0, resolution: int = 64, cache: bool = False):
        if n_train <= 0:
            raise ConfigError("data.source.n_train", f"must be positive, got {n_train}")
        if n_val < 0:
            raise ConfigError("data.source.n_val", f"must be >= 0, got {n_val}")
        self.n_train, self.n_val, self.seed, self.resolution = n_train, n_val, seed, resolution
        self.cache: dict[int, tuple[Any, dict[str, Any]]] | None = {} if cache else None

    def size(self, split: str) -> int:
        return self.n_train if split == "train" else self.n_val

    def raw(self, split: str, index: int) -> dict[str, Any]:
        index += 0 if split == "train" else self.n_train
        if self.cache is not None and index in self.cache:
            image, meta = self.cache[index]
            image, meta = image.copy(), dict(meta)  # the cached ones stay as rendered
        else:
            image, meta = haystack.make_sample(self.seed, index, self.resolution)
            if self.cache is not None:
                self.cache[index] = (image.copy(), meta)
        return {"key": meta["key"], "image": image, "caption": meta["caption"], "meta": meta}

    def measure_sizes(self, split: str, start: int = 0, stop: int | None = None) -> list[tuple[int, int] | None]:
        offset, stop = (0 if split == "train" else self.n_train), (self.size(split) if stop is None else stop)
        return [haystack.image_size(self.seed, offset + i, self.resolution) for i in range(start, stop)]

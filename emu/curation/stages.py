"""The stages of the funnel: what each automatic stage scores and what it keeps.

An automatic :class:`Stage` sees batches of survivors (``image`` in [-1, 1], ``caption``, ``key``, ``meta``) and
returns one score per image (plus, optionally, an ``extra`` dict per image that a resumed run needs, such as a hash).
After the pass the :class:`KeepRule` turns all scores into kept / dropped. Scores are oriented so that the rule is
explicit: the text stage's score is letters found (keep ``max``), the CLIP score's a similarity (keep ``min``).

The decisions here are plain functions of images, scores and rows: :meth:`Stage.score` of a batch,
:meth:`KeepRule.select` / :meth:`KeepRule.stream` of scores, :meth:`Balance.select` of ranked rows, the distances of
:class:`~emu.curation.neighbours.EarlierNeighbours`. How a pass is shared by the pieces of the data and the ranks of a
job (the files per piece, the waits, the near-duplicate cells) is :mod:`emu.curation.pieces`: a stage's ``prepare``
and ``finish`` (what the funnel calls, with a :class:`~emu.curation.pieces.FunnelContext`) hand their decisions to it.
"""

from __future__ import annotations

import heapq
import importlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from emu.curation.neighbours import EarlierNeighbours, phash_batch, thumbnails
from emu.curation.ocr import TesseractText, tesseract_available
from emu.curation.pieces import (
    CurationError,
    FunnelContext,
    Keep,
    combine_cells,
    save_features,
    search_cells,
    search_in_order,
)
from emu.curation.tables import Table, kth_best
from emu.errors import ConfigError
from emu.text.aesthetic import AestheticHead
from emu.utils.images import to_uint8


@dataclass
class KeepRule:
    """Keep scores >= ``min`` and <= ``max``, then the ``top_k`` / ``top_fraction`` (of all scores) highest
    (``lowest=True``: lowest) of those; of equal scores at the cut, the first in the source's order."""

    min: float | None = None
    max: float | None = None
    top_k: int | None = None
    top_fraction: float | None = None
    lowest: bool = False

    def passes(self, score: float) -> bool:
        return (self.min is None or score >= self.min) and (self.max is None or score <= self.max)

    def stream(self, chunks: Callable[[], Iterator[np.ndarray]]) -> Callable[[float], bool]:
        """The decision for scores streamed by ``chunks()`` (a fresh pass per call, in the source's order): a function
        that must then be asked about every score once, in that order. A top rule finds its cut with
        :func:`~emu.curation.tables.kth_best`, so memory does not grow with the number of scores."""

        def passing() -> Iterator[np.ndarray]:
            for c in chunks():
                c = np.asarray(c, dtype=np.float64)
                if np.isnan(c).any():
                    raise CurationError(f"{int(np.isnan(c).sum())} scores are NaN: the rule {self.describe()!r} "
                                        "cannot order them")  # fmt: skip
                mask = np.ones(len(c), dtype=bool)
                if self.min is not None:
                    mask &= c >= self.min
                if self.max is not None:
                    mask &= c <= self.max
                yield c[mask]

        n = sum(len(c) for c in passing())
        k = n
        if self.top_fraction is not None:
            k = min(k, math.ceil(self.top_fraction * sum(len(c) for c in chunks())))
        if self.top_k is not None:
            k = min(k, self.top_k)
        if k == n:
            return self.passes
        if k <= 0:
            return lambda score: False
        cut, better = kth_best(passing, k, self.lowest)
        ties = k - better  # of the scores equal to the cut, the first `ties` are kept

        def keep(score: float) -> bool:
            nonlocal ties
            if not self.passes(score):
                return False
            if (score < cut) if self.lowest else (score > cut):
                return True
            if score == cut and ties > 0:
                ties -= 1
                return True
            return False

        return keep

    def select(self, scores: dict[str, float]) -> set[str]:
        """The kept keys of ``scores`` (in memory; the dict's order is the source's)."""
        keep = self.stream(lambda: iter([np.fromiter(scores.values(), dtype=np.float64, count=len(scores))]))
        return {k for k, s in scores.items() if keep(s)}

    def describe(self) -> str:
        parts = [
            f"score >= {self.min:g}" if self.min is not None else "",
            f"score <= {self.max:g}" if self.max is not None else "",
        ]
        if self.top_fraction is not None:
            parts.append(f"{'bottom' if self.lowest else 'top'} {100 * self.top_fraction:g}%")
        if self.top_k is not None:
            parts.append(f"{'bottom' if self.lowest else 'top'} {self.top_k}")
        return ", ".join(p for p in parts if p) or "keep all"


class Stage:
    """An automatic stage: ``name``, ``keep`` rule; subclasses implement :meth:`score`, the funnel calls :meth:`prepare`
    on every rank and :meth:`finish` on one."""

    needs_pixels = True
    kind = "automatic"
    enabled = True

    def __init__(self, name: str, keep: dict[str, Any] | None = None):
        self.name, self.keep = name, KeepRule(**(keep or {}))

    def prepare(self, ctx: FunnelContext, survivors: Table) -> None:
        """This rank's share of the pass: the survivors of each of its pieces scored (:meth:`score`) into the piece's
        table (:meth:`~emu.curation.pieces.FunnelContext.score_pieces`)."""
        ctx.score_pieces(self.name, survivors, self.score)

    def finish(self, ctx: FunnelContext, survivors: Table) -> Keep:
        """The rule's decision over every piece's scores in order (the same whatever the number of ranks)."""
        keep = self.keep.stream(ctx.piece_scores(self.name, survivors))
        return lambda key, row: keep(row["score"])

    def score(self, batch: dict[str, Any]) -> tuple[list[float], list[dict[str, Any]] | None]:
        raise NotImplementedError

    def describe(self) -> str:
        return self.keep.describe()


# ------------------------------------------------------------------------------------------------ size
class SizeAspect(Stage):
    """Shorter side of the source image (``meta.source_size``) >= ``min_size`` and aspect ratio <= ``max_aspect``;
    the score is the shorter side, 0 when the aspect ratio is too extreme."""

    def __init__(self, name: str = "size_aspect", min_size: int = 64, max_aspect: float = 2.0, keep=None):
        super().__init__(name, keep or {"min": min_size})
        self.min_size, self.max_aspect = min_size, max_aspect

    def score(self, batch):
        scores = []
        for meta, image in zip(batch["meta"], batch["image"], strict=True):
            w, h = meta.get("source_size") or (image.shape[-1], image.shape[-2])
            scores.append(float(min(w, h)) if max(w, h) / max(1, min(w, h)) <= self.max_aspect else 0.0)
        return scores, None


# ------------------------------------------------------------------------------------------------ duplicates
class NearDuplicates(Stage):
    """Score: distance of each image to the nearest image before it (in the source's order); keep ``min`` drops
    every image within ``max_distance`` of an earlier one.

    ``method``: ``thumbnail`` (RMS difference of standardised 16x16 RGB thumbnails, default) or ``phash`` (Hamming
    distance of 64-bit DCT perceptual hashes). ``index``: how the nearest earlier thumbnail is found
    (:class:`~emu.curation.neighbours.EarlierNeighbours`: faiss's ``hnsw`` graph by default, ``flat`` for exact
    search). The ranks of a job compute the features of their pieces (``scores/<stage>/<piece>.npz``). With ``cells``
    0 the order-dependent search is one pass over the pieces in order, in one process; with ``cells`` N
    (:class:`~emu.curation.neighbours.Cells`) the features are partitioned into N cells (k-means on up to
    ``train_size`` of them), each image searched in its ``probe`` nearest, and the ranks search the cells at once,
    each holding one cell's features at a time (``scores/<stage>/cells/``). Those passes over pieces and ranks are
    :mod:`emu.curation.pieces`'; the distances are :class:`~emu.curation.neighbours.EarlierNeighbours`'.
    """

    def __init__(self, name: str = "near_duplicates", method: str = "thumbnail", max_distance: float = 0.2,
                 thumbnail_size: int = 16, index: str = "hnsw", hnsw_m: int = 16, ef_search: int = 64,
                 cells: int = 0, probe: int = 2, train_size: int = 100_000, keep=None):  # fmt: skip
        if method not in ("thumbnail", "phash"):
            raise ConfigError(f"stages.{name}.method", f"must be thumbnail or phash, got {method!r}")
        if index not in ("hnsw", "flat"):
            raise ConfigError(f"stages.{name}.index", f"must be hnsw or flat, got {index!r}")
        if cells and method != "thumbnail":
            raise ConfigError(f"stages.{name}.cells", "partitions thumbnails (k-means); phash has no cells: use 0")
        if cells < 0 or (cells and not 1 <= probe <= cells):
            raise ConfigError(f"stages.{name}", f"needs cells >= 0 and 1 <= probe <= cells, got {cells} and {probe}")
        eps = 1e-6 if method == "thumbnail" else 1
        super().__init__(name, keep or {"min": max_distance + eps})
        self.method, self.size = method, thumbnail_size
        self.cells, self.probe, self.train_size = cells, probe, train_size
        self.neighbours = EarlierNeighbours(method, index, hnsw_m, ef_search)

    def features(self, images: torch.Tensor):
        return thumbnails(images, self.size) if self.method == "thumbnail" else phash_batch(images)

    def score(self, batch):
        """The distances of a batch's images to the images of earlier calls and earlier in the batch."""
        return self.neighbours.add(self.features(batch["image"])), None

    def describe(self) -> str:
        where = f", {self.cells} cells, probe {self.probe}" if self.cells else ""
        return f"{self.keep.describe()} ({self.method}, {self.neighbours.kind}{where})"

    def prepare(self, ctx: FunnelContext, survivors: Table) -> None:
        """Every rank: the features of its pieces; with cells, then the partition and its share of the cells."""
        empty = np.zeros((0, 3 * self.size**2), np.float32) if self.method == "thumbnail" else np.zeros(0, np.uint64)
        save_features(ctx, self.name, survivors, self.features, empty)
        if self.cells:
            n = self.neighbours
            plan = {"cells": self.cells, "probe": self.probe, "train_size": self.train_size, "index": n.kind,
                    "thumbnail_size": self.size, "hnsw_m": n.hnsw_m, "ef_search": n.ef_search}  # fmt: skip
            search_cells(ctx, self.name, n, self.cells, self.probe, self.train_size, plan)
            combine_cells(ctx, self.name, self.cells)

    def finish(self, ctx: FunnelContext, survivors: Table) -> Keep:
        """Without cells, the ordered search over every piece's features, into a score table per piece (with cells the
        ranks wrote those); then the rule."""
        if not self.cells:
            search_in_order(ctx, self.name, self.neighbours)
        return super().finish(ctx, survivors)


# ------------------------------------------------------------------------------------------------ CLIP based
class ClipScore(Stage):
    """CLIP similarity of caption and image (``100 * max(cos, 0)``) with the configured CLIP."""

    def __init__(self, clip, name: str = "clip_score", keep=None):
        super().__init__(name, keep or {"min": 20.0})
        self.clip = clip

    def score(self, batch):
        return self.clip.clip_score(batch["image"], list(batch["caption"])).tolist(), None


class Aesthetic(Stage):
    """The aesthetic head (:mod:`emu.text.aesthetic`, trained by :mod:`emu.curation.aesthetic`) on the CLIP image
    embedding."""

    def __init__(self, clip, head: str, name: str = "aesthetic", keep=None):
        super().__init__(name, keep or {"top_fraction": 0.25})
        self.clip, self.head = clip, AestheticHead.from_file(head)
        width = self.clip.model.config.projection_dim
        if self.head.input_size != width:
            raise ConfigError(
                "aesthetic.head", f"takes {self.head.input_size}-wide embeddings but the CLIP gives {width}"
            )

    @torch.no_grad()
    def score(self, batch):
        return self.head(self.clip.embed_images(batch["image"])).tolist(), None


class BestPerClass:
    """At most ``per_class`` keys of each class, highest rank first (of equal ranks, the first added): a bounded heap
    per class, so the memory is classes x ``per_class`` however many keys are added."""

    def __init__(self, per_class: int):
        self.per_class, self.heaps, self.added = per_class, {}, 0

    def add(self, key: str, cls: str, rank: float) -> None:
        heap = self.heaps.setdefault(cls, [])
        item = (rank, -self.added, key)  # the heap's top is the worst: lowest rank, then the latest
        self.added += 1
        if len(heap) < self.per_class:
            heapq.heappush(heap, item)
        elif item > heap[0]:
            heapq.heapreplace(heap, item)

    def kept(self) -> set[str]:
        return {key for heap in self.heaps.values() for _, _, key in heap}


class Balance(Stage):
    """Balance across visual concepts: each image gets a class by CLIP zero-shot over ``concepts`` (prompts), and at
    most ``per_class`` images per class are kept, best ``rank_by`` score first (a previous stage's)."""

    kind = "automatic"

    def __init__(self, clip, concepts: dict[str, str], per_class: int, rank_by: str, name: str = "balance"):
        super().__init__(name, {})
        if not concepts:
            raise ConfigError(f"stages.{name}.concepts", "needs at least one concept: name -> prompt")
        if per_class < 1:
            raise ConfigError(f"stages.{name}.per_class", f"must keep at least 1 image per concept, got {per_class}")
        self.clip, self.per_class, self.rank_by = clip, per_class, rank_by
        self.names = list(concepts)
        self.text = self.clip.embed_texts(list(concepts.values()))

    def score(self, batch):
        cls = (self.clip.embed_images(batch["image"]) @ self.text.T).argmax(-1).tolist()
        return [float(c) for c in cls], [{"concept": self.names[c]} for c in cls]

    def select(self, ranked: Iterable[tuple[dict[str, Any], float]]) -> set[str]:
        """The kept keys: ``ranked`` gives each survivor's row of this stage (its concept in ``extra``) and its
        ``rank_by`` score, in the source's order; the best ``per_class`` of each concept are kept."""
        best = BestPerClass(self.per_class)
        for row, rank in ranked:
            best.add(row["key"], row["extra"]["concept"], rank)
        return best.kept()

    def finish(self, ctx, survivors):
        """The best of each class by the ``rank_by`` stage's scores, read a piece at a time beside this stage's."""
        kept = self.select(ctx.ranked_rows(self.name, self.rank_by, survivors))
        return lambda key, row: key in kept

    def describe(self) -> str:
        return f"<= {self.per_class} per concept ({len(self.names)} concepts), best {self.rank_by} first"


# ------------------------------------------------------------------------------------------------ text, hook
class TextOverlay(Stage):
    """Letters of overlaid text found by OCR (keep ``max: max_letters``). ``engine``: ``tesseract``, ``auto``
    (Tesseract when installed, else the stage is skipped and the report says so) or ``off``."""

    def __init__(self, name: str = "text_overlay", engine: str = "auto", max_letters: int = 1, min_confidence=40.0,
                 threads: int = 2, keep=None):  # fmt: skip
        super().__init__(name, keep or {"max": max_letters})
        if engine not in ("auto", "tesseract", "off"):
            raise ConfigError(f"stages.{name}.engine", f"must be auto, tesseract or off, got {engine!r}")
        self.ocr = None
        if engine == "tesseract" or (engine == "auto" and tesseract_available()):
            self.ocr = TesseractText(min_confidence=min_confidence)
        self.engine = self.ocr.name if self.ocr else "off (Tesseract not installed)" if engine == "auto" else "off"
        self.threads = max(1, threads)

    @property
    def enabled(self) -> bool:
        return self.ocr is not None

    def score(self, batch):
        from concurrent.futures import ThreadPoolExecutor

        images = [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in to_uint8(batch["image"])]
        with ThreadPoolExecutor(self.threads) as pool:  # each OCR call is a Tesseract process
            return [float(n) for n in pool.map(self.ocr.letters, images)], None

    def describe(self) -> str:
        return f"{self.keep.describe()} letters ({self.engine})"


class ClassifierHook(Stage):
    """A pluggable classifier (e.g. offensive content): ``classifier`` is ``module:function`` taking a batch and
    returning one probability per image; keep ``max: threshold``. Disabled when ``classifier`` is null."""

    def __init__(self, name: str = "offensive", classifier: str | None = None, threshold: float = 0.5, keep=None):
        super().__init__(name, keep or {"max": threshold})
        self.fn = None
        if classifier:
            module, _, attr = classifier.partition(":")
            try:
                self.fn = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as e:
                raise ConfigError(f"stages.{name}.classifier", f"cannot import {classifier!r}: {e}") from e

    @property
    def enabled(self) -> bool:
        return self.fn is not None

    def score(self, batch):
        return [float(p) for p in self.fn(batch)], None

"""The stages of the funnel: what every stage is to the funnel, and the automatic ones.

To the funnel a stage is ``name``, ``kind``, ``enabled`` and ``describe()``, and either

- ``prepare(ctx, survivors)`` and ``finish(ctx, survivors)``: every rank scores the survivors of its pieces of the
  data into a file per piece (``scores/<stage>/<piece>.jsonl``: ``key``, ``score``, optionally ``extra``), then one
  rank's ``finish`` returns the decision, ``keep(key, row) -> bool``, which the funnel asks of every row in the
  source's order while it streams them into ``scores/<stage>.jsonl``. Nothing here holds a row per image of the
  corpus: the automatic stages scale with the corpus in time, not in memory;
- or ``run(ctx, survivors)``, returning ``(kept keys, rows)`` in memory: the human passes
  (:class:`emu.curation.human.HumanStage`), whose input people look at, so it is small.

``survivors`` is the previous stage's :class:`~emu.curation.tables.Table` (the index for the first stage), read a
piece at a time. The :class:`FunnelContext` ``ctx`` lends a stage the images of any piece, earlier stages' tables
and the output folder.

An automatic :class:`Stage` sees batches of survivors (``image`` in [-1, 1], ``caption``, ``key``, ``meta``) and
returns one score per image (plus, optionally, an ``extra`` dict per image that a resumed run needs, such as a hash).
After the pass the :class:`KeepRule` turns all scores into kept / dropped. Scores are oriented so that the rule is
explicit: the text stage's score is letters found (keep ``max``), the CLIP score's a similarity (keep ``min``).
"""

from __future__ import annotations

import heapq
import importlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from emu.curation.neighbours import Cells, EarlierNeighbours, phash_batch, search_cell, thumbnails
from emu.curation.ocr import TesseractText, tesseract_available
from emu.curation.tables import Table, kth_best
from emu.errors import ConfigError
from emu.text.aesthetic import AestheticHead
from emu.training.ranks import Ranks, share
from emu.utils.files import atomic_write_text
from emu.utils.images import to_uint8

log = logging.getLogger("emu.curation")


class CurationError(RuntimeError):
    """A stage that cannot go on (e.g. its rule keeps nothing); the message names the stage and the fix."""


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


Rows = dict[str, dict[str, Any]]  # key -> {"score": float, "extra": {...}?}
Keep = Callable[[str, dict[str, Any]], bool]  # a stage's decision: (key, row) -> kept, asked in the source's order


class IndexRows(Protocol):
    """What the funnel knows of each image, by piece (``rows(piece)``: key, caption, source size, hidden labels)."""

    def rows(self, piece: int) -> list[dict[str, Any]]: ...


@dataclass
class FunnelContext:
    """What the funnel lends a stage (and its writers) for a run.

    ``out`` is the funnel's folder and ``index`` its index (:class:`~emu.curation.tables.Table`: each image's caption,
    source size and hidden labels, a piece at a time). The data is read in ``pieces``
    (:meth:`~emu.data.EmuDataModule.piece_loader`: input shards, or runs of indices), in the source's order;
    ``batches(wanted, desc)`` yields the images ``{piece: keys}`` asks for, each once, piece after piece, and
    ``piece_batches(piece, keys, desc)`` one piece's images of ``keys`` (all when None); ``ranks`` says which pieces
    are this process's (:meth:`my_pieces`).
    """

    out: Path
    index: IndexRows | None
    batches: Callable[[dict[int, set[str]], str], Iterator[dict[str, Any]]]
    piece_batches: Callable[[int, set[str] | None, str], Iterator[dict[str, Any]]] | None = None
    pieces: int = 1
    ranks: Ranks = field(default_factory=Ranks)
    poll_seconds: float = 2.0
    progress: bool = False
    started: float = 0.0  # when this run started (older error files are another run's)
    wait_timeout_s: float = 86400.0

    def track(self, pieces: list[int], desc: str) -> Iterator[int]:
        """``pieces`` with a progress bar (pieces done, rate, time left) when the funnel shows progress."""
        bar = tqdm(pieces, desc=f"{desc} ({self.ranks.describe()})", unit="piece", disable=not self.progress,
                   leave=False)  # fmt: skip
        yield from bar

    def table(self, stage: str) -> Path:
        """``scores/<stage>.jsonl``: a finished stage's rows."""
        return self.out / "scores" / f"{stage}.jsonl"

    def piece_file(self, stage: str, piece: int, suffix: str = ".jsonl") -> Path:
        """``scores/<stage>/<piece>.jsonl``: what a stage made of one piece of the data."""
        return self.out / "scores" / stage / f"{piece:05d}{suffix}"

    def my_pieces(self) -> list[int]:
        return share(list(range(self.pieces)), self.ranks)

    def wait_for(self, paths: list[Path], what: str) -> None:
        """Until every path exists (the other ranks' pieces). A rank that fails writes ``errors/rank<r>.txt``
        (:meth:`report_failure`); one written since this run started stops the wait with its message, and so does
        ``wait_timeout_s`` without progress."""
        missing, last_progress = [p for p in paths if not p.is_file()], time.time()
        if missing and self.ranks.world > 1:
            log.info("%s: waiting for %d of %d files of %s from the other ranks", self.ranks.describe(),
                     len(missing), len(paths), what)  # fmt: skip
        while missing:
            for error in sorted((self.out / "errors").glob("rank*.txt")):
                if error.stat().st_mtime >= self.started - 1:
                    raise CurationError(f"{error.stem} failed, so {what} will not come: {error.read_text()}")
            if self.ranks.world == 1:
                raise CurationError(f"{len(missing)} files of {what} are missing (first: {missing[0]})")
            if time.time() - last_progress > self.wait_timeout_s:
                raise CurationError(f"waited {self.wait_timeout_s:.0f}s for {what} (first missing: {missing[0]}); is "
                                    "every rank of the job running?")  # fmt: skip
            time.sleep(self.poll_seconds)
            still = [p for p in missing if not p.is_file()]
            last_progress = time.time() if len(still) < len(missing) else last_progress
            missing = still

    def report_failure(self, error: BaseException) -> None:
        """Tell the other ranks (waiting in :meth:`wait_for`) that this one stopped, and why."""
        atomic_write_text(self.out / "errors" / f"rank{self.ranks.rank}.txt", f"{type(error).__name__}: {error}")

    def pieces_to_do(self, stage: str, survivors: Table, suffix: str = ".jsonl") -> Iterator[tuple[Path, Iterator]]:
        """This rank's unfinished pieces of a stage's pass: each piece's file and the batches of its survivors (none,
        without reading it, when it has no survivor)."""
        for piece in self.track(self.my_pieces(), stage):
            path = self.piece_file(stage, piece, suffix)
            if not path.is_file():
                mine = set(survivors.kept(piece))
                yield path, self.piece_batches(piece, mine, stage) if mine else iter(())

    def piece_rows(self, stage: str, survivors: Table) -> Iterator[tuple[int, list[dict[str, Any]]]]:
        """``(piece, rows)`` of the stage's piece tables (waiting for the other ranks'), one piece at a time, each
        piece's rows in its survivors' order; a survivor without its row (piece tables of another run) is an error,
        not a silent loss."""
        self.wait_for([self.piece_file(stage, p) for p in range(self.pieces)], f"stage {stage!r}")
        for piece in range(self.pieces):
            keys = survivors.kept(piece)
            if not keys:
                continue
            rows = {r["key"]: r for r in map(json.loads, self.piece_file(stage, piece).read_text().splitlines())}
            missing = [k for k in keys if k not in rows]
            if missing:
                raise CurationError(f"stage {stage!r}: {len(missing)} images of piece {piece} have no score in its "
                                    f"piece table (first: {missing[0]}): those come from another run; delete "
                                    f"{self.out / 'scores' / stage}")  # fmt: skip
            yield piece, [rows[k] for k in keys]

    def piece_scores(self, stage: str, survivors: Table) -> Callable[[], Iterator[np.ndarray]]:
        """A fresh stream, per call, of the stage's scores piece by piece (for :meth:`KeepRule.stream`)."""
        return lambda: (np.array([r["score"] for r in rows], dtype=np.float64)
                        for _, rows in self.piece_rows(stage, survivors))  # fmt: skip


def subset(batch: dict[str, Any], idx: list[int]) -> dict[str, Any]:
    """The images ``idx`` of a batch."""
    return {k: v[idx] if isinstance(v, torch.Tensor) else [v[i] for i in idx] for k, v in batch.items()}


class Stage:
    """An automatic stage: ``name``, ``keep`` rule; subclasses implement :meth:`score`, the funnel calls :meth:`prepare`
    on every rank and :meth:`finish` on one."""

    needs_pixels = True
    kind = "automatic"
    enabled = True

    def __init__(self, name: str, keep: dict[str, Any] | None = None):
        self.name, self.keep = name, KeepRule(**(keep or {}))

    def prepare(self, ctx: FunnelContext, survivors: Table) -> None:
        """This rank's share of the pass: the survivors of each of its pieces scored into the piece's table, written
        whole (a restarted run skips the finished pieces)."""
        for path, batches in ctx.pieces_to_do(self.name, survivors):
            lines = []
            for batch in batches:
                scores, extra = self.score(batch)
                for i, (key, score) in enumerate(zip(batch["key"], scores, strict=True)):
                    row = {"key": key, "score": float(score), **({"extra": extra[i]} if extra else {})}
                    lines.append(json.dumps(row) + "\n")
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, "".join(lines))

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
    each holding one cell's features at a time (``scores/<stage>/cells/``).
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
        for path, batches in ctx.pieces_to_do(self.name, survivors, ".npz"):
            keys, feats = [], []
            for batch in batches:
                keys += batch["key"]
                f = self.features(batch["image"])
                feats.append(f.numpy() if isinstance(f, torch.Tensor) else f)
            empty = (
                np.zeros((0, 3 * self.size**2), np.float32) if self.method == "thumbnail" else np.zeros(0, np.uint64)
            )
            _save_npz(path, keys=np.array(keys, dtype=str), features=np.concatenate(feats) if feats else empty)
        if self.cells:
            self._search_cells(ctx)
            self._combine_cells(ctx)

    # -------------------------------------------------------------------------------------- cells
    def _cell_file(self, ctx: FunnelContext, name: str) -> Path:
        return ctx.out / "scores" / self.name / "cells" / name

    def _search_cells(self, ctx: FunnelContext) -> None:
        """Partition (rank 0 trains the centroids), assign (each rank its pieces), search (each rank its cells:
        ``search_<cell>.npy``, its vectors' piece, row and distance, sorted by piece)."""
        features = [ctx.piece_file(self.name, p, ".npz") for p in range(ctx.pieces)]
        ctx.wait_for(features, f"stage {self.name!r}'s features")
        n = self.neighbours
        plan = {"cells": self.cells, "probe": self.probe, "train_size": self.train_size, "index": n.kind,
                "thumbnail_size": self.size, "hnsw_m": n.hnsw_m, "ef_search": n.ef_search}  # fmt: skip
        centroids = self._cell_file(ctx, "centroids.npz")
        if ctx.ranks.is_main and not centroids.is_file():
            sample, n = [], 0
            for path in features:  # the first train_size vectors, in the source's order
                with np.load(path) as f:
                    sample.append(f["features"][: self.train_size - n])
                n += len(sample[-1])
                if n >= self.train_size:
                    break
            cells = Cells.train(np.concatenate(sample), self.cells, self.probe)
            _save_npz(centroids, centroids=cells.centroids, plan=json.dumps(plan))
        ctx.wait_for([centroids], f"stage {self.name!r}'s cells")
        with np.load(centroids) as f:
            if json.loads(str(f["plan"])) != plan:
                raise CurationError(f"{centroids} holds cells made with {f['plan']}, not {plan}: delete "
                                    f"{centroids.parent} to partition again")  # fmt: skip
            cells = Cells(f["centroids"], self.probe)
        for piece in ctx.track(ctx.my_pieces(), f"{self.name} cells"):  # each vector's probe cells, sorted by cell
            out = self._cell_file(ctx, f"{piece:05d}.npz")
            if out.is_file():
                continue
            with np.load(ctx.piece_file(self.name, piece, ".npz")) as f:
                feats = f["features"]
            probed = cells.assign(feats) if len(feats) else np.zeros((0, cells.probe), np.int64)
            cell, row = probed.reshape(-1), np.repeat(np.arange(len(feats)), cells.probe)
            stored = (np.arange(cell.size) % cells.probe) == 0  # the nearest cell is the vector's own
            order = np.lexsort((row, cell))  # by cell, then in the piece's order
            np.save(out.with_suffix(".npy"), feats[row[order]])
            _save_npz(out, cell=cell[order], row=row[order], stored=stored[order])
        assigned = [self._cell_file(ctx, f"{p:05d}.npz") for p in range(ctx.pieces)]
        ctx.wait_for(assigned, f"stage {self.name!r}'s cell assignment")
        for c in ctx.track(share(list(range(self.cells)), ctx.ranks), f"{self.name} search"):
            out = self._cell_file(ctx, f"search_{c:05d}.npy")
            if out.is_file():
                continue
            found = self._search_cell(c, assigned)
            _save_whole(out, lambda tmp, found=found: np.save(tmp, found))

    def _search_cell(self, c: int, assigned: list[Path]) -> np.ndarray:
        """Cell ``c``'s ordered pass, reading only its slice of each piece: each of its vectors' piece, row in the
        piece and distance to the nearest earlier vector stored in the cell."""
        pieces, rows = [], []

        def chunks():
            for piece, path in enumerate(assigned):
                with np.load(path) as f:
                    lo, hi = np.searchsorted(f["cell"], [c, c + 1])
                    row, stored = f["row"][lo:hi], f["stored"][lo:hi]
                if hi > lo:
                    pieces.append(np.full(hi - lo, piece))
                    rows.append(row)
                    yield np.array(np.load(path.with_suffix(".npy"), mmap_mode="r")[lo:hi]), stored

        distances = list(search_cell(chunks(), self.neighbours))
        out = np.zeros(sum(len(d) for d in distances), dtype=[("piece", "<i8"), ("row", "<i8"), ("distance", "<f8")])
        if len(out):
            out["piece"], out["row"], out["distance"] = map(np.concatenate, (pieces, rows, distances))
        return out

    def _combine_cells(self, ctx: FunnelContext) -> None:
        """Each rank, for its pieces: every image's least distance over the cells it was searched in, into the
        piece's score table (each cell's results are read by memory map, only the piece's slice)."""
        searched = [self._cell_file(ctx, f"search_{c:05d}.npy") for c in range(self.cells)]
        ctx.wait_for(searched, f"stage {self.name!r}'s cells")
        for piece in ctx.track(ctx.my_pieces(), f"{self.name} combine"):
            path = ctx.piece_file(self.name, piece)
            if path.is_file():
                continue
            with np.load(ctx.piece_file(self.name, piece, ".npz")) as f:
                keys = f["keys"].tolist()
            scores = np.full(len(keys), np.inf)
            for cell in searched:
                found = np.load(cell, mmap_mode="r")
                lo, hi = np.searchsorted(found["piece"], [piece, piece + 1])
                np.minimum.at(scores, np.asarray(found["row"][lo:hi]), np.asarray(found["distance"][lo:hi]))
            rows = [json.dumps({"key": k, "score": d}) + "\n" for k, d in zip(keys, scores.tolist(), strict=True)]
            atomic_write_text(path, "".join(rows))

    def finish(self, ctx: FunnelContext, survivors: Table) -> Keep:
        """Without cells, the ordered search over every piece's features, into a score table per piece (with cells the
        ranks wrote those); then the rule."""
        if not self.cells:
            paths = [ctx.piece_file(self.name, p, ".npz") for p in range(ctx.pieces)]
            ctx.wait_for(paths, f"stage {self.name!r}")
            self.neighbours.reset()
            for piece, path in enumerate(ctx.track(paths, f"{self.name} search")):
                with np.load(path) as f:
                    keys, feats = f["keys"].tolist(), f["features"]
                scores = []
                for start in range(0, len(keys), 256):  # in batches, as the images came
                    scores += self.neighbours.add(feats[start : start + 256])
                rows = [json.dumps({"key": k, "score": d}) + "\n" for k, d in zip(keys, scores, strict=True)]
                atomic_write_text(ctx.piece_file(self.name, piece), "".join(rows))
        return super().finish(ctx, survivors)


def _save_whole(path: Path, save: Callable[[Path], None]) -> None:
    """``save`` to a temporary name of the same suffix, then renamed into place (a file that exists is whole)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.partial{path.suffix}")
    save(tmp)
    tmp.replace(path)


def _save_npz(path: Path, **arrays) -> None:
    _save_whole(path, lambda tmp: np.savez(tmp, **arrays))


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

    def finish(self, ctx, survivors):
        """The best of each class by the ``rank_by`` stage's scores, read a piece at a time beside this stage's."""
        if not Table.finished(ctx.table(self.rank_by)):
            raise CurationError(f"no scores of stage {self.rank_by!r} (balance.rank_by must name an earlier stage)")
        ranked, best = Table(ctx.table(self.rank_by)), BestPerClass(self.per_class)
        for piece, rows in ctx.piece_rows(self.name, survivors):
            rank = {r["key"]: r["score"] for r in ranked.rows(piece)}
            for r in rows:
                best.add(r["key"], r["extra"]["concept"], rank.get(r["key"], 0.0))
        kept = best.kept()
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

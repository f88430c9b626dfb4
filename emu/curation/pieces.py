"""How a stage's pass is shared out: the data in pieces, a file per piece, and the ranks of a job waiting for each
other's files. The stages (:mod:`emu.curation.stages`) decide what passes; this module moves their work through the
files and the ranks, and holds no decision of its own.

To the funnel a stage is ``name``, ``kind``, ``enabled`` and ``describe()``, and either

- ``prepare(ctx, survivors)`` and ``finish(ctx, survivors)``: every rank scores the survivors of its pieces of the
  data into a file per piece (``scores/<stage>/<piece>.jsonl``: ``key``, ``score``, optionally ``extra``;
  :meth:`FunnelContext.score_pieces`), then one rank's ``finish`` returns the decision, ``keep(key, row) -> bool``,
  which the funnel asks of every row in the source's order while it streams them into ``scores/<stage>.jsonl``.
  Nothing here holds a row per image of the corpus: the automatic stages scale with the corpus in time, not in memory;
- or ``run(ctx, survivors)``, returning ``(kept keys, rows)`` in memory: the human passes
  (:class:`emu.curation.human.HumanStage`), whose input people look at, so it is small.

``survivors`` is the previous stage's :class:`~emu.curation.tables.Table` (the index for the first stage), read a
piece at a time. The :class:`FunnelContext` ``ctx`` lends a stage the images of any piece, earlier stages' tables
and the output folder. A file that exists is whole (written to a temporary name, then renamed), so a restarted run
redoes only the pieces whose files are missing, and a rank waits for another's work by waiting for its files
(:meth:`FunnelContext.wait_for`).

The near-duplicate search is order-dependent, so it has its own passes here: the features of each piece, then either
one ordered search over all pieces in one process (:func:`search_in_order`) or the cells of
:class:`~emu.curation.neighbours.Cells` searched by all ranks at once (:func:`search_cells`, :func:`combine_cells`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from emu.curation.neighbours import Cells, EarlierNeighbours, search_cell
from emu.curation.tables import Table
from emu.training.ranks import Ranks, share
from emu.utils.files import atomic_save, atomic_write_text

log = logging.getLogger("emu.curation")


class CurationError(RuntimeError):
    """A stage that cannot go on (e.g. its rule keeps nothing); the message names the stage and the fix."""


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

    def score_pieces(self, stage: str, survivors: Table, score: Callable[[dict[str, Any]], tuple]) -> None:
        """This rank's share of a scoring pass: the survivors of each of its pieces scored by ``score(batch) ->
        (scores, extras or None)`` into the piece's table, written whole (a restarted run skips the finished
        pieces)."""
        for path, batches in self.pieces_to_do(stage, survivors):
            lines = []
            for batch in batches:
                scores, extra = score(batch)
                for i, (key, value) in enumerate(zip(batch["key"], scores, strict=True)):
                    row = {"key": key, "score": float(value), **({"extra": extra[i]} if extra else {})}
                    lines.append(json.dumps(row) + "\n")
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, "".join(lines))

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
        """A fresh stream, per call, of the stage's scores piece by piece (for
        :meth:`~emu.curation.stages.KeepRule.stream`)."""
        return lambda: (np.array([r["score"] for r in rows], dtype=np.float64)
                        for _, rows in self.piece_rows(stage, survivors))  # fmt: skip

    def ranked_rows(self, stage: str, rank_by: str, survivors: Table) -> Iterator[tuple[dict[str, Any], float]]:
        """Each survivor's row of ``stage`` (:meth:`piece_rows`) with its score in the finished earlier stage
        ``rank_by`` (0 when that has none), in the source's order, reading a piece of each at a time."""
        if not Table.finished(self.table(rank_by)):
            raise CurationError(f"no scores of stage {rank_by!r} ({stage}.rank_by must name an earlier stage)")
        ranked = Table(self.table(rank_by))
        for piece, rows in self.piece_rows(stage, survivors):
            rank = {r["key"]: r["score"] for r in ranked.rows(piece)}
            for r in rows:
                yield r, rank.get(r["key"], 0.0)


def subset(batch: dict[str, Any], idx: list[int]) -> dict[str, Any]:
    """The images ``idx`` of a batch."""
    return {k: v[idx] if isinstance(v, torch.Tensor) else [v[i] for i in idx] for k, v in batch.items()}


def _save_npz(path: Path, **arrays) -> None:
    atomic_save(path, lambda tmp: np.savez(tmp, **arrays))


def _write_distances(path: Path, keys: list[str], distances: list[float]) -> None:
    rows = [json.dumps({"key": k, "score": d}) + "\n" for k, d in zip(keys, distances, strict=True)]
    atomic_write_text(path, "".join(rows))


# ------------------------------------------------------------------------------------------------ near-duplicates
def save_features(ctx: FunnelContext, stage: str, survivors: Table, features: Callable, empty: np.ndarray) -> None:
    """Every rank: ``features(images)`` (a tensor or array per batch) of the survivors of its pieces, with their keys,
    into ``scores/<stage>/<piece>.npz`` (``empty``: a piece without survivors)."""
    for path, batches in ctx.pieces_to_do(stage, survivors, ".npz"):
        keys, feats = [], []
        for batch in batches:
            keys += batch["key"]
            f = features(batch["image"])
            feats.append(f.numpy() if isinstance(f, torch.Tensor) else f)
        _save_npz(path, keys=np.array(keys, dtype=str), features=np.concatenate(feats) if feats else empty)


def search_in_order(ctx: FunnelContext, stage: str, neighbours: EarlierNeighbours, batch: int = 256) -> None:
    """Without cells, on one rank: the ordered search over every piece's features (each image's distance to its
    nearest earlier image, in batches as the images came), into a score table per piece."""
    paths = [ctx.piece_file(stage, p, ".npz") for p in range(ctx.pieces)]
    ctx.wait_for(paths, f"stage {stage!r}")
    neighbours.reset()
    for piece, path in enumerate(ctx.track(paths, f"{stage} search")):
        with np.load(path) as f:
            keys, feats = f["keys"].tolist(), f["features"]
        scores = []
        for start in range(0, len(keys), batch):
            scores += neighbours.add(feats[start : start + batch])
        _write_distances(ctx.piece_file(stage, piece), keys, scores)


def _cell_file(ctx: FunnelContext, stage: str, name: str) -> Path:
    return ctx.out / "scores" / stage / "cells" / name


def search_cells(ctx: FunnelContext, stage: str, neighbours: EarlierNeighbours, cells: int, probe: int,
                 train_size: int, plan: dict[str, Any]) -> None:  # fmt: skip
    """Partition (rank 0 trains the ``cells`` centroids on the first ``train_size`` features; ``plan``, what made
    them, is kept beside them and another is refused), assign (each rank its pieces: each vector's ``probe`` cells),
    search (each rank its cells: ``search_<cell>.npy``, its vectors' piece, row and distance, sorted by piece)."""
    features = [ctx.piece_file(stage, p, ".npz") for p in range(ctx.pieces)]
    ctx.wait_for(features, f"stage {stage!r}'s features")
    centroids = _cell_file(ctx, stage, "centroids.npz")
    if ctx.ranks.is_main and not centroids.is_file():
        sample, n = [], 0
        for path in features:  # the first train_size vectors, in the source's order
            with np.load(path) as f:
                sample.append(f["features"][: train_size - n])
            n += len(sample[-1])
            if n >= train_size:
                break
        partition = Cells.train(np.concatenate(sample), cells, probe)
        _save_npz(centroids, centroids=partition.centroids, plan=json.dumps(plan))
    ctx.wait_for([centroids], f"stage {stage!r}'s cells")
    with np.load(centroids) as f:
        if json.loads(str(f["plan"])) != plan:
            raise CurationError(f"{centroids} holds cells made with {f['plan']}, not {plan}: delete "
                                f"{centroids.parent} to partition again")  # fmt: skip
        partition = Cells(f["centroids"], probe)
    for piece in ctx.track(ctx.my_pieces(), f"{stage} cells"):  # each vector's probe cells, sorted by cell
        out = _cell_file(ctx, stage, f"{piece:05d}.npz")
        if out.is_file():
            continue
        with np.load(ctx.piece_file(stage, piece, ".npz")) as f:
            feats = f["features"]
        probed = partition.assign(feats) if len(feats) else np.zeros((0, partition.probe), np.int64)
        cell, row = probed.reshape(-1), np.repeat(np.arange(len(feats)), partition.probe)
        stored = (np.arange(cell.size) % partition.probe) == 0  # the nearest cell is the vector's own
        order = np.lexsort((row, cell))  # by cell, then in the piece's order
        np.save(out.with_suffix(".npy"), feats[row[order]])
        _save_npz(out, cell=cell[order], row=row[order], stored=stored[order])
    assigned = [_cell_file(ctx, stage, f"{p:05d}.npz") for p in range(ctx.pieces)]
    ctx.wait_for(assigned, f"stage {stage!r}'s cell assignment")
    for c in ctx.track(share(list(range(cells)), ctx.ranks), f"{stage} search"):
        out = _cell_file(ctx, stage, f"search_{c:05d}.npy")
        if out.is_file():
            continue
        found = _search_cell(c, assigned, neighbours)
        atomic_save(out, lambda tmp, found=found: np.save(tmp, found))


def _search_cell(c: int, assigned: list[Path], neighbours: EarlierNeighbours) -> np.ndarray:
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

    distances = list(search_cell(chunks(), neighbours))
    out = np.zeros(sum(len(d) for d in distances), dtype=[("piece", "<i8"), ("row", "<i8"), ("distance", "<f8")])
    if len(out):
        out["piece"], out["row"], out["distance"] = map(np.concatenate, (pieces, rows, distances))
    return out


def combine_cells(ctx: FunnelContext, stage: str, cells: int) -> None:
    """Each rank, for its pieces: every image's least distance over the cells it was searched in, into the
    piece's score table (each cell's results are read by memory map, only the piece's slice)."""
    searched = [_cell_file(ctx, stage, f"search_{c:05d}.npy") for c in range(cells)]
    ctx.wait_for(searched, f"stage {stage!r}'s cells")
    for piece in ctx.track(ctx.my_pieces(), f"{stage} combine"):
        path = ctx.piece_file(stage, piece)
        if path.is_file():
            continue
        with np.load(ctx.piece_file(stage, piece, ".npz")) as f:
            keys = f["keys"].tolist()
        scores = np.full(len(keys), np.inf)
        for cell in searched:
            found = np.load(cell, mmap_mode="r")
            lo, hi = np.searchsorted(found["piece"], [piece, piece + 1])
            np.minimum.at(scores, np.asarray(found["row"][lo:hi]), np.asarray(found["distance"][lo:hi]))
        _write_distances(path, keys, scores.tolist())

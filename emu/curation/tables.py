"""The funnel's tables on disk, written and read one piece of the data at a time, and selection over streamed scores:
what keeps the funnel's memory independent of the corpus's size.

A table is a jsonl file, one row per image in the source's order (``key``, ``kept`` and the stage's fields), with
``<name>.pieces.json`` beside it: for each piece of the data, where its rows start in the file, how many there are and
how many were kept. :class:`Table` reads one piece's rows by seeking there; the images a stage kept are the next
stage's survivors. :func:`kth_best` finds a top-k rule's cut (the k-th best score) in a few streaming passes with a
histogram of 65,536 bins, so a ``top_fraction`` over a billion scores never holds them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np


def pieces_file(path: str | Path) -> Path:
    """``<name>.pieces.json`` beside the table ``<name>.jsonl``: its index by piece, written last."""
    path = Path(path)
    return path.with_name(path.stem + ".pieces.json")


class TableWriter:
    """Writes a table piece by piece, in piece order, to ``.<pid>.tmp`` names; :meth:`close` puts the rows and then
    the piece index in place (a table without its piece index is unfinished)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        self.file = self.tmp.open("w")
        self.pieces: list[dict[str, int]] = []

    def add(self, piece: int, rows: list[dict[str, Any]]) -> None:
        """One piece's rows (each with ``key``; ``kept`` true when absent)."""
        if self.pieces and piece <= self.pieces[-1]["piece"]:
            raise ValueError(f"piece {piece} after piece {self.pieces[-1]['piece']}: pieces go in order")
        offset = self.file.tell()
        for row in rows:
            self.file.write(json.dumps(row) + "\n")
        kept = sum(bool(r.get("kept", True)) for r in rows)
        self.pieces.append({"piece": piece, "offset": offset, "rows": len(rows), "kept": kept})

    def close(self) -> Table:
        self.file.close()
        index, tmp = pieces_file(self.path), pieces_file(self.path).with_suffix(f".{os.getpid()}.tmp")
        index.unlink(missing_ok=True)  # an older table's index must never describe these rows
        self.tmp.replace(self.path)
        tmp.write_text(json.dumps(self.pieces))
        tmp.replace(index)
        return Table(self.path)

    def discard(self) -> None:
        """Drop what was written (a stage that stopped with an error)."""
        self.file.close()
        self.tmp.unlink(missing_ok=True)


class Table:
    """A finished table: its rows one piece at a time, and the keys it kept (the next stage's survivors)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.pieces = {int(p["piece"]): p for p in json.loads(pieces_file(self.path).read_text())}

    @staticmethod
    def finished(path: str | Path) -> bool:
        return Path(path).is_file() and pieces_file(path).is_file()

    def rows(self, piece: int) -> list[dict[str, Any]]:
        """The rows of one piece (none when the table has no row of it)."""
        info = self.pieces.get(piece)
        if not info or not info["rows"]:
            return []
        with self.path.open() as f:
            f.seek(info["offset"])
            return [json.loads(f.readline()) for _ in range(info["rows"])]

    def kept(self, piece: int) -> list[str]:
        """The keys of one piece that the table kept, in order."""
        return [r["key"] for r in self.rows(piece) if r.get("kept", True)]

    def kept_by_piece(self) -> Iterator[tuple[int, list[str]]]:
        """``(piece, kept keys)`` for every piece with a kept image, in order."""
        for piece in sorted(self.pieces):
            if self.pieces[piece]["kept"]:
                yield piece, self.kept(piece)

    def __iter__(self) -> Iterator[str]:
        for _, keys in self.kept_by_piece():
            yield from keys

    def __len__(self) -> int:
        """How many images the table kept."""
        return sum(p["kept"] for p in self.pieces.values())

    @property
    def n_rows(self) -> int:
        return sum(p["rows"] for p in self.pieces.values())


# ------------------------------------------------------------------------------------------------ selection
_DIGITS = 1 << 16


def _order_keys(values: np.ndarray) -> np.ndarray:
    """uint64 keys that sort as the float64 ``values`` do (-0.0 counts as 0.0)."""
    u = (np.asarray(values, dtype=np.float64) + 0.0).view(np.uint64)
    negative = (u >> np.uint64(63)).astype(bool)
    return np.where(negative, ~u, u | np.uint64(1 << 63))


def kth_best(chunks: Callable[[], Iterable[np.ndarray]], k: int, lowest: bool = False,
             small: int = _DIGITS) -> tuple[float, int]:  # fmt: skip
    """The ``k``-th best (1-based) of the values that ``chunks()`` streams (highest first; ``lowest``: lowest first),
    and how many values are strictly better than it. Memory stays bounded: each pass fixes 16 more bits of the
    answer with a histogram, until at most ``small`` candidates are left, which are then sorted."""
    total = sum(len(c) for c in chunks())
    if not 1 <= k <= total:
        raise ValueError(f"k={k} of {total} values")
    prefix, bits, better, count = 0, 0, 0, total  # the answer's first `bits` bits; values before that bucket

    def in_bucket(c: np.ndarray) -> np.ndarray:
        keys = _order_keys(c)
        keys = ~keys if lowest else keys  # best first = largest key first
        return keys[keys >> np.uint64(64 - bits) == np.uint64(prefix)] if bits else keys

    while count > small and bits < 64:
        hist = np.zeros(_DIGITS, np.int64)
        for c in chunks():
            keys = in_bucket(c)
            hist += np.bincount((keys >> np.uint64(48 - bits) & np.uint64(_DIGITS - 1)).astype(np.int64),
                                minlength=_DIGITS)  # fmt: skip
        above = np.cumsum(hist[::-1])  # values in this digit or a better one, best digit first
        j = int(np.searchsorted(above, k))  # the first digit (from the best) where k is reached
        digit = _DIGITS - 1 - j
        before = int(above[j - 1]) if j else 0
        better, k, count = better + before, k - before, int(hist[digit])
        prefix, bits = (prefix << 16) | digit, bits + 16
    if count > small:  # all 64 bits fixed: every candidate left is the same value
        cut = np.uint64(prefix)
    else:
        keys = np.sort(np.concatenate([in_bucket(c) for c in chunks()] or [np.zeros(0, np.uint64)]))[::-1]
        cut = keys[k - 1]
        better += int((keys > cut).sum())
    cut = ~cut if lowest else cut
    value = (cut & ~np.uint64(1 << 63)) if cut >> np.uint64(63) else ~cut  # back from the order key
    return float(np.array([value], np.uint64).view(np.float64)[0]), better


def quantiles(chunks: Callable[[], Iterable[np.ndarray]], fractions: Iterable[float]) -> list[float]:
    """Quantiles (lowest value first) of streamed values, in bounded memory; none when there are no values."""
    n = sum(len(c) for c in chunks())
    return [kth_best(chunks, 1 + int(f * (n - 1)), lowest=True)[0] for f in fractions] if n else []

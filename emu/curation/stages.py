"""The stages of the funnel: what every stage is to the funnel, and the automatic ones.

To the funnel a stage is ``name``, ``kind``, ``enabled``, ``describe()`` and ``run(ctx, survivors)``, which returns
``(kept keys, rows)``: a row per survivor with its ``score`` (and optionally ``extra``) for ``scores/<stage>.jsonl``.
A stage that can share its work between the ranks of a job splits ``run`` into ``prepare`` (every rank: its pieces of
the data, each piece's result in a file of its own) and ``finish`` (one rank: merge the pieces in order and decide).
The :class:`FunnelContext` ``ctx`` lends it the images of any key set or piece, the index, earlier stages' scores and
the output folder. The human passes are :class:`emu.curation.human.HumanStage`.

An automatic :class:`Stage` sees batches of survivors (``image`` in [-1, 1], ``caption``, ``key``, ``meta``) and
returns one score per image (plus, optionally, an ``extra`` dict per image that a resumed run needs, such as a hash).
After the pass the :class:`KeepRule` turns all scores into kept / dropped. Scores are oriented so that the rule is
explicit: the text stage's score is letters found (keep ``max``), the CLIP score's a similarity (keep ``min``).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from emu.curation.ocr import TesseractText, tesseract_available
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
    """Keep scores >= ``min`` and <= ``max``, then the ``top_k`` / ``top_fraction`` highest (``lowest=True``:
    lowest) of those."""

    min: float | None = None
    max: float | None = None
    top_k: int | None = None
    top_fraction: float | None = None
    lowest: bool = False

    def select(self, scores: dict[str, float]) -> set[str]:
        keys = [
            k for k, s in scores.items() if (self.min is None or s >= self.min) and (self.max is None or s <= self.max)
        ]
        k = len(keys)
        if self.top_fraction is not None:
            k = min(k, math.ceil(self.top_fraction * len(scores)))
        if self.top_k is not None:
            k = min(k, self.top_k)
        keys.sort(key=lambda key: (scores[key] if self.lowest else -scores[key], key))
        return set(keys[:k])

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


@dataclass
class FunnelContext:
    """What the funnel lends a stage (and its writers) for a run.

    ``out`` is the funnel's folder, ``index`` maps each key to its caption, source size and hidden labels, and
    ``batches(keys, desc)`` yields the images of ``keys`` (all when None), each once, in the source's order. The data
    is read in ``pieces`` (:meth:`~emu.data.EmuDataModule.piece_loader`: input shards, or runs of indices), in the
    source's order; ``piece_batches(piece, keys, desc)`` yields one piece's images of ``keys``; ``ranks`` says which
    pieces are this process's (:meth:`my_pieces`).
    """

    out: Path
    index: dict[str, dict[str, Any]]
    batches: Callable[[set[str] | None, str], Iterator[dict[str, Any]]]
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

    def pieces_to_do(self, stage: str, survivors: list[str], suffix: str = ".jsonl") -> Iterator[tuple[Path, Iterator]]:
        """This rank's unfinished pieces of a stage's pass: each piece's file and the batches of its survivors (none,
        without reading it, when it has no survivor)."""
        wanted = self.by_piece(survivors)
        for piece in self.track(self.my_pieces(), stage):
            path = self.piece_file(stage, piece, suffix)
            if not path.is_file():
                mine = wanted.get(piece)
                yield path, self.piece_batches(piece, mine, stage) if mine else iter(())

    def by_piece(self, keys: list[str]) -> dict[int, set[str]]:
        """``keys`` grouped by the piece each was first read from (the index's ``piece``)."""
        groups: dict[int, set[str]] = {}
        for k in keys:
            groups.setdefault(self.index[k]["piece"], set()).add(k)
        return groups

    def gather(self, stage: str, survivors: list[str]) -> Rows:
        """Every survivor's row from the stage's piece tables (waiting for the other ranks'), in survivor order; a
        survivor without its row (piece tables of another run) is an error, not a silent loss."""
        paths = [self.piece_file(stage, p) for p in range(self.pieces)]
        self.wait_for(paths, f"stage {stage!r}")
        rows: Rows = {}
        for path in paths:
            for line in path.read_text().splitlines():
                r = json.loads(line)
                rows[r.pop("key")] = r
        missing = [k for k in survivors if k not in rows]
        if missing:
            raise CurationError(f"stage {stage!r}: {len(missing)} images have no score in its piece tables (first: "
                                f"{missing[0]}): those come from another run; delete "
                                f"{self.out / 'scores' / stage}")  # fmt: skip
        return {k: rows[k] for k in survivors}

    def scores(self, stage: str) -> dict[str, float]:
        """A finished stage's scores by key."""
        return {r["key"]: r["score"] for r in map(json.loads, self.table(stage).read_text().splitlines())}


def subset(batch: dict[str, Any], idx: list[int]) -> dict[str, Any]:
    """The images ``idx`` of a batch."""
    return {k: v[idx] if isinstance(v, torch.Tensor) else [v[i] for i in idx] for k, v in batch.items()}


class Stage:
    """An automatic stage: ``name``, ``keep`` rule; subclasses implement :meth:`score`, the funnel calls :meth:`prepare`
    on every rank and :meth:`finish` on one (:meth:`run`: both, in one process)."""

    needs_pixels = True
    kind = "automatic"
    enabled = True

    def __init__(self, name: str, keep: dict[str, Any] | None = None):
        self.name, self.keep = name, KeepRule(**(keep or {}))

    def run(self, ctx: FunnelContext, survivors: list[str]) -> tuple[set[str], Rows]:
        self.prepare(ctx, survivors)
        return self.finish(ctx, survivors)

    def prepare(self, ctx: FunnelContext, survivors: list[str]) -> None:
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

    def finish(self, ctx: FunnelContext, survivors: list[str]) -> tuple[set[str], Rows]:
        """Every piece's rows, merged in order (the same whatever the number of ranks), and the rule's decision."""
        rows = ctx.gather(self.name, survivors)
        return self.select(rows), rows

    def score(self, batch: dict[str, Any]) -> tuple[list[float], list[dict[str, Any]] | None]:
        raise NotImplementedError

    def select(self, rows: Rows) -> set[str]:
        return self.keep.select({k: r["score"] for k, r in rows.items()})

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
def phash_batch(images: torch.Tensor, size: int = 8, oversample: int = 4) -> np.ndarray:
    """DCT perceptual hashes (uint64) of images in [-1, 1]: the low ``size x size`` frequencies of a 32x32 grayscale,
    thresholded at their median (DC excluded)."""
    n = size * oversample
    gray = (images.float() * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    x = torch.nn.functional.interpolate(gray, size=(n, n), mode="area").squeeze(1).double()
    k = torch.arange(n, dtype=torch.float64)
    dct = torch.cos(torch.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n))  # DCT-II basis (rows: frequencies)
    low = (dct @ x @ dct.T)[:, :size, :size].flatten(1)
    bits = (low > low[:, 1:].median(dim=1, keepdim=True).values).numpy()
    return np.packbits(bits, axis=1).view(">u8").astype(np.uint64).ravel()


def phash(image: Image.Image) -> int:
    """The perceptual hash of one PIL image (see :func:`phash_batch`)."""
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    return int(phash_batch(x)[0])


def thumbnails(images: torch.Tensor, size: int = 16) -> torch.Tensor:
    """Standardised RGB thumbnails (zero mean, unit std per image), flattened: exposure changes barely move them."""
    t = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="area").flatten(1)
    t = t - t.mean(1, keepdim=True)
    return t / t.std(1, keepdim=True).clamp_min(1e-3)


class EarlierNeighbours:
    """Distance of each new feature vector to its nearest among all vectors seen before it (in the order given).

    ``index``: ``hnsw`` (faiss's approximate HNSW graph: about log N per query, the default), ``flat`` (faiss's exact
    search: N per query) for ``thumbnail`` features, measured as the RMS difference; ``phash`` features (uint64 hashes)
    are compared exactly by Hamming distance. faiss builds the graph on one thread, so that its result does not depend
    on thread timing.
    """

    def __init__(self, method: str = "thumbnail", index: str = "hnsw", hnsw_m: int = 16, ef_search: int = 64,
                 ef_construction: int = 40):  # fmt: skip
        self.method, self.kind = method, index
        self.hnsw_m, self.ef_search, self.ef_construction = hnsw_m, ef_search, ef_construction
        self.reset()

    def reset(self) -> None:
        self.index = None
        self.hashes: list[np.ndarray] = []

    def _faiss(self, dim: int):
        import faiss

        faiss.omp_set_num_threads(1)
        if self.kind == "flat":
            return faiss.IndexFlatL2(dim)
        index = faiss.IndexHNSWFlat(dim, self.hnsw_m)
        index.hnsw.efConstruction, index.hnsw.efSearch = self.ef_construction, self.ef_search
        return index

    def add(self, feats) -> list[float]:
        """The distances of ``feats`` (in order) to their nearest earlier vector (1e9 for the first); then remembers
        them."""
        if self.method == "phash":
            seen = np.concatenate(self.hashes) if self.hashes else np.zeros(0, np.uint64)
            count = np.bitwise_count
            out = [float(min(count(seen ^ h).min(initial=64), count(feats[:i] ^ h).min(initial=64)))
                   for i, h in enumerate(feats)]  # fmt: skip
            self.hashes.append(feats)
            return out
        x = np.ascontiguousarray(feats.numpy() if isinstance(feats, torch.Tensor) else feats, dtype=np.float32)
        dim = x.shape[1]
        if self.index is None:
            self.index = self._faiss(dim)
        if self.index.ntotal:
            d2, _ = self.index.search(x, 1)
            d_seen = torch.from_numpy(np.sqrt(np.maximum(d2[:, 0], 0.0))).double() / dim**0.5
        else:
            d_seen = torch.full((len(x),), 1e9, dtype=torch.float64)
        t = torch.from_numpy(x)  # earlier in the same batch: exact (a batch is small)
        d_self = torch.cdist(t, t).double() / dim**0.5 + torch.triu(torch.full((len(x),) * 2, 1e9, dtype=torch.float64))
        self.index.add(x)
        return torch.minimum(d_seen, d_self.min(1).values).tolist()


class NearDuplicates(Stage):
    """Score: distance of each image to the nearest image before it (in the source's order); keep ``min`` drops
    every image within ``max_distance`` of an earlier one.

    ``method``: ``thumbnail`` (RMS difference of standardised 16x16 RGB thumbnails, default) or ``phash`` (Hamming
    distance of 64-bit DCT perceptual hashes). ``index``: how the nearest earlier thumbnail is found
    (:class:`EarlierNeighbours`: faiss's ``hnsw`` graph by default, ``flat`` for exact search). The ranks of a job
    compute the features of their pieces (``scores/<stage>/<piece>.npz``); the order-dependent search then runs over
    the pieces in order, in one process.
    """

    def __init__(self, name: str = "near_duplicates", method: str = "thumbnail", max_distance: float = 0.2,
                 thumbnail_size: int = 16, index: str = "hnsw", hnsw_m: int = 16, ef_search: int = 64,
                 keep=None):  # fmt: skip
        if method not in ("thumbnail", "phash"):
            raise ConfigError(f"stages.{name}.method", f"must be thumbnail or phash, got {method!r}")
        if index not in ("hnsw", "flat"):
            raise ConfigError(f"stages.{name}.index", f"must be hnsw or flat, got {index!r}")
        eps = 1e-6 if method == "thumbnail" else 1
        super().__init__(name, keep or {"min": max_distance + eps})
        self.method, self.size = method, thumbnail_size
        self.neighbours = EarlierNeighbours(method, index, hnsw_m, ef_search)

    def features(self, images: torch.Tensor):
        return thumbnails(images, self.size) if self.method == "thumbnail" else phash_batch(images)

    def score(self, batch):
        """The distances of a batch's images to the images of earlier calls and earlier in the batch."""
        return self.neighbours.add(self.features(batch["image"])), None

    def prepare(self, ctx: FunnelContext, survivors: list[str]) -> None:
        for path, batches in ctx.pieces_to_do(self.name, survivors, ".npz"):
            keys, feats = [], []
            for batch in batches:
                keys += batch["key"]
                f = self.features(batch["image"])
                feats.append(f.numpy() if isinstance(f, torch.Tensor) else f)
            path.parent.mkdir(parents=True, exist_ok=True)
            empty = (
                np.zeros((0, 3 * self.size**2), np.float32) if self.method == "thumbnail" else np.zeros(0, np.uint64)
            )
            tmp = path.with_name(path.stem + ".partial.npz")
            np.savez(tmp, keys=np.array(keys, dtype=str), features=np.concatenate(feats) if feats else empty)
            tmp.replace(path)

    def finish(self, ctx: FunnelContext, survivors: list[str]) -> tuple[set[str], Rows]:
        paths = [ctx.piece_file(self.name, p, ".npz") for p in range(ctx.pieces)]
        ctx.wait_for(paths, f"stage {self.name!r}")
        self.neighbours.reset()
        rows: Rows = {}
        for path in paths:
            with np.load(path) as f:
                keys, feats = f["keys"].tolist(), f["features"]
            for start in range(0, len(keys), 256):  # in batches, as the images came
                chunk = feats[start : start + 256]
                for key, d in zip(keys[start : start + 256], self.neighbours.add(chunk), strict=True):
                    rows[key] = {"score": float(d)}
        rows = {k: rows[k] for k in survivors if k in rows}
        return self.select(rows), rows


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


def best_per_class(rows: Rows, rank: dict[str, float], per_class: int) -> set[str]:
    """At most ``per_class`` keys of each ``extra.concept``, highest ``rank`` first (ties by key)."""
    by_class: dict[str, list[str]] = {}
    for key, row in rows.items():
        by_class.setdefault(row["extra"]["concept"], []).append(key)
    kept = set()
    for keys in by_class.values():
        keys.sort(key=lambda k: (-rank.get(k, 0.0), k))
        kept.update(keys[:per_class])
    return kept


class Balance(Stage):
    """Balance across visual concepts: each image gets a class by CLIP zero-shot over ``concepts`` (prompts), and at
    most ``per_class`` images per class are kept, best ``rank_by`` score first (a previous stage's)."""

    kind = "automatic"

    def __init__(self, clip, concepts: dict[str, str], per_class: int, rank_by: str, name: str = "balance"):
        super().__init__(name, {})
        if not concepts:
            raise ConfigError(f"stages.{name}.concepts", "needs at least one concept: name -> prompt")
        self.clip, self.per_class, self.rank_by = clip, per_class, rank_by
        self.names = list(concepts)
        self.text = self.clip.embed_texts(list(concepts.values()))

    def score(self, batch):
        cls = (self.clip.embed_images(batch["image"]) @ self.text.T).argmax(-1).tolist()
        return [float(c) for c in cls], [{"concept": self.names[c]} for c in cls]

    def finish(self, ctx, survivors):
        rows = ctx.gather(self.name, survivors)
        if not ctx.table(self.rank_by).is_file():
            raise CurationError(f"no scores of stage {self.rank_by!r} (balance.rank_by must name an earlier stage)")
        return best_per_class(rows, ctx.scores(self.rank_by), self.per_class), rows

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

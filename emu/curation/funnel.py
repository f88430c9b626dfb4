"""The curation funnel: stages in order over any DataModule source, resumable, with a table per stage and a report.

Layout of the output folder::

    index.jsonl                 every image once: key, caption, source size (and hidden labels when the source
                                has them, used only to measure the funnel, never by a stage); index/<piece>.jsonl
    scores/<stage>.jsonl        key, stage, score, kept (+ extra) for every image the stage saw (written at the
                                end of the stage, atomically); scores/<stage>/<piece>.* per piece of the data
    human/<stage>/              candidates, contact sheets, labels_template.csv, labels.jsonl
    curated/                    the curated set: PNGs + metadata.jsonl (file_name, text): data=folder reads it
    sheets/<stage>.png          kept (top rows) and rejected (bottom rows) examples per stage
    funnel.json, funnel.md      counts in/out, rules, seconds per 1K images, and against hidden labels:
                                precision / recall of needles, what each stage removed by flaw

The data is read in pieces (input shards, or ``piece_size`` indices of a map-style source), and every pass writes a
file per piece, whole: a finished stage is never redone, an interrupted one redoes only its unfinished pieces. The
ranks of a job (``torchrun``, ``srun``: :mod:`emu.training.ranks`) share the pieces: every rank runs each stage's
``prepare`` on its own pieces; rank 0 waits for all of them, merges them in piece order and runs ``finish`` (the
decision, and the order-dependent near-duplicate search), then writes the stage's table, which the other ranks wait
for. The pieces, not the ranks, fix the order, so any number of ranks gives the curated set one process gives. Stages
without ``prepare`` (the human passes) run on rank 0 only; so do the exports and the report. A switched-off stage
(``enabled`` false) passes everything on.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from emu.curation.export import export_curated, stage_sheets
from emu.curation.report import funnel_markdown
from emu.curation.stages import CurationError, FunnelContext, subset
from emu.training.ranks import Ranks
from emu.utils.files import atomic_write_text


class Funnel:
    """The ``stages`` in order over the train split of ``datamodule``, into the folder ``out``; the data is read in
    pieces of ``piece_size`` images (map-style sources; a stream's pieces are its shards), shared by ``ranks``."""

    def __init__(self, datamodule, stages: list, out: str | Path, examples: int = 8, progress: bool = True,
                 ranks: Ranks | None = None, piece_size: int = 1000, poll_seconds: float = 2.0):  # fmt: skip
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise CurationError(f"stage names must be unique, got {names}")
        self.dm, self.stages, self.out = datamodule, stages, Path(out)
        self.examples, self.progress = examples, progress
        self.ranks, self.piece_size, self.poll_seconds = ranks or Ranks(), piece_size, poll_seconds
        self.pieces = datamodule.num_pieces("train", piece_size)
        self.index: dict[str, dict[str, Any]] = {}
        self.scanned = False  # set when scan() read this funnel's own index (rows carry their piece)
        self.started = time.time()

    # ------------------------------------------------------------------------------------------ passes
    def _piece_batches(self, piece: int, keys: set[str] | None, desc: str = "") -> Iterator[dict[str, Any]]:
        """Batches of one piece's images in ``keys`` (all when None), each image once, in the piece's order."""
        seen: set[str] = set()
        for batch in self.dm.piece_loader("train", piece, self.piece_size):
            pick = [i for i, k in enumerate(batch["key"]) if k not in seen and (keys is None or k in keys)]
            seen.update(batch["key"][i] for i in pick)
            if pick:
                yield subset(batch, pick)

    def _batches(self, keys: set[str] | None, desc: str) -> Iterator[dict[str, Any]]:
        """Batches of the images in ``keys`` (all when None), each once, over the pieces that hold them, in order."""
        pieces = range(self.pieces)
        if keys is not None and self.scanned:  # the index this funnel read (its pieces match its plan)
            pieces = sorted({self.index[k]["piece"] for k in keys if k in self.index})
        for piece in self.context().track(list(pieces), desc):
            yield from self._piece_batches(piece, keys, desc)

    def context(self) -> FunnelContext:
        return FunnelContext(self.out, self.index, self._batches, self._piece_batches, self.pieces, self.ranks,
                             self.poll_seconds, self.progress, self.started)  # fmt: skip

    def check_plan(self) -> None:
        """``funnel.plan.json``: the data and its pieces. A rerun into the same folder must read the same pieces (their
        tables are reused), so another plan is refused; rank 0 writes it, the others wait for it."""
        data = {k: v for k, v in self.dm.describe().items() if k != "batch_size"}  # batching changes no result
        plan = {"data": data, "piece_size": self.piece_size, "pieces": self.pieces}
        plan = json.loads(json.dumps(plan, default=str))
        path = self.out / "funnel.plan.json"
        if not path.is_file() and self.ranks.is_main:
            atomic_write_text(path, json.dumps(plan, indent=2))
        self.context().wait_for([path], "the funnel's plan")
        old = json.loads(path.read_text())
        if old != plan:
            changed = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
            raise CurationError(f"'{self.out}' holds a funnel over other data or pieces ({', '.join(changed)} differ): "
                                "use another out, or delete it to start over")  # fmt: skip

    def scan(self) -> list[str]:
        """``index.jsonl``: every image's key, caption, source size and hidden labels, in piece order (each rank
        writes ``index/<piece>.jsonl`` for its pieces; rank 0 merges them)."""
        path = self.out / "index.jsonl"
        if not path.is_file():
            t = time.time()
            ctx = self.context()
            for piece in ctx.track(ctx.my_pieces(), "index"):
                part = self.out / "index" / f"{piece:05d}.jsonl"
                if part.is_file():
                    continue
                rows = []
                for batch in self._piece_batches(piece, None, "index"):
                    for key, caption, meta in zip(batch["key"], batch["caption"], batch["meta"], strict=True):
                        hidden = {k: meta[k] for k in ("needle", "appeal", "flaws") if k in meta}
                        rows.append(json.dumps({"key": key, "caption": caption, "source_size": meta.get("source_size"),
                                                "hidden": hidden, "piece": piece}) + "\n")  # fmt: skip
                part.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(part, "".join(rows))
            if self.ranks.is_main:
                parts = [self.out / "index" / f"{p:05d}.jsonl" for p in range(self.pieces)]
                ctx.wait_for(parts, "the index")
                lines, seen = [], set()
                for part in parts:  # a key read again in a later piece keeps its first place
                    for line in part.read_text().splitlines(keepends=True):
                        key = json.loads(line)["key"]
                        if key not in seen:
                            seen.add(key)
                            lines.append(line)
                if not lines:
                    raise CurationError("the data source yielded no images")
                atomic_write_text(path, "".join(lines))
                (self.out / "index.seconds").write_text(f"{time.time() - t:.2f}")
            else:
                ctx.wait_for([path], "the index")
        self.index = {r["key"]: r for r in map(json.loads, path.read_text().splitlines())}
        self.scanned = True
        return list(self.index)

    # ------------------------------------------------------------------------------------------ stages
    def run_stage(self, stage, survivors: list[str]) -> tuple[set[str], dict[str, Any]]:
        ctx = self.context()
        final = ctx.table(stage.name)
        if not final.is_file():
            final.parent.mkdir(parents=True, exist_ok=True)
            t = time.time()
            if stage.enabled and hasattr(stage, "prepare"):
                stage.prepare(ctx, survivors)  # every rank: its pieces
            if self.ranks.is_main:
                self._finish_stage(stage, survivors, ctx, t)
            ctx.wait_for([final, final.with_suffix(".json")], f"stage {stage.name!r}'s table")
        rows = [json.loads(line) for line in final.read_text().splitlines()]
        info = json.loads(final.with_suffix(".json").read_text())
        return {r["key"] for r in rows if r["kept"]}, info

    def _finish_stage(self, stage, survivors: list[str], ctx: FunnelContext, t: float) -> None:
        final = ctx.table(stage.name)
        if stage.enabled:
            kept, rows = stage.finish(ctx, survivors) if hasattr(stage, "finish") else stage.run(ctx, survivors)
            note = stage.describe()
        else:  # a switched-off stage passes everything on, and says so
            kept, rows = set(survivors), {k: {"score": 0.0} for k in survivors}
            note = f"skipped: {stage.describe()}"
        if survivors and not kept:
            values = sorted(r["score"] for r in rows.values())
            q = [values[int(f * (len(values) - 1))] for f in (0, 0.25, 0.5, 0.75, 1)] if values else []
            dist = ", ".join(f"{v:.3g}" for v in q)
            raise CurationError(f"stage {stage.name!r} keeps nothing of {len(survivors)} images ({note}); its scores "
                                f"min/25%/median/75%/max: {dist}: loosen its rule")  # fmt: skip
        seconds = time.time() - t
        info = {"stage": stage.name, "kind": stage.kind, "rule": note, "n_in": len(survivors), "n_out": len(kept),
                "seconds": round(seconds, 2), "seconds_per_1k": round(1000 * seconds / max(1, len(survivors)), 2),
                "ranks": self.ranks.world}  # fmt: skip
        lines = [json.dumps({"key": k, "stage": stage.name, **r, "kept": k in kept}) + "\n" for k, r in rows.items()]
        atomic_write_text(final.with_suffix(".json"), json.dumps(info, indent=2))
        atomic_write_text(final, "".join(lines))

    # ------------------------------------------------------------------------------------------ the whole run
    def run(self) -> dict[str, Any]:
        """The whole funnel; every rank returns the report (the others wait for rank 0 to write it). A rank that
        fails says so in ``errors/rank<r>.txt``, which stops the others' waits."""
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            return self._run()
        except BaseException as e:
            if self.ranks.world > 1:
                self.context().report_failure(e)
            raise

    def _run(self) -> dict[str, Any]:
        t = time.time()
        self.check_plan()
        survivors = self.scan()
        report: dict[str, Any] = {"n_images": len(survivors), "stages": [], "ranks": self.ranks.world,
                                  "pieces": self.pieces}  # fmt: skip
        timing = self.out / "index.seconds"
        if timing.is_file():  # the first pass over the data (keys, captions, sizes)
            report["index_seconds"] = float(timing.read_text())
        hidden = _HiddenLabels(self.index)
        report["needles"] = hidden.total_needles
        for stage in self.stages:
            kept, info = self.run_stage(stage, survivors)
            info.update(hidden.describe(survivors, kept))
            report["stages"].append(info)
            if self.ranks.is_main:
                print(f"  {stage.name:<20} {info['n_in']:>7} -> {info['n_out']:<7} {info['rule']}  "
                      f"({info['seconds']:.0f}s)")  # fmt: skip
            survivors = [k for k in survivors if k in kept]
        if not self.ranks.is_main:
            self.context().wait_for([self.out / "funnel.json"], "the report")
            return json.loads((self.out / "funnel.json").read_text())
        ctx = self.context()
        export_curated(ctx, survivors)
        report["final"] = {"n": len(survivors), **hidden.describe(list(self.index), set(survivors))}
        report["seconds"] = round(time.time() - t, 1)
        stage_sheets(ctx, [s.name for s in self.stages], self.examples)
        atomic_write_text(self.out / "funnel.md", funnel_markdown(report, self.stages))
        atomic_write_text(self.out / "funnel.json", json.dumps(report, indent=2))
        return report


class _HiddenLabels:
    """Measures a set of kept images against the hidden labels (haystack needles and flaws), when present."""

    def __init__(self, index: dict[str, dict[str, Any]]):
        self.hidden = {k: r.get("hidden") or {} for k, r in index.items()}
        self.has_labels = any("needle" in h for h in self.hidden.values())
        self.total_needles = sum(bool(h.get("needle")) for h in self.hidden.values())

    def describe(self, before: list[str], kept: set[str]) -> dict[str, Any]:
        if not self.has_labels:
            return {}
        needles_in = sum(bool(self.hidden[k].get("needle")) for k in before)
        needles_out = sum(bool(self.hidden[k].get("needle")) for k in kept)
        removed = Counter(f for k in before if k not in kept for f in self.hidden[k].get("flaws", ()))
        return {
            "needles_in": needles_in,
            "needles_out": needles_out,
            "precision": round(needles_out / len(kept), 4) if kept else 0.0,
            "recall": round(needles_out / self.total_needles, 4) if self.total_needles else 0.0,
            "removed_by_flaw": dict(removed.most_common()),
            "removed_clean": sum(1 for k in before if k not in kept and not self.hidden[k].get("flaws")),
        }

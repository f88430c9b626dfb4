"""The curation funnel: stages in order over any DataModule source, resumable, with a table per stage and a report.

Layout of the output folder::

    index.jsonl                 every image once: key, caption, source size, piece (and hidden labels when the
                                source has them, used only to measure the funnel, never by a stage); index/<piece>.jsonl
    scores/<stage>.jsonl        key, stage, score, kept (+ extra) for every image the stage saw, in source order
                                (streamed at the end of the stage); scores/<stage>/<piece>.* per piece of the data
    *.pieces.json               beside each table: where each piece's rows start (tables are read a piece at a time)
    human/<stage>/              candidates, contact sheets, labels_template.csv, labels.jsonl
    curated/                    the curated set: PNGs + metadata.jsonl (file_name, text): data=folder reads it
    sheets/<stage>.png          kept (top rows) and rejected (bottom rows) examples per stage
    funnel.json, funnel.md      counts in/out, rules, seconds per 1K images, and against hidden labels:
                                precision / recall of needles, what each stage removed by flaw

The data is read in pieces (input shards, or ``piece_size`` indices of a map-style source), and every pass writes a file
per piece, whole: a finished stage is never redone, an interrupted one redoes only its unfinished pieces. The ranks of a
job (``torchrun``, ``srun``: :mod:`emu.training.ranks`) share the pieces (:mod:`emu.curation.pieces`): every rank runs
each stage's ``prepare`` on its own pieces; rank 0 waits for all of them and runs ``finish`` (the decision, and the
order-dependent near-duplicate search unless it runs in cells), then streams the pieces in order through the decision
into the stage's table, which the other ranks wait for. No step holds a row per image of the corpus
(:mod:`emu.curation.tables`), so memory does not grow with the corpus; only the human passes hold their (few)
candidates. The pieces, not the ranks, fix the order, so any number of ranks gives the curated set one process gives.
Stages without ``prepare`` (the human passes) run on rank 0 only; so do the exports and the report. A switched-off stage
(``enabled`` false) passes everything on.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from emu.curation.export import export_curated, stage_sheets
from emu.curation.pieces import CurationError, FunnelContext, Keep, subset
from emu.curation.report import funnel_markdown
from emu.curation.tables import Table, TableWriter, quantiles
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
        self.index: Table | None = None  # set by scan()
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

    def _batches(self, wanted: dict[int, set[str]], desc: str) -> Iterator[dict[str, Any]]:
        """Batches of the images ``{piece: keys}``, each once, piece after piece."""
        for piece in self.context().track(sorted(p for p, keys in wanted.items() if keys), desc):
            yield from self._piece_batches(piece, set(wanted[piece]), desc)

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

    def scan(self) -> Table:
        """``index.jsonl``: every image's key, caption, source size and hidden labels, in piece order (each rank
        writes ``index/<piece>.jsonl`` for its pieces; rank 0 joins them, a piece at a time). Keys name images: a key
        is read once per piece, and must not repeat across pieces (checking that would take memory that grows with
        the corpus; the export refuses a curated set with a repeated key)."""
        path = self.out / "index.jsonl"
        if not Table.finished(path):
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
                writer = TableWriter(path)
                for piece, part in enumerate(parts):
                    writer.add(piece, [json.loads(line) for line in part.read_text().splitlines()])
                if not sum(p["rows"] for p in writer.pieces):
                    raise CurationError("the data source yielded no images")
                writer.close()
                (self.out / "index.seconds").write_text(f"{time.time() - t:.2f}")
            else:
                ctx.wait_for([path.with_name("index.pieces.json")], "the index")
        self.index = Table(path)
        return self.index

    # ------------------------------------------------------------------------------------------ stages
    def run_stage(self, stage, survivors: Table) -> tuple[Table, dict[str, Any]]:
        """The stage over ``survivors``: its table (its kept images are the next stage's survivors) and its info."""
        ctx = self.context()
        final = ctx.table(stage.name)
        info = final.with_suffix(".json")
        if not (Table.finished(final) and info.is_file()):
            final.parent.mkdir(parents=True, exist_ok=True)
            t = time.time()
            if stage.enabled and hasattr(stage, "prepare"):
                stage.prepare(ctx, survivors)  # every rank: its pieces
            if self.ranks.is_main:
                self._finish_stage(stage, survivors, ctx, t)
            ctx.wait_for([final.with_name(f"{stage.name}.pieces.json"), info], f"stage {stage.name!r}'s table")
        return Table(final), json.loads(info.read_text())

    def _finish_stage(self, stage, survivors: Table, ctx: FunnelContext, t: float) -> None:
        """The stage's decision, streamed into its table a piece at a time, with the counts against hidden labels."""
        if not stage.enabled:  # a switched-off stage passes everything on, and says so
            note = f"skipped: {stage.describe()}"
            keep: Keep = lambda key, row: True
            rows = ((p, [{"key": k, "score": 0.0} for k in keys]) for p, keys in survivors.kept_by_piece())
        elif hasattr(stage, "finish"):
            keep, note = stage.finish(ctx, survivors), stage.describe()
            rows, scores = ctx.piece_rows(stage.name, survivors), ctx.piece_scores(stage.name, survivors)
        else:  # a stage that decides in memory (the human passes: their input is small)
            kept, table = stage.run(ctx, survivors)
            note = stage.describe()
            keep = lambda key, row: key in kept
            rows = ((p, [{"key": k, **table[k]} for k in keys]) for p, keys in survivors.kept_by_piece())
            scores = lambda: iter([np.array([r["score"] for r in table.values()], dtype=np.float64)])
        writer, counts = TableWriter(ctx.table(stage.name)), _HiddenCounts()
        for piece, piece_rows in rows:
            out = [{"key": r["key"], "stage": stage.name, **{k: v for k, v in r.items() if k != "key"},
                    "kept": bool(keep(r["key"], r))} for r in piece_rows]  # fmt: skip
            writer.add(piece, out)
            counts.add(self.index.rows(piece), out)
        n_in, n_out = len(survivors), sum(p["kept"] for p in writer.pieces)
        if n_in and not n_out:
            writer.discard()
            dist = ", ".join(f"{v:.3g}" for v in quantiles(scores, (0, 0.25, 0.5, 0.75, 1)))
            raise CurationError(f"stage {stage.name!r} keeps nothing of {n_in} images ({note}); its scores "
                                f"min/25%/median/75%/max: {dist}: loosen its rule")  # fmt: skip
        seconds = time.time() - t
        info = {"stage": stage.name, "kind": stage.kind, "rule": note, "n_in": n_in, "n_out": n_out,
                "seconds": round(seconds, 2), "seconds_per_1k": round(1000 * seconds / max(1, n_in), 2),
                "ranks": self.ranks.world, **counts.describe(n_out, self.total_needles)}  # fmt: skip
        if getattr(stage, "role", None):  # a human pass's role: generalist (recall), specialist (precision)
            info["role"] = stage.role
        atomic_write_text(ctx.table(stage.name).with_suffix(".json"), json.dumps(info, indent=2))
        writer.close()

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

    @property
    def total_needles(self) -> int | None:
        """The hidden needles in the whole corpus (None when the source has no hidden labels)."""
        if not hasattr(self, "_needles"):
            rows = (r.get("hidden") or {} for p in sorted(self.index.pieces) for r in self.index.rows(p))
            counts = Counter("needle" if h.get("needle") else "labelled" if "needle" in h else "" for h in rows)
            self._needles = counts["needle"] if counts["needle"] or counts["labelled"] else None
        return self._needles

    def _run(self) -> dict[str, Any]:
        t = time.time()
        self.check_plan()
        survivors = self.scan()
        report: dict[str, Any] = {"n_images": len(survivors), "stages": [], "ranks": self.ranks.world,
                                  "pieces": self.pieces}  # fmt: skip
        timing = self.out / "index.seconds"
        if timing.is_file():  # the first pass over the data (keys, captions, sizes)
            report["index_seconds"] = float(timing.read_text())
        if self.total_needles is not None:
            report["needles"] = self.total_needles
        for stage in self.stages:
            survivors, info = self.run_stage(stage, survivors)
            report["stages"].append(info)
            if self.ranks.is_main:
                print(f"  {stage.name:<20} {info['n_in']:>7} -> {info['n_out']:<7} {info['rule']}  "
                      f"({info['seconds']:.0f}s)")  # fmt: skip
        if not self.ranks.is_main:
            self.context().wait_for([self.out / "funnel.json"], "the report")
            return json.loads((self.out / "funnel.json").read_text())
        ctx = self.context()
        export_curated(ctx, dict(survivors.kept_by_piece()))
        report["final"] = {"n": len(survivors), **self._final_counts(survivors)}
        report["seconds"] = round(time.time() - t, 1)
        stage_sheets(ctx, [s.name for s in self.stages], self.examples)
        atomic_write_text(self.out / "funnel.md", funnel_markdown(report, self.stages))
        atomic_write_text(self.out / "funnel.json", json.dumps(report, indent=2))
        return report

    def _final_counts(self, curated: Table) -> dict[str, Any]:
        """The curated set against the hidden labels of the whole corpus (what every stage together removed)."""
        counts = _HiddenCounts()
        for piece in sorted(self.index.pieces):
            kept, index_rows = set(curated.kept(piece)), self.index.rows(piece)
            counts.add(index_rows, [{"key": r["key"], "kept": r["key"] in kept} for r in index_rows])
        return counts.describe(len(curated), self.total_needles)


class _HiddenCounts:
    """A stage's decisions against the hidden labels (haystack needles and flaws), counted a piece at a time."""

    def __init__(self):
        self.needles_in = self.needles_out = self.removed_clean = 0
        self.removed: Counter[str] = Counter()

    def add(self, index_rows: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
        """One piece: its index rows (the hidden labels) and the stage's rows (``key``, ``kept``)."""
        hidden = {r["key"]: r.get("hidden") or {} for r in index_rows}
        for r in rows:
            h = hidden.get(r["key"], {})
            self.needles_in += bool(h.get("needle"))
            if r["kept"]:
                self.needles_out += bool(h.get("needle"))
            else:
                self.removed.update(h.get("flaws", ()))
                self.removed_clean += not h.get("flaws")

    def describe(self, n_out: int, total_needles: int | None) -> dict[str, Any]:
        if total_needles is None:
            return {}
        return {
            "needles_in": self.needles_in,
            "needles_out": self.needles_out,
            "precision": round(self.needles_out / n_out, 4) if n_out else 0.0,
            "recall": round(self.needles_out / total_needles, 4) if total_needles else 0.0,
            "removed_by_flaw": dict(self.removed.most_common()),
            "removed_clean": self.removed_clean,
        }

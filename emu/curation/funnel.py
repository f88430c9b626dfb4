"""The curation funnel: stages in order over any DataModule source, resumable, with a table per stage and a report.

Layout of the output folder::

    index.jsonl                 every image once: key, caption, source size (and hidden labels when the source
                                has them, used only to measure the funnel, never by a stage)
    scores/<stage>.jsonl        key, stage, score, kept (+ extra) for every image the stage saw (written at the
                                end of the stage, atomically); scores/<stage>.partial.jsonl while it runs
    human/<stage>/              candidates, contact sheets, labels_template.csv, labels.jsonl
    curated/                    the curated set: PNGs + metadata.jsonl (file_name, text): data=folder reads it
    sheets/<stage>.png          kept (top rows) and rejected (bottom rows) examples per stage
    funnel.json, funnel.md      counts in/out, rules, seconds per 1K images, and against hidden labels:
                                precision / recall of needles, what each stage removed by flaw

A finished stage is never redone; an interrupted one resumes from its partial table.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from emu.curation.human import PRINCIPLES, SimulatedAnnotator, combine, read_labels, write_labels, write_template
from emu.curation.stages import Balance, CurationError, Stage
from emu.utils.files import atomic_write_text
from emu.utils.images import image_grid, to_uint8


class HumanStage:
    """A human pass: export the candidates, then keep what the (combined) annotators keep.

    Args:
        role: ``generalist`` (recall) or ``specialist`` (precision), for the report.
        labels: a labels file (CSV/JSONL) from real annotators; or
        simulated: a list of :class:`SimulatedAnnotator` settings (the miniature).
        combine: how votes combine (``majority``, ``any``, ``all``, ``mean`` with ``threshold``).
        on_bad_row: ``skip`` (report and go on) or ``stop``.
    """

    kind = "human"
    needs_pixels = True

    def __init__(self, name: str, role: str, labels: str | None = None, simulated: list[dict] | None = None,
                 combine: str = "majority", threshold: float = 0.5, on_bad_row: str = "skip"):  # fmt: skip
        self.name, self.role, self.labels, self.rule, self.threshold = name, role, labels, combine, threshold
        self.annotators = [SimulatedAnnotator(**a) for a in (simulated or [])]
        self.on_bad_row = on_bad_row
        self.problems: list[str] = []

    def describe(self) -> str:
        who = f"{len(self.annotators)} simulated annotators" if self.annotators and not self.labels else "labels file"
        return f"{self.role} pass, {who}, {self.rule} vote"


class Funnel:
    def __init__(self, datamodule, stages: list, out: str | Path, examples: int = 8, progress: bool = True):
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise CurationError(f"stage names must be unique, got {names}")
        self.dm, self.stages, self.out = datamodule, stages, Path(out)
        self.examples, self.progress = examples, progress
        self.index: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------------------------------------ passes
    def _batches(self, keys: set[str] | None, desc: str) -> Iterator[dict[str, Any]]:
        """Batches of the images in ``keys`` (all when None), each image once, in the source's order."""
        seen: set[str] = set()
        total = math.ceil(len(self.index) / self.dm.batch_size) if self.index else None
        loader = self.dm.dataloader("train", shuffle=False)
        for batch in tqdm(loader, desc=desc, total=total, disable=not self.progress, leave=False):
            pick = [i for i, k in enumerate(batch["key"]) if k not in seen and (keys is None or k in keys)]
            seen.update(batch["key"][i] for i in pick)
            if pick:
                yield _subset(batch, pick)

    def scan(self) -> list[str]:
        path = self.out / "index.jsonl"
        if path.is_file():
            self.index = {r["key"]: r for r in map(json.loads, path.read_text().splitlines())}
            return list(self.index)
        t = time.time()
        rows = []
        for batch in self._batches(None, "index"):
            for key, caption, meta in zip(batch["key"], batch["caption"], batch["meta"], strict=True):
                hidden = {k: meta[k] for k in ("needle", "appeal", "flaws") if k in meta}
                rows.append({"key": key, "caption": caption, "source_size": meta.get("source_size"), "hidden": hidden})
        if not rows:
            raise CurationError("the data source yielded no images")
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
        self.index = {r["key"]: r for r in rows}
        (self.out / "index.seconds").write_text(f"{time.time() - t:.2f}")
        return list(self.index)

    # ------------------------------------------------------------------------------------------ stages
    def run_stage(self, stage, survivors: list[str]) -> tuple[set[str], dict[str, Any]]:
        final = self.out / "scores" / f"{stage.name}.jsonl"
        if final.is_file():
            rows = [json.loads(line) for line in final.read_text().splitlines()]
            info = json.loads((final.with_suffix(".json")).read_text())
            return {r["key"] for r in rows if r["kept"]}, info
        final.parent.mkdir(parents=True, exist_ok=True)
        t = time.time()
        if not getattr(stage, "enabled", True):  # a switched-off stage passes everything on, and says so
            kept, rows = set(survivors), {k: {"score": 0.0} for k in survivors}
            note = f"skipped: {stage.describe()}"
        elif isinstance(stage, HumanStage):
            kept, rows = self._human(stage, survivors)
            note = stage.describe()
        else:
            rows = self._score(stage, survivors)
            if isinstance(stage, Balance):
                stage.rank_scores = self.scores(stage.rank_by)
            kept = stage.select(rows)
            note = stage.describe()
        if survivors and not kept:
            values = sorted(r["score"] for r in rows.values())
            q = [values[int(f * (len(values) - 1))] for f in (0, 0.25, 0.5, 0.75, 1)] if values else []
            dist = ", ".join(f"{v:.3g}" for v in q)
            raise CurationError(f"stage {stage.name!r} keeps nothing of {len(survivors)} images ({note}); its scores "
                                f"min/25%/median/75%/max: {dist}: loosen its rule")  # fmt: skip
        seconds = time.time() - t
        info = {"stage": stage.name, "kind": stage.kind, "rule": note, "n_in": len(survivors), "n_out": len(kept),
                "seconds": round(seconds, 2),
                "seconds_per_1k": round(1000 * seconds / max(1, len(survivors)), 2)}  # fmt: skip
        lines = [json.dumps({"key": k, "stage": stage.name, **r, "kept": k in kept}) + "\n" for k, r in rows.items()]
        atomic_write_text(final.with_suffix(".json"), json.dumps(info, indent=2))
        atomic_write_text(final, "".join(lines))
        partial = final.with_name(f"{stage.name}.partial.jsonl")
        partial.unlink(missing_ok=True)
        return kept, info

    def _score(self, stage: Stage, survivors: list[str]) -> dict[str, dict[str, Any]]:
        partial = self.out / "scores" / f"{stage.name}.partial.jsonl"
        rows: dict[str, dict[str, Any]] = {}
        if partial.is_file():  # resume: keep the complete lines of an interrupted pass, drop a half-written last one
            kept = []
            for line in partial.read_text().splitlines():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    break
                kept.append(line + "\n")
                rows[r.pop("key")] = r
            atomic_write_text(partial, "".join(kept))  # appending after a torn line would hide what follows it
        stage.start(rows)
        todo = {k for k in survivors if k not in rows}
        replay = getattr(stage, "replay", False) and rows  # stateful: see the scored images again, in order
        with partial.open("a") as f:
            for batch in self._batches(set(survivors) if replay else todo, stage.name) if todo else []:
                if replay:
                    done = [i for i, k in enumerate(batch["key"]) if k not in todo]
                    if done:
                        stage.observe(_subset(batch, done))
                    new = [i for i, k in enumerate(batch["key"]) if k in todo]
                    if not new:
                        continue
                    batch = _subset(batch, new)
                scores, extra = stage.score(batch)
                for i, (key, score) in enumerate(zip(batch["key"], scores, strict=True)):
                    row = {"score": float(score), **({"extra": extra[i]} if extra else {})}
                    rows[key] = row
                    f.write(json.dumps({"key": key, **row}) + "\n")
                f.flush()
        return {k: rows[k] for k in survivors if k in rows}

    def _human(self, stage: HumanStage, survivors: list[str]) -> tuple[set[str], dict[str, dict[str, Any]]]:
        folder = self.out / "human" / stage.name
        folder.mkdir(parents=True, exist_ok=True)
        write_template(survivors, folder / "labels_template.csv")
        self._contact_sheets(survivors, folder)
        labels_path = folder / "labels.jsonl"
        if stage.labels:
            rows, stage.problems = read_labels(stage.labels, set(survivors), stage.on_bad_row)
            write_labels(rows, labels_path)
        elif stage.annotators:
            if labels_path.is_file():  # a rerun after a kill: the same labels
                rows = [json.loads(line) for line in labels_path.read_text().splitlines()]
            else:
                rows = [a.label(k, self.index[k].get("hidden", {})) for k in survivors for a in stage.annotators]
                write_labels(rows, labels_path)
        else:
            raise CurationError(f"stage {stage.name!r} waits for annotators: candidates and labels_template.csv are in "
                                f"{folder}; rerun with stages.{stage.name}.labels=<your labels.csv>")  # fmt: skip
        decision = combine(rows, stage.rule, stage.threshold)
        votes = Counter(r["key"] for r in rows)
        keeps = Counter(r["key"] for r in rows if r["keep"])
        table = {
            k: {"score": keeps[k] / votes[k] if votes[k] else 0.0, "extra": {"votes": votes[k]}} for k in survivors
        }
        return {k for k in survivors if decision.get(k, False)}, table

    def _contact_sheets(self, keys: list[str], folder: Path, per_sheet: int = 64) -> None:
        """Numbered sheets of the candidates and ``sheets.md`` mapping numbers to keys (for real annotators)."""
        if (folder / "sheets.md").is_file():
            return
        wanted = set(keys)
        images: dict[str, torch.Tensor] = {}
        for batch in self._batches(wanted, "contact sheets"):
            images.update(zip(batch["key"], batch["image"], strict=True))
        lines = ["# Candidates", "", f"{len(keys)} images; grade each with the principles {', '.join(PRINCIPLES)}", ""]
        for s in range(0, len(keys), per_sheet):
            chunk = [k for k in keys[s : s + per_sheet] if k in images]
            if chunk:
                image_grid(torch.stack([images[k] for k in chunk]), nrow=8).save(
                    folder / f"sheet_{s // per_sheet:03d}.png"
                )
                lines.append(f"- sheet_{s // per_sheet:03d}.png: " + ", ".join(chunk))
        atomic_write_text(folder / "sheets.md", "\n".join(lines) + "\n")

    def scores(self, name: str) -> dict[str, float]:
        path = self.out / "scores" / f"{name}.jsonl"
        if not path.is_file():
            raise CurationError(f"no scores of stage {name!r} (balance.rank_by must name an earlier stage)")
        return {r["key"]: r["score"] for r in map(json.loads, path.read_text().splitlines())}

    # ------------------------------------------------------------------------------------------ the whole run
    def run(self) -> dict[str, Any]:
        self.out.mkdir(parents=True, exist_ok=True)
        t = time.time()
        survivors = self.scan()
        report: dict[str, Any] = {"n_images": len(survivors), "stages": []}
        timing = self.out / "index.seconds"
        if timing.is_file():  # the first pass over the data (keys, captions, sizes)
            report["index_seconds"] = float(timing.read_text())
        hidden = _HiddenLabels(self.index)
        report["needles"] = hidden.total_needles
        for stage in self.stages:
            kept, info = self.run_stage(stage, survivors)
            info.update(hidden.describe(survivors, kept))
            report["stages"].append(info)
            print(f"  {stage.name:<20} {info['n_in']:>7} -> {info['n_out']:<7} {info['rule']}  "
                  f"({info['seconds']:.0f}s)")  # fmt: skip
            survivors = [k for k in survivors if k in kept]
        self.export(survivors)
        report["final"] = {"n": len(survivors), **hidden.describe(list(self.index), set(survivors))}
        report["seconds"] = round(time.time() - t, 1)
        self._stage_sheets()
        atomic_write_text(self.out / "funnel.json", json.dumps(report, indent=2))
        from emu.curation.report import funnel_markdown

        atomic_write_text(self.out / "funnel.md", funnel_markdown(report, self.stages))
        return report

    def export(self, keys: list[str]) -> Path:
        folder = self.out / "curated"
        done = folder / "metadata.jsonl"
        if done.is_file() and sum(1 for _ in done.open()) == len(keys):
            return folder
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for batch in self._batches(set(keys), "export"):
            for key, image, caption in zip(batch["key"], to_uint8(batch["image"]), batch["caption"], strict=True):
                Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{key}.png")
                rows.append(
                    {"file_name": f"{key}.png", "text": caption, "key": key, **self.index[key].get("hidden", {})}
                )
        atomic_write_text(done, "".join(json.dumps(r) + "\n" for r in rows))
        return folder

    def _stage_sheets(self) -> None:
        """``sheets/<stage>.png``: kept examples on top, rejected below (the first ``examples`` of each)."""
        picks: dict[str, tuple[list[str], list[str]]] = {}
        for stage in self.stages:
            path = self.out / "scores" / f"{stage.name}.jsonl"
            if not path.is_file() or (self.out / "sheets" / f"{stage.name}.png").is_file():
                continue
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            picks[stage.name] = ([r["key"] for r in rows if r["kept"]][: self.examples],
                                 [r["key"] for r in rows if not r["kept"]][: self.examples])  # fmt: skip
        wanted = {k for a, b in picks.values() for k in a + b}
        if not wanted:
            return
        images: dict[str, torch.Tensor] = {}
        for batch in self._batches(wanted, "sheets"):
            images.update(zip(batch["key"], batch["image"], strict=True))
        (self.out / "sheets").mkdir(exist_ok=True)
        blank = torch.ones_like(next(iter(images.values())))
        for name, (kept, dropped) in picks.items():
            row = lambda ks: [images.get(k, blank) for k in ks] + [blank] * (self.examples - len(ks))
            image_grid(torch.stack(row(kept) + row(dropped)), nrow=self.examples).save(
                self.out / "sheets" / f"{name}.png"
            )


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


def _subset(batch: dict[str, Any], idx: list[int]) -> dict[str, Any]:
    return {k: v[idx] if isinstance(v, torch.Tensor) else [v[i] for i in idx] for k, v in batch.items()}

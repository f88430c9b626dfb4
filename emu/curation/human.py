"""Human stages: export candidates for annotators, import their labels, combine several annotators per image.

:class:`HumanStage` is the pass in the funnel. The export is a folder with the candidates' images, contact sheets
(numbered, keys listed in ``sheets.md``) and ``labels_template.csv`` (one row per image, one column per principle of
the photography guideline, and ``keep``). Labels come back as CSV or JSONL rows ``key, annotator, <principle>...,
keep`` (1/0, true/false, yes/no). Annotators may also be objects named by ``_target_`` (``annotators:``) that label
a candidate from its hidden metadata: the miniature's :class:`emu.mini.annotators.SimulatedAnnotator`, whose labels go
through the same file and import path. Reports say so.
"""

from __future__ import annotations

import csv
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from emu.curation.export import contact_sheets
from emu.curation.pieces import CurationError, FunnelContext, Rows
from emu.curation.tables import Table
from emu.errors import ConfigError
from emu.utils.files import atomic_write_text

PRINCIPLES = ("composition", "lighting", "color_contrast", "subject_background", "subjective")
COMBINE_RULES = ("majority", "any", "all", "mean")


def _truthy(value: Any, where: str) -> int:
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "y", "keep"):
        return 1
    if v in ("0", "false", "no", "n", "drop", ""):
        return 0
    raise ValueError(f"{where}: not a yes/no value: {value!r}")


def read_labels(path: str | Path, known: set[str], on_error: str = "skip") -> tuple[list[dict], list[str]]:
    """Rows of a labels file (CSV or JSONL). Unknown keys and malformed rows are reported with their line and
    skipped (``on_error="skip"``) or raise (``"stop"``). Returns ``(rows, problems)``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError("labels", f"no labels file at '{path}'")
    rows, problems = [], []
    if path.suffix.lower() == ".jsonl":
        raw = []
        for i, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                raw.append((i, json.loads(line)))
            except json.JSONDecodeError as e:
                problems.append(f"{path.name}:{i}: not JSON ({e.msg})")
    else:
        with path.open(newline="") as f:
            raw = [(i, r) for i, r in enumerate(csv.DictReader(f), start=2)]
    for line, r in raw:
        where = f"{path.name}:{line}"
        try:
            key = str(r["key"])
            if key not in known:
                raise ValueError(f"{where}: unknown key {key!r}")
            row = {"key": key, "annotator": str(r.get("annotator") or "anonymous"), "keep": _truthy(r["keep"], where)}
            for p in PRINCIPLES:
                if p in r and r[p] not in (None, ""):
                    row[p] = _truthy(r[p], where)
            rows.append(row)
        except (KeyError, ValueError, TypeError) as e:
            problems.append(str(e) if isinstance(e, ValueError) else f"{where}: missing column {e}")
    if problems and on_error == "stop":
        raise ConfigError("labels", f"{len(problems)} bad rows in '{path}', first: {problems[0]}")
    return rows, problems


def write_labels(rows: list[dict], path: Path) -> None:
    """JSONL, atomically (temporary file, then rename): labels never end half-written."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def combine(rows: list[dict], rule: str = "majority", threshold: float = 0.5) -> dict[str, bool]:
    """Per key, whether the annotators' ``keep`` votes pass ``rule`` (``majority``, ``any``, ``all``, or ``mean``
    of votes >= ``threshold``)."""
    if rule not in COMBINE_RULES:
        raise ConfigError("combine", f"must be one of {COMBINE_RULES}, got {rule!r}")
    votes: dict[str, list[int]] = defaultdict(list)
    for r in rows:
        votes[r["key"]].append(int(r["keep"]))
    out = {}
    for key, v in votes.items():
        mean = sum(v) / len(v)
        out[key] = {"majority": mean > 0.5, "any": mean > 0, "all": mean == 1, "mean": mean >= threshold}[rule]
    return out


def write_template(keys: list[str], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "annotator", *PRINCIPLES, "keep"])
        for k in keys:
            w.writerow([k, "", *([""] * len(PRINCIPLES)), ""])


class HumanStage:
    """A human pass: export the candidates, then keep what the (combined) annotators keep.

    Args:
        role: ``generalist`` (recall) or ``specialist`` (precision), for the report.
        labels: a labels file (CSV/JSONL) from real annotators; or
        annotators: objects with ``name`` and ``label(key, hidden_meta) -> row`` (instantiated from ``_target_``
            nodes; the miniature's :class:`emu.mini.annotators.SimulatedAnnotator`), used when there is no labels file.
        combine: how votes combine (``majority``, ``any``, ``all``, ``mean`` with ``threshold``).
        on_bad_row: ``skip`` (report and go on) or ``stop``.
    """

    kind = "human"
    needs_pixels = True
    enabled = True

    def __init__(self, name: str, role: str, labels: str | None = None, annotators: list | None = None,
                 combine: str = "majority", threshold: float = 0.5, on_bad_row: str = "skip"):  # fmt: skip
        self.name, self.role, self.labels, self.rule, self.threshold = name, role, labels, combine, threshold
        self.annotators = list(annotators or [])
        self.on_bad_row = on_bad_row
        self.problems: list[str] = []

    def describe(self) -> str:
        simulated = "simulated " if all(getattr(a, "simulated", False) for a in self.annotators) else ""
        who = f"{len(self.annotators)} {simulated}annotators" if self.annotators and not self.labels else "labels file"
        rule = f"kept by >= {self.threshold:.0%} of votes" if self.rule == "mean" else f"{self.rule} vote"
        return f"{self.role} pass, {who}, {rule}"

    def run(self, ctx: FunnelContext, candidates: Table) -> tuple[set[str], Rows]:
        """Export to ``human/<name>/``, read (or simulate) the labels; the score is the share of keep votes. The
        candidates are held in memory: people look at every one, so they are few."""
        folder = ctx.out / "human" / self.name
        folder.mkdir(parents=True, exist_ok=True)
        by_piece = dict(candidates.kept_by_piece())
        survivors = [k for p in sorted(by_piece) for k in by_piece[p]]
        write_template(survivors, folder / "labels_template.csv")
        contact_sheets(ctx, by_piece, folder, f"grade each with the principles {', '.join(PRINCIPLES)}")
        rows = self._labels(ctx, by_piece, folder)
        decision = combine(rows, self.rule, self.threshold)
        votes = Counter(r["key"] for r in rows)
        keeps = Counter(r["key"] for r in rows if r["keep"])
        table = {
            k: {"score": keeps[k] / votes[k] if votes[k] else 0.0, "extra": {"votes": votes[k]}} for k in survivors
        }
        return {k for k in survivors if decision.get(k, False)}, table

    def _labels(self, ctx: FunnelContext, by_piece: dict[int, list[str]], folder: Path) -> list[dict]:
        """The label rows, also written to ``labels.jsonl``: the labels file's, or the annotator objects' (the same
        ones again on a rerun after a kill)."""
        path = folder / "labels.jsonl"
        survivors = [k for p in sorted(by_piece) for k in by_piece[p]]
        if self.labels:
            rows, self.problems = read_labels(self.labels, set(survivors), self.on_bad_row)
            write_labels(rows, path)
        elif self.annotators:  # written, then read back as a real labels file is (the same import path)
            if not path.is_file():
                hidden = {r["key"]: r.get("hidden", {}) for p in sorted(by_piece) for r in ctx.index.rows(p)}
                write_labels([a.label(k, hidden[k]) for k in survivors for a in self.annotators], path)
            rows, self.problems = read_labels(path, set(survivors), "stop")
        else:
            raise CurationError(f"stage {self.name!r} waits for annotators: candidates and labels_template.csv are in "
                                f"{folder}; rerun with stages.{self.name}.labels=<your labels.csv>")  # fmt: skip
        return rows

"""Preference pairs as a map-style source (``data=pairs``): the data of Diffusion-DPO
(:mod:`emu.diffusion.preference`).

A folder holds one or more ``pairs.jsonl`` files (searched recursively) in Pick-a-Pic's columns, one pair per row::

    {"caption": "a red cube on a beach", "jpg_0": "images/0001_a.png", "jpg_1": "images/0001_b.png", "label_0": 1}

``jpg_0`` / ``jpg_1`` are image files relative to the jsonl's folder (or absolute); ``label_0`` is 1 when image 0 is
preferred, 0 when image 1 is, 0.5 for a tie. Ties carry no preference and are left out (counted in :attr:`ties`);
other fields become the sample's ``meta``. ``python -m emu.annotate export-pairs`` writes this layout from the app's
votes; Pick-a-Pic's own parquet shards become it by writing their image bytes to files and their rows to
``pairs.jsonl``.

Each sample is the preferred image (``image``) with the other (``image_l``) and the caption; the preparer crops and
flips both alike (:class:`~emu.data.samples.SamplePreparer`). The val split is a deterministic ``val_fraction`` of
pairs by a hash of their key (the file and line, or the row's ``id``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from emu.data.samples import BadSample
from emu.data.sources import SPLITS, IndexedSource, header_size, in_split
from emu.errors import ConfigError

log = logging.getLogger("emu.data")
PAIRS_FILE = "pairs.jsonl"


def preferred_first(row: dict[str, Any]) -> tuple[str, str] | None:
    """``(preferred, other)`` image fields of a Pick-a-Pic row by its ``label_0``; None for a tie."""
    label = float(row["label_0"])
    if label == 0.5:
        return None
    if label not in (0.0, 1.0):
        raise ValueError(f"label_0 must be 1, 0 or 0.5, got {row['label_0']!r}")
    return ("jpg_0", "jpg_1") if label == 1.0 else ("jpg_1", "jpg_0")


class PairSource(IndexedSource):
    """The pairs of every ``pairs.jsonl`` under ``root`` (see the module doc); ``val_fraction`` of them validate."""

    def __init__(self, root: str, val_fraction: float = 0.05):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise ConfigError("data.source.root", f"'{self.root}' is not a directory")
        files = sorted(self.root.rglob(PAIRS_FILE))
        if not files:
            raise ConfigError("data.source.root", f"'{self.root}' holds no {PAIRS_FILE} (Pick-a-Pic's columns: "
                              "caption, jpg_0, jpg_1, label_0; emu.annotate export-pairs writes one)")  # fmt: skip
        self.val_fraction, self.ties, self.malformed = val_fraction, 0, 0
        pairs: list[dict[str, Any]] = []
        for jsonl in files:
            pairs += self._read(jsonl)
        self.pairs = {s: [p for p in pairs if in_split(p["key"], s, val_fraction)] for s in SPLITS}
        if not self.pairs["train"]:
            raise ConfigError("data.source.root", f"'{self.root}' leaves no training pairs ({self.ties} ties, "
                              f"{self.malformed} malformed rows, val_fraction {val_fraction})")  # fmt: skip

    def _read(self, jsonl: Path) -> list[dict[str, Any]]:
        out = []
        for lineno, line in enumerate(jsonl.read_bytes().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                order = preferred_first(row)
                files = [jsonl.parent / row[field] for field in ("jpg_0", "jpg_1")]  # (an absolute path stays)
                caption = row["caption"]
            except (ValueError, KeyError, TypeError) as e:
                self.malformed += 1
                log.warning("%s:%d: malformed pair skipped (%s)", jsonl, lineno, e)
                continue
            if order is None:
                self.ties += 1
                continue
            preferred, other = (files[0], files[1]) if order[0] == "jpg_0" else (files[1], files[0])
            key = str(row.get("id", f"{jsonl.relative_to(self.root).as_posix()}:{lineno}"))
            meta = {k: v for k, v in row.items() if k not in ("caption", "jpg_0", "jpg_1")}
            out.append({"key": key, "w": preferred, "l": other, "caption": caption, "meta": meta})
        return out

    def size(self, split: str) -> int:
        return len(self.pairs[split])

    def raw(self, split: str, index: int) -> dict[str, Any]:
        pair = self.pairs[split][index]
        try:
            images = [pair[side].read_bytes() for side in ("w", "l")]
        except OSError as e:
            raise BadSample("unreadable_file", f"{pair['key']}: {e}") from e
        return {"key": pair["key"], "image": images[0], "image_l": images[1], "caption": pair["caption"],
                "meta": dict(pair["meta"])}  # fmt: skip

    def measure_sizes(self, split: str, start: int = 0, stop: int | None = None) -> list[tuple[int, int] | None]:
        """The preferred images' sizes, from their headers (the preparer refuses a pair whose sizes differ)."""
        return [header_size(p["w"]) for p in self.pairs[split][start:stop]]

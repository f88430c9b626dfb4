"""Labels and votes that survive a kill: one JSON row per answer, appended and fsynced before the answer is
acknowledged; a restarted server reads them back (a torn last line, the only thing a crash can leave, is skipped)."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any


class DuplicateAnswer(ValueError):
    """The rater already answered this item."""


class QuotaFilled(ValueError):
    """The item already has the answers its quota asks for."""


class AnswerStore:
    """An append-only JSONL file with a uniqueness key per row (``key_of(row)``), safe across threads."""

    def __init__(self, path: str | Path, key_of: Callable[[dict], tuple]):
        self.path, self.key_of = Path(path), key_of
        self.lock = threading.Lock()
        self.rows: list[dict[str, Any]] = []
        self.torn = 0  # lines a crash cut short (skipped)
        text = self.path.read_text() if self.path.is_file() else ""
        self.keys: set[tuple] = set()
        for line in text.splitlines():
            try:
                row = json.loads(line)
                key = key_of(row)
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                self.torn += 1  # torn by a crash, or not a row of this task
                continue
            self.rows.append(row)
            self.keys.add(key)
        self.newline_first = bool(text) and not text.endswith("\n")  # the next row must not join a torn line

    def append(self, row: dict[str, Any], full: Callable[[list[dict], dict], bool] | None = None) -> None:
        """Write ``row`` durably, or raise :class:`DuplicateAnswer` / :class:`QuotaFilled` (nothing written);
        ``full(rows, row)`` is checked under the same lock as the write."""
        key = self.key_of(row)
        line = json.dumps(row, sort_keys=True) + "\n"
        with self.lock:
            if key in self.keys:
                raise DuplicateAnswer(f"already answered: {key}")
            if full is not None and full(self.rows, row):
                raise QuotaFilled("this item has all the answers it needs")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(("\n" if self.newline_first else "") + line)
                self.newline_first = False
                f.flush()
                os.fsync(f.fileno())
            self.rows.append(row)
            self.keys.add(key)

"""Prompt sets: a text file (one prompt per line) or a PartiPrompts-style TSV (a ``Prompt`` column)."""

from __future__ import annotations

import csv
from pathlib import Path

from emu.errors import ConfigError


def read_prompts(path: str | Path, key: str = "prompts") -> list[str]:
    """The prompts in ``path``; a missing or empty file is a :class:`ConfigError` naming ``key``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(key, f"'{path}' is not a file")
    if path.suffix.lower() == ".tsv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t")
            if "Prompt" not in (reader.fieldnames or []):
                raise ConfigError(key, f"'{path}' is a TSV without a 'Prompt' column (PartiPrompts format)")
            prompts = [row["Prompt"].strip() for row in reader if (row.get("Prompt") or "").strip()]
    else:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(key, f"'{path}' holds no prompts")
    return prompts

"""Prompt sets: a text file (one prompt per line), a PartiPrompts-style TSV (a ``Prompt`` column), PartiPrompts as
shipped with emu (``parti``: all 1,632; ``parti:N``: N spread over its 12 categories, :func:`parti_prompts`), or a
named set a config registers (:mod:`emu.utils.named_sets`; the miniature's held-out captions: ``haystack:N``)."""

from __future__ import annotations

import csv
from collections import defaultdict
from itertools import zip_longest
from pathlib import Path

from emu.errors import ConfigError
from emu.utils import named_sets

PARTI_TSV = Path(__file__).resolve().parents[1] / "data/parti/PartiPrompts.tsv"  # Apache-2.0: LICENSE beside it


def parti_prompts(spec: str = "parti", key: str = "prompts", path: Path = PARTI_TSV) -> list[str]:
    """PartiPrompts from ``parti`` (all, in file order) or ``parti:N``: N prompts spread over the categories (in the
    order they first appear, ``N // 12`` each and one more for the first ``N % 12``), each category's share evenly
    spaced through its prompts (which run from one-word "Basic" prompts to long, hard ones); a fixed set."""
    body = spec.removeprefix("parti")
    rows = _tsv_rows(path, key)
    if not body:
        return [row["Prompt"] for row in rows]
    try:
        n = int(body.removeprefix(":")) if body.startswith(":") else None
    except ValueError:
        n = None
    if n is None or n < 1:
        raise ConfigError(key, f"'{spec}' is not parti or parti:N with N >= 1")
    if n > len(rows):
        raise ConfigError(key, f"'{spec}' asks for {n} prompts; the file has {len(rows)}")
    by_category: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        by_category[row.get("Category") or ""].append(row["Prompt"])
    groups = list(by_category.values())
    shares = [n // len(groups) + (i < n % len(groups)) for i in range(len(groups))]
    picked = []
    for group, share in zip(groups, shares, strict=True):  # a category too small to fill its share gives what it has
        picked.append([group[int((j + 0.5) * len(group) / share)] for j in range(min(share, len(group)))])
    prompts = [p for batch in zip_longest(*picked) for p in batch if p is not None]
    taken = set(prompts)
    shortfall = [r["Prompt"] for r in rows if r["Prompt"] not in taken]  # what small categories could not give
    return (prompts + shortfall)[:n]


def _tsv_rows(path: Path, key: str) -> list[dict[str, str]]:
    """The rows of a PartiPrompts-style TSV with a non-empty ``Prompt`` (stripped)."""
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        if "Prompt" not in (reader.fieldnames or []):
            raise ConfigError(key, f"'{path}' is a TSV without a 'Prompt' column (PartiPrompts format)")
        rows = [{**row, "Prompt": (row.get("Prompt") or "").strip()} for row in reader]
    return [row for row in rows if row["Prompt"]]


def read_prompts(path: str | Path, key: str = "prompts") -> list[str]:
    """The prompts in ``path`` (or a ``parti`` / registered named-set spec); a missing or empty file is a
    :class:`ConfigError` naming ``key``."""
    if str(path) == "parti" or str(path).startswith("parti:"):
        return parti_prompts(str(path), key)
    provider = named_sets.provider("prompts", path)
    if provider is not None:
        return list(provider(str(path), key))
    path = Path(path).expanduser()
    if not path.is_file() and named_sets.name_of(path):
        raise named_sets.unknown_set("prompts", path, key, "a file")
    if not path.is_file():
        raise ConfigError(key, f"'{path}' is not a file")
    if path.suffix.lower() == ".tsv":
        prompts = [row["Prompt"] for row in _tsv_rows(path, key)]
    else:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(key, f"'{path}' holds no prompts")
    return prompts

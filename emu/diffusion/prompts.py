"""Prompt sets: a text file (one prompt per line), a PartiPrompts-style TSV (a ``Prompt`` column), or held-out
haystack captions: ``haystack:N`` (the captions of haystack images 1,000,000 .. 1,000,000+N-1 of seed 0, past every
training range), ``haystack:N@START`` or ``haystack:N@START/SEED``."""

from __future__ import annotations

import csv
from pathlib import Path

from emu.data.haystack import caption_for, scene_spec
from emu.errors import ConfigError

HELDOUT_START = 1_000_000


def haystack_prompts(spec: str, key: str = "prompts") -> list[str]:
    """Captions of held-out haystack images from ``haystack:N[@START[/SEED]]``."""
    body = spec.removeprefix("haystack:")
    count, _, rest = body.partition("@")
    start, _, seed = rest.partition("/")
    try:
        n, start_i, seed_i = int(count), int(start or HELDOUT_START), int(seed or 0)
    except ValueError:
        raise ConfigError(key, f"'{spec}' is not haystack:N, haystack:N@START or haystack:N@START/SEED") from None
    if n < 1:
        raise ConfigError(key, f"'{spec}' asks for {n} prompts")
    specs = (scene_spec(seed_i, i) for i in range(start_i, start_i + n))
    return [caption_for(s["objects"], s["background"]) for s in specs]


def read_prompts(path: str | Path, key: str = "prompts") -> list[str]:
    """The prompts in ``path`` (or a ``haystack:N`` spec); a missing or empty file is a :class:`ConfigError`
    naming ``key``."""
    if str(path).startswith("haystack:"):
        return haystack_prompts(str(path), key)
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

"""Checkpoints that cannot be half-written, and a clear answer when the one asked for is broken.

:class:`AtomicCheckpointIO` writes every checkpoint (``last.ckpt`` included) to a temporary file beside its target and
renames it into place: a kill during the write leaves the previous file whole. :func:`resolve_checkpoint` checks the
checkpoint a run is asked to resume from before any work starts; a truncated or corrupt one is refused with an
error that names it and the newest complete alternative in the same folder.
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO

from emu.errors import ConfigError


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to ``<path>.tmp``, fsync, then rename over ``<path>`` (atomic on POSIX file systems)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path)  # remote stores (s3://...): their own semantics
        import torch

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def checkpoint_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a complete checkpoint, or None when it is (a cheap check: the zip directory of a
    ``torch.save`` file, the metadata files of a sharded folder; no tensor is read)."""
    path = Path(path)
    if path.is_dir():
        missing = [n for n in (".metadata", "meta.pt") if not (path / n).is_file()]
        return f"a sharded checkpoint folder without {', '.join(missing)}" if missing else None
    if not path.is_file():
        return "no such file"
    if path.stat().st_size == 0:
        return "an empty file"
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        return f"truncated or corrupt ({e})"
    if not any(n.endswith("data.pkl") for n in names):
        return "not a torch checkpoint (no data.pkl)"
    return None


def _step(path: Path) -> int:
    m = re.search(r"step[_=]?(\d+)", path.name)
    return int(m.group(1)) if m else -1


def complete_checkpoints(folder: str | Path) -> list[Path]:
    """The complete checkpoints in ``folder``, newest first (by modification time, then step)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.name.endswith(".ckpt") and checkpoint_problem(p) is None]
    return sorted(found, key=lambda p: (p.stat().st_mtime, _step(p)), reverse=True)


def resolve_checkpoint(ckpt_path: str | None, folder: str | Path | None) -> str | None:
    """The checkpoint to resume from: ``ckpt_path`` as given, ``last`` -> ``<folder>/last.ckpt`` (None when the run
    has no checkpoint yet: it starts from scratch), after checking that it is complete."""
    if not ckpt_path:
        return None
    if ckpt_path == "last":
        if folder is None or not (Path(folder) / "last.ckpt").exists():
            return None
        path = Path(folder) / "last.ckpt"
    else:
        path = Path(ckpt_path).expanduser()
    problem = checkpoint_problem(path)
    if problem is None:
        return str(path)
    others = [p for p in complete_checkpoints(path.parent) if p.resolve() != path.resolve()]
    hint = f"the newest complete one there is '{others[0]}': resume with ckpt_path={others[0]}" if others else (
        f"there is no complete checkpoint in '{path.parent}'")  # fmt: skip
    raise ConfigError("ckpt_path", f"'{path}' is {problem}; {hint}")

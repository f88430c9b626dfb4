"""Files that are never seen half-written."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path`` (atomic on POSIX). The
    temporary name is the process's own, so processes writing the same file (ranks of a job) never share one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def atomic_save(path: str | Path, save: Callable[[Path], None]) -> Path:
    """``save(tmp)`` to a temporary name beside ``path``, then rename it over ``path``, as :func:`atomic_write_text`
    does for text. The temporary name keeps the suffix (``<stem>.<pid>.partial<suffix>``), since writers such as
    ``np.save`` and ``np.savez`` add theirs to a name without it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.partial{path.suffix}")
    save(tmp)
    tmp.replace(path)
    return path

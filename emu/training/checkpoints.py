"""Checkpoints that cannot be half-written, and a clear answer when the one asked for is broken.

:class:`AtomicCheckpointIO` writes every checkpoint (``last.ckpt`` included) to a temporary file beside its target and
renames it into place: a kill during the write leaves the previous file whole. :func:`resolve_checkpoint` checks the
checkpoint a run is asked to resume from before any work starts; a truncated or corrupt one is refused with an
error that names it and the newest complete alternative in the same folder.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.plugins.io import TorchCheckpointIO

from emu.errors import ConfigError

log = logging.getLogger("emu.training")


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


def replace_folder(new: str | Path, path: str | Path) -> None:
    """Put the complete checkpoint folder ``new`` at ``path``. A folder cannot be renamed over another atomically, so
    the previous checkpoint moves to ``<path>.old`` first and is removed last: at every moment a complete checkpoint
    is at ``path`` or, for the instant between the two renames, at ``<path>.old`` (which
    :func:`resolve_checkpoint` falls back to)."""
    new, path = Path(new), Path(path)
    old = path.with_name(path.name + ".old")
    if path.exists():
        _remove(old)  # a leftover of an earlier replacement that finished
        os.replace(path, old)
    os.replace(new, path)
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def save_last(trainer) -> Path:
    """Save ``last.ckpt`` in the run's checkpoint folder now (every rank calls it) and tell the ModelCheckpoint, so
    that its ``last_model_path`` (and what it saves or removes later) knows this file; returns the path."""
    ckpt = trainer.checkpoint_callback
    folder = Path(ckpt.dirpath) if ckpt is not None and ckpt.dirpath else Path(trainer.default_root_dir)
    path = folder / "last.ckpt"
    if ckpt is not None and hasattr(ckpt, "last_model_path"):
        ckpt.last_model_path = str(path)  # before the save: the checkpoint holds the callback's state
    trainer.save_checkpoint(path)
    return path


class LastAfterValidation(L.Callback):
    """Re-save ``last.ckpt`` after a validation that ran at the very step it was saved at.

    ``ModelCheckpoint`` writes ``last.ckpt`` at the end of a training batch, before that step's validation, and then
    skips saving again at the same step; whatever validation computes (the autoencoder's latent statistics, which
    its export carries) would be missing from the newest checkpoint. The rule: state computed at validation end is
    in the checkpoint that follows it, so ``last.ckpt`` and the export of a run always agree.
    """

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ckpt = trainer.checkpoint_callback
        if trainer.sanity_checking or trainer.state.fn != "fit" or ckpt is None or not getattr(ckpt, "save_last", 0):
            return
        # the same decision on every rank (no file-system check: ranks may see different disks), so the collective
        # save below cannot leave one rank waiting
        if (
            getattr(ckpt, "last_model_path", "")
            and getattr(ckpt, "_last_global_step_saved", None) == trainer.global_step
        ):
            save_last(trainer)


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
    if ckpt_path in ("best", "hpc", "registry") or "://" in str(ckpt_path) or str(ckpt_path).startswith("registry:"):
        return ckpt_path  # Lightning's own names and remote stores: Lightning resolves and checks them
    if ckpt_path == "last":
        if folder is None:
            return None
        path = Path(folder) / "last.ckpt"
    else:
        path = Path(ckpt_path).expanduser()
    moved = path.with_name(path.name + ".old")  # a sharded save was cut between its two renames
    if not path.exists() and moved.exists() and checkpoint_problem(moved) is None:
        log.warning("'%s' is missing but '%s' (the checkpoint it replaced) is complete: resuming from that", path,
                    moved)  # fmt: skip
        return str(moved)
    if ckpt_path == "last" and not path.exists():
        return None
    problem = checkpoint_problem(path)
    if problem is None:
        return str(path)
    others = [p for p in complete_checkpoints(path.parent) if p.resolve() != path.resolve()]
    hint = f"the newest complete one there is '{others[0]}': resume with ckpt_path={others[0]}" if others else (
        f"there is no complete checkpoint in '{path.parent}'")  # fmt: skip
    raise ConfigError("ckpt_path", f"'{path}' is {problem}; {hint}")

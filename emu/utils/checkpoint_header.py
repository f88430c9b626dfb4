"""The emu header of a Lightning checkpoint, ``checkpoint["emu"]``: what the checkpoint holds.

Each stage's module writes it in ``on_save_checkpoint`` (:func:`write_header`: ``kind`` plus what rebuilds its network
without the run's config, such as the autoencoder's or U-Net's config and the training resolution); everything that
opens a checkpoint reads it through :func:`header`.
"""

from __future__ import annotations

from typing import Any

KEY = "emu"


def write_header(checkpoint: dict[str, Any], kind: str, **fields: Any) -> None:
    """Put the header (``kind`` and ``fields``) into a checkpoint being saved."""
    checkpoint[KEY] = {"kind": kind, **fields}


def header(checkpoint: Any) -> dict[str, Any]:
    """The header of a loaded checkpoint; ``{}`` for anything without one (another program's file, not a dict)."""
    info = checkpoint.get(KEY) if isinstance(checkpoint, dict) else None
    return info if isinstance(info, dict) else {}

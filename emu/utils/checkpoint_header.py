"""The emu header of a Lightning checkpoint, ``checkpoint["emu"]``: what the checkpoint holds.

Each stage's module writes it in ``on_save_checkpoint`` (:func:`write_header`: ``kind`` plus what rebuilds its network
without the run's config, such as the autoencoder's or U-Net's config and the training resolution); everything that
opens a checkpoint reads it through :func:`header`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

KEY = "emu"
SHARDED_META = "meta.pt"  # lightning.fabric.utilities.load._METADATA_FILENAME: a sharded checkpoint's non-tensor part


def write_header(checkpoint: dict[str, Any], kind: str, **fields: Any) -> None:
    """Put the header (``kind`` and ``fields``) into a checkpoint being saved."""
    checkpoint[KEY] = {"kind": kind, **fields}


def header(checkpoint: Any) -> dict[str, Any]:
    """The header of a loaded checkpoint; ``{}`` for anything without one (another program's file, not a dict)."""
    info = checkpoint.get(KEY) if isinstance(checkpoint, dict) else None
    return info if isinstance(info, dict) else {}


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a sharded (FSDP, torch.distributed.checkpoint) checkpoint folder."""
    return Path(path).is_dir() and any(Path(path).glob("*.distcp"))


def diffusers_unet_folder(path: str | Path) -> Path | None:
    """The diffusers ``UNet2DConditionModel`` folder at ``path``: the folder itself or a pipeline folder's ``unet/``
    (e.g. SDXL-base's); None for anything else."""
    import json

    for folder in (Path(path).expanduser(), Path(path).expanduser() / "unet"):
        config = folder / "config.json"
        if config.is_file() and json.loads(config.read_text()).get("_class_name") == "UNet2DConditionModel":
            return folder
    return None


def read_header(path: str | Path) -> dict[str, Any]:
    """The header of a checkpoint file, or of a sharded checkpoint folder (Lightning keeps everything but the weights
    and optimizer states, the header included, in the folder's ``meta.pt``); ``{}`` when it has none."""
    import torch

    path = Path(path)
    if is_sharded_checkpoint(path):
        path = path / SHARDED_META
        if not path.is_file():
            return {}
    return header(torch.load(path, map_location="cpu", weights_only=False, mmap=not path.name.endswith(SHARDED_META)))

"""Data: the shared DataModule and its sources (a folder, webdataset shards, precomputed latents)."""

from importlib import import_module

_LAZY = {
    "EmuDataModule": "emu.data.datamodule",
    "FolderSource": "emu.data.sources",
    "WebDatasetSource": "emu.data.sources",
}
__all__ = list(_LAZY)


def __getattr__(name: str):  # lazy, so importing a source does not pay for importing Lightning
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'emu.data' has no attribute {name!r}")

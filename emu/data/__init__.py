"""Data: the shared DataModule, its sources (haystack, folder, webdataset) and the haystack domain."""

from importlib import import_module

_LAZY = {
    "EmuDataModule": "emu.data.datamodule",
    "HaystackSource": "emu.data.sources",
    "FolderSource": "emu.data.sources",
    "WebDatasetSource": "emu.data.sources",
}
__all__ = list(_LAZY)


def __getattr__(name: str):  # lazy, so `python -m emu.data.haystack` does not pay for importing Lightning
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'emu.data' has no attribute {name!r}")

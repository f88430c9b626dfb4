"""Image sets (Fréchet distances' references, autoencoders' test images): a folder of images, or a named set a config
registers (:mod:`emu.utils.named_sets`; the miniature's held-out needles: ``haystack_needles:N``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from emu.data.samples import SamplePreparer
from emu.errors import ConfigError
from emu.utils import named_sets

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def folder_images(folder: str | Path, resolution: int, key: str = "fid.reference") -> torch.Tensor:
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(key, f"'{folder}' holds no images")
    prepare = SamplePreparer(resolution=resolution, require_caption=False)
    return torch.stack([prepare({"key": p.name, "image": p.read_bytes()})["image"] for p in files])


def reference_set(spec: str, resolution: int, key: str = "fid.reference") -> tuple[str, callable]:
    """``(cache key, loader)`` for a registered named image set or an image folder."""
    provider = named_sets.provider("images", spec)
    if provider is not None:
        return provider(str(spec), resolution, key)
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise named_sets.unknown_set("images", spec, key, "an image folder")
    files = sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*")
                   if p.suffix.lower() in IMAGE_SUFFIXES)  # fmt: skip
    digest = hashlib.sha1(json.dumps(files).encode()).hexdigest()[:16]
    return f"{folder.resolve()}|{digest}|{resolution}", lambda: folder_images(folder, resolution, key)

"""Reference image sets for the Fréchet distances: held-out haystack needles, or a folder of images."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from emu.data.haystack import make_sample, metadata, scene_spec
from emu.data.samples import SamplePreparer
from emu.errors import ConfigError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def haystack_needles(n: int, seed: int = 0, start: int = 1_000_000, resolution: int = 64) -> torch.Tensor:
    """The first ``n`` needles (flawless, appealing images: what curation looks for) of haystack ``seed`` from
    index ``start`` (past every training range), in [-1, 1]."""
    prepare = SamplePreparer(resolution=resolution, require_caption=False)
    out, i = [], start
    while len(out) < n:
        spec = scene_spec(seed, i)
        if metadata(spec, resolution, resolution)["needle"]:
            image, meta = make_sample(seed, i, resolution)
            out.append(prepare({"key": meta["key"], "image": image})["image"])
        i += 1
    return torch.stack(out)


def folder_images(folder: str | Path, resolution: int) -> torch.Tensor:
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError("fid.reference", f"'{folder}' holds no images")
    prepare = SamplePreparer(resolution=resolution, require_caption=False)
    return torch.stack([prepare({"key": p.name, "image": p.read_bytes()})["image"] for p in files])


def reference_set(spec: str, resolution: int) -> tuple[str, callable]:
    """``(cache key, loader)`` for ``haystack_needles:N[@START]`` or an image folder."""
    if spec.startswith("haystack_needles:"):
        count, _, start = spec.removeprefix("haystack_needles:").partition("@")
        n, first = int(count), int(start or 1_000_000)
        return f"{spec}|{resolution}", lambda: haystack_needles(n, 0, first, resolution)
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise ConfigError("fid.reference", f"'{spec}' is neither haystack_needles:N nor an image folder")
    files = sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*")
                   if p.suffix.lower() in IMAGE_SUFFIXES)  # fmt: skip
    digest = hashlib.sha1(json.dumps(files).encode()).hexdigest()[:16]
    return f"{folder.resolve()}|{digest}|{resolution}", lambda: folder_images(folder, resolution)

"""The sample-folder format that ``sample.py`` writes and ``eval.py`` reads and writes: one PNG per image and a
``metadata.jsonl`` with a row per image (``file``, ``prompt``, ``seed`` and the generation settings), so that any
judge, ours or someone else's, can grade the images later.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from emu.utils.images import to_pil

METADATA = "metadata.jsonl"


def write_sample_folder(folder: str | Path, images: torch.Tensor, prompts: list[str], seeds: list[int],
                        **settings: Any) -> Path:  # fmt: skip
    """``images`` (B x 3 x H x W in [-1, 1]) as ``00000.png``... with their prompt, seed and ``settings``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / METADATA).open("w") as f:
        for i, (image, prompt, seed) in enumerate(zip(images, prompts, seeds, strict=True)):
            name = f"{i:05d}.png"
            to_pil(image).save(folder / name)
            f.write(json.dumps({"file": name, "prompt": prompt, "seed": seed, **settings}) + "\n")
    return folder


def is_sample_folder(folder: str | Path) -> bool:
    return (Path(folder) / METADATA).is_file()


def read_sample_folder(folder: str | Path) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """The images of a sample folder (B x 3 x H x W in [-1, 1]) and its metadata rows, in order."""
    folder = Path(folder)
    rows = [json.loads(line) for line in (folder / METADATA).read_text().splitlines() if line.strip()]
    images = [torch.from_numpy(np.asarray(Image.open(folder / r["file"]).convert("RGB"), dtype=np.float32))
              for r in rows]  # fmt: skip
    return torch.stack(images).permute(0, 3, 1, 2) / 127.5 - 1, rows

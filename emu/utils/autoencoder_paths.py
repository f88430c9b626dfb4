"""What a ``model.autoencoder`` (or stage 0's ``init_from``) names, before anything is loaded.

One of: a stage-0 Lightning checkpoint (a file); an emu export folder (``config.json`` naming ``emu.AutoencoderKL``);
a diffusers ``AutoencoderKL`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``: SD's, SDXL's, SD3's,
FLUX.1's autoencoder), alone or as a pipeline folder's ``vae/``; or a Hugging Face hub id (``owner/name``) of either
diffusers layout, found in the local cache only: nothing is downloaded; or ``pixels``: none, diffusion on pixels
(:class:`emu.autoencoder.pixel.PixelSpace`). Shared by the loader
(:func:`emu.autoencoder.module.load_autoencoder`), config validation and the memory plan, which read configs without
building networks.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import NamedTuple

CONFIG_NAME = "config.json"
EMU_CLASS = "emu.AutoencoderKL"
DIFFUSERS_CLASS = "AutoencoderKL"
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")  # owner/name
SUBFOLDERS = ("", "vae")  # a VAE repo or folder; a pipeline's VAE
PIXELS = "pixels"  # model.autoencoder=pixels: no autoencoder, diffusion on pixels (emu.autoencoder.pixel.PixelSpace)
# its config (RGB): AutoencoderKL's keys, with no levels (f = 1) and no Fourier features
PIXEL_CONFIG = {"in_channels": 3, "out_channels": 3, "latent_channels": 3, "block_out_channels": [],
                "fourier_frequencies": []}  # fmt: skip


class AutoencoderSource(NamedTuple):
    kind: str  # "checkpoint", "emu" (export folder), "diffusers" (AutoencoderKL folder) or "pixels" (none)
    path: Path


def _class_name(folder: Path) -> str | None:
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return None
    return config.get("_class_name") if isinstance(config, dict) else None


def _hub_folders(repo_id: str) -> list[Path]:
    """The folders of ``repo_id``'s cached snapshot that hold a ``config.json`` (root, then ``vae/``)."""
    from huggingface_hub import try_to_load_from_cache

    found = []
    for sub in SUBFOLDERS:
        file = try_to_load_from_cache(repo_id, f"{sub}/{CONFIG_NAME}" if sub else CONFIG_NAME)
        if isinstance(file, str):
            found.append(Path(file).parent)
    return found


def downsample_factor(config: dict) -> int:
    """An autoencoder config's f: ``2 ** (levels - 1)``, 1 with no levels (pixel space)."""
    levels = len(config.get("block_out_channels") or [])
    return 2 ** (levels - 1) if levels else 1


def find_autoencoder(path: str | Path) -> AutoencoderSource:
    """What ``path`` holds (:class:`AutoencoderSource`); ``FileNotFoundError`` when it is nothing of the kind, and
    ``ValueError`` for a folder of another model (naming its class)."""
    if str(path) == PIXELS:
        return AutoencoderSource(PIXELS, Path(PIXELS))
    local = Path(path).expanduser()
    if local.is_file():
        return AutoencoderSource("checkpoint", local)
    if local.is_dir():
        folders = [local / sub for sub in SUBFOLDERS]
    elif HUB_ID.match(str(path)):
        folders = _hub_folders(str(path))
    else:
        folders = []
    classes = {}
    for folder in folders:
        name = _class_name(folder)
        if name in (EMU_CLASS, DIFFUSERS_CLASS):
            return AutoencoderSource("emu" if name == EMU_CLASS else "diffusers", folder)
        if name:
            classes[folder] = name
    if classes:
        folder, name = next(iter(classes.items()))
        raise ValueError(f"'{folder}' holds a {name}; an autoencoder is an emu export ({EMU_CLASS}) or diffusers' "
                         f"{DIFFUSERS_CLASS} (SD, SDXL, SD3, FLUX.1)")  # fmt: skip
    raise FileNotFoundError(
        f"'{path}' is neither an autoencoder export folder (emu's, or diffusers' AutoencoderKL, alone or as a "
        "pipeline's vae/) nor a stage-0 checkpoint, nor a hub id in the local Hugging Face cache (nothing is "
        "downloaded)"
    )

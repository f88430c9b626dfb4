"""Image grids and logging them to whichever loggers a Trainer has (CSV/TensorBoard/W&B)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid

from emu.utils.steps import log_step


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """B x 3 x H x W in [-1, 1] -> uint8 in [0, 255]."""
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_pil(image: torch.Tensor) -> Image.Image:
    """One 3 x H x W image in [-1, 1] -> PIL."""
    return Image.fromarray(to_uint8(image).permute(1, 2, 0).numpy())


def image_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2) -> Image.Image:
    """A PIL grid of B x 3 x H x W images in [-1, 1]."""
    grid = make_grid(to_uint8(images), nrow=nrow, padding=padding, pad_value=255)
    return Image.fromarray(grid.permute(1, 2, 0).numpy())


def log_image(trainer, name: str, image: Image.Image, caption: str | None = None) -> list[str]:
    """Log a PIL image to every logger of ``trainer``; loggers without image support get a PNG in their dir.

    Returns the paths of PNG files written (empty when every logger took the image itself).
    """
    import numpy as np
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    written = []
    step = log_step(trainer)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(name, np.asarray(image), step, dataformats="HWC")
        elif isinstance(logger, WandbLogger):
            logger.log_image(key=name, images=[image], step=step, caption=[caption] if caption else None)
        else:
            folder = Path(logger.log_dir or trainer.default_root_dir) / "images"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{name.replace('/', '_')}_step{step:07d}.png"
            image.save(path)
            written.append(str(path))
    return written

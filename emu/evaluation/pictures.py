"""The evaluation's pictures: text-to-image pairs side by side; autoencoder reconstructions under their originals."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw

from emu.evaluation.items import Generated, load_reconstructor
from emu.evaluation.reconstruction import reconstruct
from emu.utils.images import image_grid


def side_by_side(a: Generated, b: Generated, n: int = 16, columns: int = 8) -> Image.Image:
    """Pairs in columns, A above B, blocks of ``columns`` prompts; a header names A and B."""
    n = min(n, len(a.prompts))
    blocks = []
    for start in range(0, n, columns):
        idx = list(range(start, min(n, start + columns)))
        blocks.append(torch.cat([a.images[idx], b.images[idx]]))
    grids = [image_grid(block, nrow=len(block) // 2) for block in blocks]
    width = max(g.width for g in grids)
    header = 14
    canvas = Image.new("RGB", (width, header + sum(g.height + 6 for g in grids)), "white")
    ImageDraw.Draw(canvas).text((2, 1), f"top: {a.name}   bottom: {b.name}", fill="black")
    y = header
    for g in grids:
        canvas.paste(g, (0, y))
        y += g.height + 6
    return canvas


def reconstruction_grid(images: torch.Tensor, paths: list[str], names: list[str], columns: int = 16) -> Image.Image:
    """Originals in the first row, then each autoencoder's reconstructions of them, one row each, named."""
    images = images[:columns]
    rows = [images] + [reconstruct(load_reconstructor(p).eval(), images) for p in paths]
    grid = image_grid(torch.cat(rows), nrow=len(images))
    label_w = 64
    canvas = Image.new("RGB", (grid.width + label_w, grid.height), "white")
    canvas.paste(grid, (label_w, 0))
    draw, row_h = ImageDraw.Draw(canvas), grid.height / len(rows)
    for i, label in enumerate(["original", *names]):
        draw.text((2, int(i * row_h + row_h / 2) - 5), label[:10], fill="black")
    return canvas

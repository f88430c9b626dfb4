"""What the funnel writes for people and for training: contact sheets of a human pass's candidates, each stage's
examples (``sheets/<stage>.png``) and the curated set (``curated/``: PNGs + ``metadata.jsonl``, read by data=folder).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from emu.curation.pieces import CurationError, FunnelContext
from emu.curation.tables import Table
from emu.utils.files import atomic_write_text
from emu.utils.images import image_grid, to_pil, to_uint8


def _images(ctx: FunnelContext, wanted: dict[int, list[str]], desc: str) -> dict[str, torch.Tensor]:
    images: dict[str, torch.Tensor] = {}
    for batch in ctx.batches({p: set(keys) for p, keys in wanted.items()}, desc):
        images.update(zip(batch["key"], batch["image"], strict=True))
    return images


def contact_sheets(ctx: FunnelContext, wanted: dict[int, list[str]], folder: Path, task: str,
                   per_sheet: int = 64) -> None:  # fmt: skip
    """Numbered sheets of the candidates (``{piece: keys}``) and ``sheets.md`` mapping numbers to keys (for real
    annotators; ``task`` says what to do with them), and each candidate as ``candidates/<n>.png`` with
    ``candidates.jsonl`` (key, file): what the annotation app (``python -m emu.annotate``) shows."""
    if (folder / "sheets.md").is_file():
        return
    keys = [k for p in sorted(wanted) for k in wanted[p]]
    images = _images(ctx, wanted, "contact sheets")
    (folder / "candidates").mkdir(exist_ok=True)
    index = []
    for i, k in enumerate(k for k in keys if k in images):
        to_pil(images[k]).save(folder / "candidates" / f"c{i:06d}.png")
        index.append(json.dumps({"key": k, "file": f"c{i:06d}.png"}))
    atomic_write_text(folder / "candidates.jsonl", "\n".join(index) + "\n")
    lines = ["# Candidates", "", f"{len(keys)} images; {task}", ""]
    for s in range(0, len(keys), per_sheet):
        chunk = [k for k in keys[s : s + per_sheet] if k in images]
        if chunk:
            image_grid(torch.stack([images[k] for k in chunk]), nrow=8).save(folder / f"sheet_{s // per_sheet:03d}.png")
            lines.append(f"- sheet_{s // per_sheet:03d}.png: " + ", ".join(chunk))
    atomic_write_text(folder / "sheets.md", "\n".join(lines) + "\n")


def stage_sheets(ctx: FunnelContext, stages: list[str], examples: int) -> None:
    """``sheets/<stage>.png``: kept examples on top, rejected below (the first ``examples`` of each)."""
    picks: dict[str, tuple[list[str], list[str]]] = {}
    wanted: dict[int, list[str]] = {}
    for name in stages:
        if not Table.finished(ctx.table(name)) or (ctx.out / "sheets" / f"{name}.png").is_file():
            continue
        table, kept, dropped = Table(ctx.table(name)), [], []
        for piece in sorted(table.pieces):  # until both rows are full
            for r in table.rows(piece):
                side = kept if r["kept"] else dropped
                if len(side) < examples:
                    side.append(r["key"])
                    wanted.setdefault(piece, []).append(r["key"])
            if len(kept) == len(dropped) == examples:
                break
        picks[name] = (kept, dropped)
    if not wanted:
        return
    images = _images(ctx, wanted, "sheets")
    (ctx.out / "sheets").mkdir(exist_ok=True)
    blank = torch.ones_like(next(iter(images.values())))
    for name, (kept, dropped) in picks.items():
        row = lambda ks: [images.get(k, blank) for k in ks] + [blank] * (examples - len(ks))
        image_grid(torch.stack(row(kept) + row(dropped)), nrow=examples).save(ctx.out / "sheets" / f"{name}.png")


def export_curated(ctx: FunnelContext, wanted: dict[int, list[str]]) -> Path:
    """``curated/``: a PNG per image of ``{piece: keys}`` and ``metadata.jsonl`` (file_name, text, key, hidden labels),
    written a piece at a time; kept when complete."""
    folder = ctx.out / "curated"
    done = folder / "metadata.jsonl"
    every = [k for ks in wanted.values() for k in ks]  # the curated set is small: it is a human pass's output
    keys = set(every)
    if len(keys) < len(every):  # a file per key: two images under one key would overwrite each other
        twice = sorted({k for k in every if every.count(k) > 1})
        raise CurationError(f"keys name images, but {len(twice)} curated keys come from more than one piece of the "
                            f"data (first: {twice[0]!r}): give the source unique keys (WebDataset: unique __key__ "
                            "across shards)")  # fmt: skip
    if done.is_file() and {json.loads(line)["key"] for line in done.open()} == keys:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tmp = done.with_name("metadata.jsonl.partial")
    with tmp.open("w") as f:
        for piece in ctx.track(sorted(p for p, keys in wanted.items() if keys), "export"):
            hidden = {r["key"]: r.get("hidden", {}) for r in ctx.index.rows(piece)}
            for batch in ctx.piece_batches(piece, set(wanted[piece]), "export"):
                for key, image, caption in zip(batch["key"], to_uint8(batch["image"]), batch["caption"], strict=True):
                    Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{key}.png")
                    f.write(json.dumps({"file_name": f"{key}.png", "text": caption, "key": key,
                                        **hidden.get(key, {})}) + "\n")  # fmt: skip
    tmp.replace(done)
    return folder

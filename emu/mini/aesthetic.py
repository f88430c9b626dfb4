"""The miniature's aesthetic ratings: the hidden appeal of a *separate* haystack sample (seed 1), standing in for human
ratings as AVA does for LAION, and the command that trains the curation's aesthetic head on them::

    python -m emu.mini.aesthetic --clip outputs/demo/clip/export --out outputs/demo/curate/aesthetic.safetensors
"""

from __future__ import annotations

import argparse
import time

import torch

from emu.curation.aesthetic import train_head
from emu.data.datamodule import EmuDataModule
from emu.mini.source import HaystackSource
from emu.text.clip import ClipEmbedder


def haystack_ratings(clip, n: int, seed: int = 1, resolution: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP image embeddings and hidden appeal of ``n`` images of a separate haystack (``seed`` != the corpus')."""
    dm = EmuDataModule(HaystackSource(n_train=n, n_val=0, seed=seed, resolution=resolution), resolution=resolution,
                       batch_size=min(256, n), require_caption=False, num_workers=0, drop_last=False)  # fmt: skip
    embs, ratings = [], []
    for batch in dm.dataloader("train", shuffle=False):
        embs.append(clip.embed_images(batch["image"]))
        ratings += [m["appeal"] for m in batch["meta"]]
    return torch.cat(embs), torch.tensor(ratings)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m emu.mini.aesthetic", description=__doc__.split("\n\n")[0])
    p.add_argument("--clip", required=True, help="CLIPModel folder whose image embeddings the head reads")
    p.add_argument("--out", required=True, help="where to write the head (.safetensors)")
    p.add_argument("--n", type=int, default=5000, help="rated images (a haystack with --seed, not the corpus)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--epochs", type=int, default=60)
    args = p.parse_args(argv)
    t = time.time()
    emb, ratings = haystack_ratings(ClipEmbedder(args.clip), args.n, args.seed)
    head, metrics = train_head(emb, ratings, epochs=args.epochs)
    head.save(args.out)
    mae, r = metrics["val_mae"], metrics["val_pearson"]
    print(f"aesthetic head on {args.n} rated images (haystack seed {args.seed}): held-out MAE {mae:.2f}, "
          f"Pearson r {r:.2f}; {time.time() - t:.0f}s -> {args.out}")  # fmt: skip


if __name__ == "__main__":
    main()

"""Training the aesthetic head (:class:`emu.text.aesthetic.AestheticHead`, the LAION predictor's MLP) on
(CLIP embedding, rating) pairs; in the miniature the ratings are the hidden appeal of a
*separate* haystack sample (seed 1), standing in for human ratings as AVA does for LAION::

    python -m emu.curation.aesthetic --clip outputs/demo/clip/export --out outputs/demo/curate/aesthetic.safetensors

:class:`CurationJudge` scores generated images with the same two models (the recipe's own eyes), for quality-tuning's
checkpoint selection, so that the evaluation's judge never takes part in training or selection.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from emu.data.datamodule import EmuDataModule
from emu.data.haystack import parse_caption
from emu.data.sources import HaystackSource
from emu.text.aesthetic import AestheticHead
from emu.text.clip import ClipEmbedder
from emu.text.mini_clip import zero_shot_hits


def train_head(
    embeddings: torch.Tensor, ratings: torch.Tensor, epochs: int = 60, lr: float = 1e-3, batch_size: int = 256,
    val_fraction: float = 0.1, seed: int = 0,
) -> tuple[AestheticHead, dict[str, float]]:  # fmt: skip
    """Fit the head by MSE to ``ratings``; returns it and held-out MAE / Spearman-free Pearson correlation."""
    g = torch.Generator().manual_seed(seed)
    n = len(ratings)
    perm = torch.randperm(n, generator=g)
    n_val = max(1, int(n * val_fraction))
    val, train = perm[:n_val], perm[n_val:]
    torch.manual_seed(seed)
    head = AestheticHead(embeddings.shape[1])
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(epochs):
        head.train()
        for idx in train[torch.randperm(len(train), generator=g)].split(batch_size):
            loss = F.mse_loss(head(embeddings[idx]), ratings[idx].float())
            opt.zero_grad()
            loss.backward()
            opt.step()
    head.eval()
    with torch.no_grad():
        pred = head(embeddings[val])
    truth = ratings[val].float()
    corr = torch.corrcoef(torch.stack([pred, truth]))[0, 1]
    return head, {"val_mae": float((pred - truth).abs().mean()), "val_pearson": float(corr), "n_train": len(train)}


def haystack_ratings(clip, n: int, seed: int = 1, resolution: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP image embeddings and hidden appeal of ``n`` images of a separate haystack (``seed`` != the corpus')."""
    dm = EmuDataModule(HaystackSource(n_train=n, n_val=0, seed=seed, resolution=resolution), resolution=resolution,
                       batch_size=min(256, n), require_caption=False, num_workers=0, drop_last=False)  # fmt: skip
    embs, ratings = [], []
    for batch in dm.dataloader("train", shuffle=False):
        embs.append(clip.embed_images(batch["image"]))
        ratings += [m["appeal"] for m in batch["meta"]]
    return torch.cat(embs), torch.tensor(ratings)


class CurationJudge:
    """The curation's models as a judge (``score(images, prompts) -> {"appeal", "faithfulness"}``, the protocol
    of :class:`~emu.diffusion.selection.CheckpointSelection`): appeal is the aesthetic head on the CLIP image
    embedding; faithfulness is the CLIP's zero-shot accuracy on the attributes of an image's one-object haystack
    caption (colour, shape, size, position, background), NaN for other captions (at paper scale, real prompts:
    appeal only). ``name`` says which head on which CLIP."""

    def __init__(self, clip: str, head: str, device: str = "cpu"):
        self.clip = ClipEmbedder(clip, device=device)
        self.head = AestheticHead.from_file(head).eval()
        self.name = f"aesthetic head {Path(head).name} on CLIP {Path(clip).name}"

    def to(self, device: str | torch.device) -> CurationJudge:
        """Score on ``device`` (checkpoint selection moves its judge to each rank's own GPU)."""
        self.clip.to(device)
        return self

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeddings = self.clip.embed_images(images)
        faithfulness = torch.full((len(prompts),), float("nan"))
        scenes = [parse_caption(p) for p in prompts]
        one = [i for i, s in enumerate(scenes) if s is not None and len(s["objects"]) == 1]
        if one:
            hits = zero_shot_hits(embeddings[one], [scenes[i] for i in one], self.clip.embed_texts)
            faithfulness[one] = torch.stack([h.float() for h in hits.values()]).mean(0)
        return {"appeal": self.head(embeddings), "faithfulness": faithfulness}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m emu.curation.aesthetic", description=__doc__.split("\n\n")[0])
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

"""Training the aesthetic head (:class:`emu.text.aesthetic.AestheticHead`, the LAION predictor's MLP) on
(CLIP embedding, rating) pairs (:func:`train_head`; the miniature's ratings: ``python -m emu.mini.aesthetic``).

:class:`CurationJudge` scores generated images with the same two models (the recipe's own eyes), for quality-tuning's
checkpoint selection, so that the evaluation's judge never takes part in training or selection.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from emu.text.aesthetic import AestheticHead
from emu.text.clip import ClipEmbedder


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


class CurationJudge:
    """The curation's models as a judge (``score(images, prompts) -> {"appeal", "faithfulness"}``, the protocol
    of :class:`~emu.diffusion.selection.CheckpointSelection`): appeal is the aesthetic head on the CLIP image
    embedding; faithfulness is ``faithfulness.faithfulness(embeddings, prompts, embed_texts)`` when a prompt-attribute
    scorer is given (the miniature's: :class:`emu.mini.clip.HaystackAttributes`, by ``_target_``), else NaN (at
    paper scale, real prompts: appeal only). ``name`` says which head on which CLIP."""

    def __init__(self, clip: str, head: str, device: str = "cpu", faithfulness=None):
        self.clip = ClipEmbedder(clip, device=device)
        self.faithfulness = faithfulness
        self.head = AestheticHead.from_file(head).eval()
        self.name = f"aesthetic head {Path(head).name} on CLIP {Path(clip).name}"

    def to(self, device: str | torch.device) -> CurationJudge:
        """Score on ``device`` (checkpoint selection moves its judge to each rank's own GPU)."""
        self.clip.to(device)
        return self

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeddings = self.clip.embed_images(images)
        if self.faithfulness is None:
            faithfulness = torch.full((len(prompts),), float("nan"))
        else:
            faithfulness = self.faithfulness.faithfulness(embeddings, list(prompts), self.clip.embed_texts)
        return {"appeal": self.head(embeddings), "faithfulness": faithfulness}

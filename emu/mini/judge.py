"""Pixel judges for the miniature: predict the haystack's hidden appeal and its scene attributes from pixels.

The evaluation needs judges that are independent of everything curation used: these are trained
from scratch on pixels of a separate haystack sample (its own seed), never on CLIP features. One network
with several heads:

* ``appeal``: regression of the hidden appeal score (0-10);
* ``background``: which named background (softmax);
* which ``shape``, ``color``, ``size``, ``position`` and ``shape+color`` pair the objects show (a softmax per
  group, trained against the multi-hot target spread over its values), which scores text faithfulness
  GenEval-style: the fraction of a prompt's attributes an image shows.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.layers.adaptive_avgmax_pool import adaptive_pool_feat_mult
from torch import nn

from emu.data.batches import trains_on_good_samples
from emu.mini.haystack import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, parse_caption
from emu.mini.sets import heldout_haystack
from emu.utils.images import image_grid, log_image
from emu.utils.schedules import warmup_cosine

MIRROR = {p: p.replace("left", "#").replace("right", "left").replace("#", "right") for p in POSITIONS}
PRESENCE_GROUPS: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": tuple(COLORS),
    "size": tuple(SIZES),
    "position": POSITIONS,
    "shape_color": tuple(f"{c} {s}" for c in COLORS for s in SHAPES),
}


def presence_targets(metas: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Multi-hot presence of each attribute value among a sample's objects (positions mirrored if flipped)."""
    out = {g: torch.zeros(len(metas), len(v)) for g, v in PRESENCE_GROUPS.items()}
    for i, meta in enumerate(metas):
        for obj in meta["objects"]:
            pos = MIRROR[obj["position"]] if meta.get("flipped") else obj["position"]
            values = {
                "shape": obj["shape"],
                "color": obj["color"],
                "size": obj["size"],
                "position": pos,
                "shape_color": f"{obj['color']} {obj['shape']}",
            }
            for g, v in values.items():
                out[g][i, PRESENCE_GROUPS[g].index(v)] = 1.0
    return out


class HaystackJudge(L.LightningModule):
    """A small CNN (any timm backbone, from scratch) with appeal, background and attribute-presence heads.

    ``global_pool`` is timm's: ``"catavgmax"`` concatenates average and max pooling, so that a small object's
    features are not averaged away by the background around it (a presence question, which max pooling answers).
    """

    def __init__(
        self,
        backbone: str = "resnet10t",
        global_pool: str = "avg",
        lr: float = 2e-3,
        weight_decay: float = 0.05,
        warmup_steps: int = 50,
        appeal_weight: float = 1.0,
        attribute_weight: float = 1.0,
        num_logged_images: int = 16,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.backbone = timm.create_model(backbone, pretrained=False, num_classes=0, global_pool=global_pool)
        width = self.backbone.num_features * adaptive_pool_feat_mult(global_pool)  # "catavgmax" doubles it
        self.appeal_head = nn.Linear(width, 1)
        self.background_head = nn.Linear(width, len(BACKGROUNDS))
        self.presence_heads = nn.ModuleDict({g: nn.Linear(width, len(v)) for g, v in PRESENCE_GROUPS.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Images in [-1, 1] -> ``appeal`` (B,), ``background`` logits, and attribute logits per group."""
        h = self.backbone(images)
        out = {"appeal": self.appeal_head(h).squeeze(-1) + 5.0, "background": self.background_head(h)}
        out.update({g: head(h) for g, head in self.presence_heads.items()})
        return out

    def _losses(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
        pred = self(batch["image"])
        metas = batch["meta"]
        for key, meta in zip(batch["key"], metas):
            if not {"appeal", "objects", "background"} <= set(meta):
                raise ValueError(
                    f"HaystackJudge learns from haystack metadata (appeal, objects, background); sample '{key}' has "
                    "none. Train it on data=haystack or on shards written by `python -m emu.mini.haystack`."
                )
        dev = batch["image"].device
        appeal = torch.tensor([m["appeal"] for m in metas], device=dev, dtype=torch.float32)
        background = torch.tensor([list(BACKGROUNDS).index(m["background"]) for m in metas], device=dev)
        presence = {g: t.to(dev) for g, t in presence_targets(metas).items()}
        logs = {
            "appeal_mse": F.mse_loss(pred["appeal"], appeal),
            "background_ce": F.cross_entropy(pred["background"], background),
        }
        for g in PRESENCE_GROUPS:  # cross-entropy against the multi-hot target spread evenly over its values
            target = presence[g] / presence[g].sum(-1, keepdim=True)
            logs[f"{g}_ce"] = F.cross_entropy(pred[g], target)
        attr = logs["background_ce"] + sum(logs[f"{g}_ce"] for g in PRESENCE_GROUPS)
        loss = self.hparams.appeal_weight * logs["appeal_mse"] / 4.0 + self.hparams.attribute_weight * attr
        with torch.no_grad():
            logs["appeal_mae"] = (pred["appeal"] - appeal).abs().mean()
            logs["background_acc"] = (pred["background"].argmax(-1) == background).float().mean()
            single = torch.tensor([len(m["objects"]) == 1 for m in metas], device=dev)
            for g in ("shape", "color", "size", "position"):  # top-1 accuracy on one-object scenes
                hit = (pred[g].argmax(-1) == presence[g].argmax(-1)).float()
                logs[f"{g}_acc"] = (hit * single).sum() / single.sum().clamp(min=1)
        return loss, logs, {"pred": pred, "appeal": appeal}

    @trains_on_good_samples
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, logs, _ = self._losses(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["key"]))
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, batch_size=len(batch["key"]))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss, logs, extra = self._losses(batch)
        bs = len(batch["key"])
        self.log("val/loss", loss, prog_bar=True, batch_size=bs)
        self.log_dict({f"val/{k}": v for k, v in logs.items()}, batch_size=bs)
        if batch_idx == 0 and self.trainer is not None and not self.trainer.sanity_checking:
            n = self.hparams.num_logged_images  # the same images each time, most to least appealing to the judge
            order = extra["pred"]["appeal"][:n].argsort(descending=True)
            pairs = zip(extra["pred"]["appeal"][order].tolist(), extra["appeal"][order].tolist())
            caption = "predicted/true appeal: " + " ".join(f"{p:.1f}/{t:.1f}" for p, t in pairs)
            log_image(self.trainer, "val/by_predicted_appeal", image_grid(batch["image"][:n][order]), caption)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = self.trainer.estimated_stepping_batches if self.trainer is not None else 1000
        warmup = self.hparams.warmup_steps

        sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(warmup_cosine, warmup=warmup, total=total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# ------------------------------------------------------------------------------------------------ scoring
FAITHFULNESS_GROUPS = ("shape", "color", "size", "position")


def faithfulness(pred: dict[str, torch.Tensor], prompts: list[str]) -> torch.Tensor:
    """GenEval-style text faithfulness: the fraction of the prompt's attributes the judge sees in each image.

    A prompt naming k distinct values of a group (shapes, colours, sizes, positions) is checked against the
    judge's top-k values of that group, and its background against the judge's top background; the score is
    hits / items. NaN for prompts that are not haystack captions (nothing to check)."""
    out = torch.full((len(prompts),), float("nan"))
    for i, prompt in enumerate(prompts):
        parsed = parse_caption(prompt)
        if parsed is None:
            continue
        hits = int(pred["background"][i].argmax() == list(BACKGROUNDS).index(parsed["background"]))
        items = 1
        for g in FAITHFULNESS_GROUPS:
            wanted = {PRESENCE_GROUPS[g].index(obj[g]) for obj in parsed["objects"]}
            top = set(pred[g][i].topk(len(wanted)).indices.tolist())
            hits, items = hits + len(wanted & top), items + len(wanted)
        out[i] = hits / items
    return out


class PixelJudge:
    """A trained :class:`HaystackJudge` as an evaluation judge: ``score(images, prompts)`` gives per-image
    ``appeal`` (predicted hidden appeal, 0-10) and ``faithfulness`` (see :func:`faithfulness`)."""

    name = "haystack_pixel_judge"

    def __init__(self, model: HaystackJudge, resolution: int = 64, device: str | torch.device = "cpu"):
        self.model = model.to(device).eval()
        self.resolution, self.device = resolution, torch.device(device)

    @classmethod
    def from_checkpoint(cls, path: str | Path, resolution: int = 64, device: str = "cpu") -> PixelJudge:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"no judge checkpoint at '{path}' (train one: python train.py experiment=mini/judge)"
            )
        return cls(HaystackJudge.load_from_checkpoint(path, map_location="cpu"), resolution, device)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Images in [-1, 1] (resized to the judge's resolution) -> every head's output, on the CPU."""
        outs = []
        for chunk in images.split(batch_size):
            x = chunk.float()
            if x.shape[-2:] != (self.resolution, self.resolution):
                x = F.interpolate(x, size=(self.resolution,) * 2, mode="bicubic", antialias=True).clamp(-1, 1)
            outs.append({k: v.float().cpu() for k, v in self.model(x.to(self.device)).items()})
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}

    def score(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        pred = self.predict(images)
        return {"appeal": pred["appeal"], "faithfulness": faithfulness(pred, prompts)}

    def accuracy(self, n: int = 1024, seed: int = 2, start: int = 1_000_000) -> dict[str, float]:
        """See :func:`judge_accuracy`."""
        return judge_accuracy(self, n, seed, start)


def judge_accuracy(judge: PixelJudge, n: int = 1024, seed: int = 2, start: int = 1_000_000) -> dict[str, float]:
    """How far to trust the judge, on held-out haystack images: appeal MAE and Pearson r against the hidden
    score, top-1 attribute accuracy on one-object scenes (``*_acc``: all of them; ``*_acc_clean``: flaw-free ones,
    where no monochrome, darkness, cut-off or crop hides the attribute), and faithfulness of images to their own
    captions against shuffled captions (chance level)."""
    images, metas = heldout_haystack(n, seed, start, judge.resolution)
    pred = judge.predict(images)
    truth = np.array([m["appeal"] for m in metas])
    guess = pred["appeal"].numpy()
    out = {"n": n, "haystack_seed": seed, "start": start, "appeal_mae": float(np.abs(guess - truth).mean()),
           "appeal_pearson_r": float(np.corrcoef(guess, truth)[0, 1])}  # fmt: skip
    single = [i for i, m in enumerate(metas) if len(m["objects"]) == 1]
    clean = np.array([not metas[i]["flaws"] for i in single])
    for g in FAITHFULNESS_GROUPS:
        right = [pred[g][i].argmax().item() == PRESENCE_GROUPS[g].index(metas[i]["objects"][0][g]) for i in single]
        out[f"{g}_acc"] = float(np.mean(right))
        out[f"{g}_acc_clean"] = float(np.mean(np.array(right)[clean])) if clean.any() else math.nan
    bg = np.array([pred["background"][i].argmax().item() == list(BACKGROUNDS).index(m["background"])
                   for i, m in enumerate(metas)])  # fmt: skip
    out["background_acc"] = float(bg.mean())
    flawless = np.array([not m["flaws"] for m in metas])
    out["background_acc_clean"] = float(bg[flawless].mean()) if flawless.any() else math.nan
    out["n_single_object"], out["n_single_object_clean"] = len(single), int(clean.sum())
    captions = [m["caption"] for m in metas]
    shuffled = captions[1:] + captions[:1]
    out["faithfulness_own_captions"] = float(faithfulness(pred, captions).mean())
    out["faithfulness_shuffled_captions"] = float(faithfulness(pred, shuffled).mean())
    return out

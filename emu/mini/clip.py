"""The miniature's own CLIP: a few-million-parameter ``transformers.CLIPModel`` trained contrastively on haystack pairs.

It is saved with ``save_pretrained`` (model, tokenizer, image processor) into ``<run>/export`` and loaded by path
through the code that loads ``openai/clip-vit-large-patch14``; curation (CLIP score, aesthetic features) and
evaluation (CLIP score) use it. Validation measures text-to-image top-1 retrieval among 100 candidates and
zero-shot attribute accuracy (colour, shape, background of one-object scenes), each class embedded as the mean
over captions that vary every other attribute (prompt ensembling).
"""

from __future__ import annotations

import itertools
import math
import random
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from emu.data.batches import trains_on_good_samples
from emu.data.samples import swap_left_right
from emu.mini import haystack
from emu.text.clip import clip_features
from emu.text.tokenizer import build_word_tokenizer
from emu.utils.images import image_grid, log_image
from emu.utils.schedules import warmup_cosine

ATTRIBUTES = {
    "color": tuple(haystack.COLORS),
    "shape": haystack.SHAPES,
    "size": tuple(haystack.SIZES),
    "position": haystack.POSITIONS,
    "background": tuple(haystack.BACKGROUNDS),
}


def haystack_vocabulary_text() -> list[str]:
    """Every word a haystack caption can use."""
    words = [*haystack.SHAPES, *haystack.COLORS, *haystack.SIZES, *haystack.BACKGROUNDS]
    words += [w for phrase in haystack.POSITION_PHRASES.values() for w in phrase.split()]
    return [" ".join([*words, "a", "and", "on", "background"])]


def attribute_prompts(attribute: str, value: str) -> list[str]:
    """All one-object captions with ``attribute`` = ``value`` and every other attribute varied."""
    grid = {k: ATTRIBUTES[k] for k in ("size", "color", "shape", "position", "background")}
    grid[attribute] = (value,)
    out = []
    for size, color, shape, pos, bg in itertools.product(*grid.values()):
        obj = {"size": size, "color": color, "shape": shape, "position": pos}
        out.append(haystack.caption_for([obj], bg))
    return out


class MiniClipModule(L.LightningModule):
    """Contrastive training of a small ``CLIPModel`` on haystack image-caption batches."""

    def __init__(
        self,
        image_size: int = 64,
        patch_size: int = 8,
        vision_width: int = 128,
        vision_layers: int = 3,
        text_width: int = 128,
        text_layers: int = 2,
        heads: int = 4,
        projection_dim: int = 128,
        max_length: int = 32,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        warmup_steps: int = 100,
        retrieval_candidates: int = 100,
        hard_negatives: bool | list[str] = ("shape", "color"),
        export_on_fit_end: bool = True,
    ):
        super().__init__()
        if not isinstance(hard_negatives, bool):  # plain strings: a Hydra ListConfig would not load weights-only
            hard_negatives = [str(a) for a in hard_negatives]
        self.save_hyperparameters()
        from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

        self.tokenizer = build_word_tokenizer(haystack_vocabulary_text())
        self.tokenizer.model_max_length = max_length
        tok = self.tokenizer
        config = CLIPConfig(
            text_config=dict(
                vocab_size=len(tok), hidden_size=text_width, intermediate_size=4 * text_width,
                num_hidden_layers=text_layers, num_attention_heads=heads, max_position_embeddings=max_length,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            ),
            vision_config=dict(
                hidden_size=vision_width, intermediate_size=4 * vision_width, num_hidden_layers=vision_layers,
                num_attention_heads=heads, image_size=image_size, patch_size=patch_size,
            ),
            projection_dim=projection_dim,
        )  # fmt: skip
        self.clip = CLIPModel(config)
        # our batches are already in [-1, 1]: the processor does the same for consumers that load the folder
        self.processor = CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
            image_mean=[0.5] * 3, image_std=[0.5] * 3, do_convert_rgb=True,
        )  # fmt: skip
        self._val: dict[str, list] = {}
        self._rng = random.Random(0)
        negatives = hard_negatives
        if isinstance(negatives, bool):  # older configs: true meant shape and colour
            negatives = ("shape", "color") if negatives else ()
        self._negative_attributes = tuple(negatives)
        hard_negative_captions([], self._rng, self._negative_attributes)  # a bad name fails here, not mid-run

    def _tokens(self, captions: list[str]) -> dict[str, torch.Tensor]:
        t = self.tokenizer(list(captions), padding="max_length", truncation=True, max_length=self.hparams.max_length,
                           return_tensors="pt")  # fmt: skip
        return {k: v.to(self.device) for k, v in t.items()}

    @trains_on_good_samples
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        captions, bs = list(batch["caption"]), len(batch["caption"])
        negatives = hard_negative_captions(batch["meta"], self._rng, self._negative_attributes)
        out = self.clip(**self._tokens(captions + negatives), pixel_values=batch["image"])
        logits_i2t = out.logits_per_image  # B x (B + negatives)
        target = torch.arange(bs, device=self.device)
        loss = 0.5 * (F.cross_entropy(logits_i2t, target) + F.cross_entropy(logits_i2t[:, :bs].T, target))
        with torch.no_grad():
            acc = (logits_i2t[:, :bs].T.argmax(-1) == target).float().mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/batch_t2i_acc", acc, batch_size=bs)
        self.log("train/logit_scale", self.clip.logit_scale.exp(), batch_size=bs)
        return loss

    # ------------------------------------------------------------------------------------- validation
    @torch.no_grad()
    def embed_texts(self, texts: list[str], batch_size: int = 1024) -> torch.Tensor:
        chunks = [
            self.clip.get_text_features(**self._tokens(texts[i : i + batch_size]))
            for i in range(0, len(texts), batch_size)
        ]
        return F.normalize(torch.cat([clip_features(c) for c in chunks]), dim=-1)

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(clip_features(self.clip.get_image_features(pixel_values=images.to(self.device))), dim=-1)

    def on_validation_epoch_start(self) -> None:
        self._val = {"image": [], "text": [], "caption": [], "meta": []}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out = self.clip(**self._tokens(batch["caption"]), pixel_values=batch["image"], return_loss=True)
        self.log("val/loss", out.loss, prog_bar=True, batch_size=len(batch["caption"]))
        self._val["image"].append(F.normalize(out.image_embeds, dim=-1).cpu())
        self._val["text"].append(F.normalize(out.text_embeds, dim=-1).cpu())
        self._val["caption"] += batch["caption"]
        self._val["meta"] += batch["meta"]
        if batch_idx == 0 and not self.trainer.sanity_checking:
            log_image(self.trainer, "val/images", image_grid(batch["image"][:16]), " | ".join(batch["caption"][:16]))

    def on_validation_epoch_end(self) -> None:
        if not self._val["image"]:
            return
        metrics = self.evaluate(torch.cat(self._val["image"]), torch.cat(self._val["text"]), self._val["caption"],
                                self._val["meta"])  # fmt: skip
        for k, v in metrics.items():
            self.log(f"val/{k}", v, prog_bar=k in ("t2i_top1", "zeroshot_color", "zeroshot_shape"))

    def evaluate(self, image_emb, text_emb, captions, metas) -> dict[str, float]:
        """Retrieval top-1 among ``retrieval_candidates`` and zero-shot attribute accuracies (one-object scenes)."""
        return retrieval_and_zero_shot(image_emb, text_emb, captions, metas, self.embed_texts,
                                       self.hparams.retrieval_candidates)  # fmt: skip

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["hard_negative_rng"] = self._rng.getstate()  # exact resume draws the same negatives

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "hard_negative_rng" in checkpoint:
            version, state, gauss = checkpoint["hard_negative_rng"]
            self._rng.setstate((version, tuple(state), gauss))

    def configure_optimizers(self):
        decay = [p for n, p in self.clip.named_parameters() if p.ndim >= 2 and "embedding" not in n]
        rest = [p for n, p in self.clip.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.hparams.weight_decay},
                                 {"params": rest, "weight_decay": 0.0}], lr=self.hparams.lr)  # fmt: skip
        total = max(1, self.trainer.estimated_stepping_batches) if self.trainer is not None else 1000
        warmup = self.hparams.warmup_steps

        sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(warmup_cosine, warmup=warmup, total=total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------------------------------ export
    def save_pretrained(self, folder: str | Path) -> Path:
        """Model, tokenizer and image processor in Hugging Face format (``CLIPModel.from_pretrained`` loads it)."""
        folder = Path(folder)
        self.clip.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        self.processor.save_pretrained(folder)
        return folder

    def on_fit_end(self) -> None:
        if self.hparams.export_on_fit_end and self.trainer.is_global_zero and self.trainer.default_root_dir:
            folder = self.save_pretrained(Path(self.trainer.default_root_dir) / "export")
            print(f"  exported mini CLIP to {folder}")


NEGATIVE_ATTRIBUTES = ("shape", "color", "size", "position")


def hard_negative_captions(metas: list[dict], rng: random.Random, attributes=("shape", "color")) -> list[str]:
    """Per haystack image and per attribute in ``attributes``, a caption that differs from its own only in that
    attribute of one object (a position swap keeps the objects in different cells).

    In-batch negatives rarely differ in shape or position alone (colour and background already tell pairs
    apart), so without these the towers learn them late, if at all; NegCLIP-style text negatives force them.
    """
    unknown = set(attributes) - set(NEGATIVE_ATTRIBUTES)
    if unknown:
        raise ValueError(f"hard negatives swap {NEGATIVE_ATTRIBUTES}; got {sorted(unknown)}")
    out = []
    for attribute in attributes:
        for meta in metas:
            objects = meta.get("objects")
            if not objects or "background" not in meta:
                continue
            objects = [dict(o) for o in objects]
            obj = rng.choice(objects)
            taken = {o[attribute] for o in objects} if attribute == "position" else {obj[attribute]}
            obj[attribute] = rng.choice([v for v in ATTRIBUTES[attribute] if v not in taken])
            caption = haystack.caption_for(objects, meta["background"])
            out.append(swap_left_right(caption) if meta.get("flipped") else caption)
    return out


def scene_attribute(scene: dict, attribute: str) -> str:
    """``background``, or the first object's colour / shape / size / position, of a haystack scene (metadata or
    parsed caption)."""
    return scene["background"] if attribute == "background" else scene["objects"][0][attribute]


def zero_shot_hits(image_emb: torch.Tensor, scenes: list[dict], embed_texts) -> dict[str, torch.Tensor]:
    """Per attribute, whether the zero-shot prediction for each one-object scene is right (a bool per image).

    Each class is embedded as the mean over all one-object captions with that value (prompt ensembling);
    ``embed_texts`` maps captions to L2-normalised embeddings in the space of ``image_emb``.
    """
    hits = {}
    for attribute, values in ATTRIBUTES.items():
        classes = torch.stack([embed_texts(attribute_prompts(attribute, v)).mean(0) for v in values])
        pred = (image_emb.to(classes) @ F.normalize(classes, dim=-1).T).argmax(-1).cpu()
        hits[attribute] = pred == torch.tensor([values.index(scene_attribute(s, attribute)) for s in scenes])
    return hits


def retrieval_top1(image_emb: torch.Tensor, text_emb: torch.Tensor, captions: list[str], candidates: int) -> float:
    """Text-to-image top-1 retrieval in consecutive groups of ``candidates`` pairs (a twin caption counts as a
    hit); NaN when there are fewer pairs than one group."""
    hits, total = 0, 0
    for start in range(0, len(captions) - candidates + 1, candidates):
        best = (text_emb[start : start + candidates] @ image_emb[start : start + candidates].T).argmax(-1)
        group = captions[start : start + candidates]
        hits += sum(group[int(b)] == group[i] for i, b in enumerate(best))
        total += candidates
    return hits / total if total else math.nan


def retrieval_and_zero_shot(image_emb, text_emb, captions, metas, embed_texts, candidates: int = 100) -> dict:
    """``t2i_top1`` (see :func:`retrieval_top1`) and ``zeroshot_<attribute>`` on the one-object scenes, also as
    ``zeroshot_<attribute>_clean`` on the flaw-free ones (where no monochrome, darkness or crop hides it)."""
    top1 = retrieval_top1(image_emb, text_emb, captions, candidates)
    metrics = {} if math.isnan(top1) else {"t2i_top1": top1}
    single = [i for i, m in enumerate(metas) if len(m.get("objects", [])) == 1]
    if not single:
        return metrics
    clean = torch.tensor([not metas[i].get("flaws") for i in single], dtype=torch.bool)
    hits = zero_shot_hits(image_emb[single], [metas[i] for i in single], embed_texts)
    for attribute, right in hits.items():
        metrics[f"zeroshot_{attribute}"] = float(right.float().mean())
        if clean.any():
            metrics[f"zeroshot_{attribute}_clean"] = float(right[clean].float().mean())
    return metrics


class HaystackAttributes:
    """Prompt following on haystack captions by zero-shot CLIP: for each image whose prompt is a one-object haystack
    caption, whether the CLIP reads its colour, shape, size, position and background off the image. Named in a config
    by ``_target_`` (eval.py's ``attributes``, :class:`~emu.curation.aesthetic.CurationJudge`'s ``faithfulness``):
    the real system never imports it."""

    @staticmethod
    def one_object(prompts: list[str]) -> tuple[list[int], list[dict]]:
        """The indices of the one-object haystack captions among ``prompts``, and their parsed scenes."""
        scenes = [haystack.parse_caption(p) for p in prompts]
        one = [i for i, s in enumerate(scenes) if s is not None and len(s["objects"]) == 1]
        return one, [scenes[i] for i in one]

    def hits(self, image_emb: torch.Tensor, prompts: list[str], embed_texts) -> tuple[list[int], dict]:
        """The indices of the one-object haystack captions among ``prompts`` and, per attribute, a bool per one."""
        one, scenes = self.one_object(prompts)
        return one, (zero_shot_hits(image_emb[one], scenes, embed_texts) if one else {})

    def accuracy(self, clip, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
        """Zero-shot colour / shape / size / position / background accuracy of ``clip`` (a
        :class:`~emu.text.clip.ClipEmbedder`) on the images whose prompt is a one-object haystack caption;
        ``n_scored`` says how many there were."""
        one, scenes = self.one_object(prompts)
        metrics: dict[str, float] = {"n_scored": float(len(one))}
        if not one:
            return metrics
        hits = zero_shot_hits(clip.embed_images(images[one]), scenes, clip.embed_texts)
        metrics.update({f"{attribute}_acc": float(right.float().mean()) for attribute, right in hits.items()})
        return metrics

    def faithfulness(self, image_emb: torch.Tensor, prompts: list[str], embed_texts) -> torch.Tensor:
        """Per image, the fraction of its caption's attributes the CLIP reads right; NaN for other prompts."""
        out = torch.full((len(prompts),), float("nan"))
        one, hits = self.hits(image_emb, prompts, embed_texts)
        if one:
            out[one] = torch.stack([h.float() for h in hits.values()]).mean(0)
        return out

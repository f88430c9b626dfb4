"""A CLIP loaded by path (a ``CLIPModel`` folder or cached hub name): image and text embeddings and CLIP score, for
every package that embeds with a CLIP (curation's filters and aesthetic head, the evaluation's CLIP score).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def clip_features(out) -> torch.Tensor:
    """transformers 5 returns model outputs from get_*_features; older versions a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipEmbedder:
    """A ``CLIPModel`` folder (or cached hub name) with its tokenizer and image normalisation."""

    def __init__(self, name_or_path: str | Path, device: str | torch.device = "cpu"):
        from transformers import AutoTokenizer, CLIPModel

        self.model = CLIPModel.from_pretrained(str(name_or_path)).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
        self.device = torch.device(device)
        mean, std = OPENAI_MEAN, OPENAI_STD
        processor = Path(name_or_path) / "preprocessor_config.json"
        if processor.is_file():
            cfg = json.loads(processor.read_text())
            mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.size = self.model.config.vision_config.image_size
        self.max_length = self.model.config.text_config.max_position_embeddings

    def to(self, device: str | torch.device) -> ClipEmbedder:
        """Move the model to ``device`` (embeddings still come back on the CPU)."""
        self.model.to(device)
        self.device = torch.device(device)
        return self

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Images in [-1, 1], B x 3 x H x W -> L2-normalised embeddings."""
        out = []
        for chunk in images.split(batch_size):
            x = (chunk.float() + 1) / 2
            if x.shape[-2:] != (self.size, self.size):
                x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", antialias=True).clamp(0, 1)
            x = ((x - self.mean) / self.std).to(self.device)
            out.append(clip_features(self.model.get_image_features(pixel_values=x)).float().cpu())
        return F.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: list[str], batch_size: int = 1024) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), batch_size):
            t = self.tokenizer(texts[i : i + batch_size], padding="max_length", truncation=True,
                               max_length=self.max_length, return_tensors="pt").to(self.device)  # fmt: skip
            out.append(clip_features(self.model.get_text_features(**t)).float().cpu())
        return F.normalize(torch.cat(out), dim=-1)

    def clip_score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Per-pair ``100 * max(cos, 0)``."""
        return 100 * (self.embed_images(images) * self.embed_texts(prompts)).sum(-1).clamp(min=0)

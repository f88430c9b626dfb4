"""Do generated images follow their prompts? CLIP score with a CLIP loaded by path, and, with a prompt-attribute
scorer named by dotted path (``--attributes``; the miniature's :class:`emu.mini.clip.HaystackAttributes`: for each
image whose prompt names one haystack object, the CLIP's zero-shot reading of its colour, shape, size, position and
background against the prompt's), attribute accuracy.
CLIP score is ``100 * max(cos(image, text), 0)`` (the torchmetrics / Hessel et al. convention).

CLI over a ``sample.py`` output folder::

    python -m emu.evaluation.prompt_following outputs/sample/<run> --clip outputs/demo/clip/export \
        --attributes emu.mini.clip.HaystackAttributes
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from emu.text.clip import ClipEmbedder, clip_features
from emu.utils.sample_folder import read_sample_folder


class TensorFeatures(torch.nn.Module):
    """A ``CLIPModel`` whose ``get_*_features`` return tensors: transformers 5 returns output objects, which
    torchmetrics 1.9's ``CLIPScore`` cannot normalise."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return clip_features(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return clip_features(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


def clip_score_metric(name_or_path: str | Path):
    """torchmetrics' ``CLIPScore`` (``100 * max(cos, 0)``, averaged) over a ``CLIPModel`` folder or cached hub name."""
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    def load():
        model = CLIPModel.from_pretrained(str(name_or_path)).eval()
        return TensorFeatures(model), CLIPProcessor.from_pretrained(str(name_or_path))

    return CLIPScore(model_name_or_path=load)


@torch.no_grad()
def torchmetrics_clip_score(name_or_path: str | Path, images: torch.Tensor, prompts: list[str], batch_size: int = 256,
                            metric=None) -> float:  # fmt: skip
    """Mean CLIP score of images in [-1, 1] against their prompts, computed by torchmetrics' ``CLIPScore``."""
    metric = metric or clip_score_metric(name_or_path)
    for i in range(0, len(prompts), batch_size):
        u8 = ((images[i : i + batch_size].float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        metric.update(list(u8), prompts[i : i + batch_size])
    return float(metric.compute())


def load_sample_folder(folder: str | Path) -> tuple[torch.Tensor, list[str]]:
    """Images ([-1, 1]) and prompts of a ``sample.py`` output folder (its ``metadata.jsonl``)."""
    images, rows = read_sample_folder(folder)
    return images, [r["prompt"] for r in rows]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m emu.evaluation.prompt_following", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="a sample.py output folder (metadata.jsonl + PNGs)")
    p.add_argument("--clip", required=True, help="a CLIPModel folder (the mini CLIP in the miniature)")
    p.add_argument(
        "--attributes",
        help="a prompt-attribute scorer class by dotted path, e.g. "
        "emu.mini.clip.HaystackAttributes (the miniature's): its accuracy(clip, images, prompts)",
    )
    p.add_argument("--out", help="write the metrics here as JSON (default: <folder>/prompt_following.json)")
    args = p.parse_args(argv)
    images, prompts = load_sample_folder(args.folder)
    judge = ClipEmbedder(args.clip)
    metrics = {"clip": str(args.clip), "n_images": len(prompts),
               "clip_score": float(judge.clip_score(images, prompts).mean())}  # fmt: skip
    if args.attributes:
        from hydra.utils import get_class

        metrics.update(get_class(args.attributes)().accuracy(judge, images, prompts))
    out = Path(args.out or Path(args.folder) / "prompt_following.json")
    out.write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()

"""Judges for ``eval.py`` and checkpoint selection: anything with ``score(images, prompts) -> {"appeal",
"faithfulness"}`` (tensors, one value per image) works; a judge is named in the config by ``_target_`` (conf/judge/).
Here: a human-preference model in PickScore's format. The curation's own models as a judge are
:class:`emu.curation.aesthetic.CurationJudge`; the miniature's pixel judge lives in :mod:`emu.mini.judge`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from emu.errors import ConfigError
from emu.text.clip import ClipEmbedder


class PreferenceJudge:
    """A CLIP-based human-preference model in PickScore's format (a transformers ``CLIPModel`` folder with its
    tokenizer and ``preprocessor_config.json``; Kirstain et al. 2023), loaded by local path: ``appeal`` is PickScore's
    score, ``logit_scale.exp() * cos(image, prompt)`` (a preference given the prompt: it cannot hide the prompt, as the
    paper's appeal raters did); ``faithfulness`` is the same model's CLIP score, ``100 * max(cos, 0)``. Any object
    with this ``score`` works as ``judge=`` in ``eval.py`` and in checkpoint selection."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        path = Path(path).expanduser()
        if not (path / "config.json").is_file():
            raise ConfigError("judge.path", f"'{path}' is not a CLIPModel folder (no config.json): nothing is fetched")
        self.clip = ClipEmbedder(path, device=device)
        self.name = f"preference model {path.name} (PickScore format)"

    def to(self, device: str | torch.device) -> PreferenceJudge:
        """Score on ``device`` (checkpoint selection moves its judge to each rank's own GPU)."""
        self.clip.to(device)
        return self

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        cos = (self.clip.embed_images(images) * self.clip.embed_texts(list(prompts))).sum(-1)
        scale = self.clip.model.logit_scale.exp().float().cpu()
        return {"appeal": scale * cos, "faithfulness": 100 * cos.clamp(min=0)}

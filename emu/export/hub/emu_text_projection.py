"""emu's text conditioner as a diffusers model: one trainable linear projection per frozen text encoder.

Shipped inside an exported pipeline's ``text_projection/`` folder (``python -m emu.export diffusers``); it needs only
torch and diffusers. Each encoder's per-token states are projected to the U-Net's context width and the projected
sequences are concatenated with their masks; the pooled vector of ``pooled_from`` passes through unchanged. The
config also records how each encoder is run (``kind``, ``max_length``, ``hidden_state``: ``last`` or ``penultimate``,
``mask_padding``), what the unconditional embedding is (``uncond``: the empty prompt's, or zeros) and how the encoders
are joined (``join``: ``sequence``, projected; ``features``, SDXL's: side by side, unprojected).
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class EmuTextProjection(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(
        self,
        encoders: list[dict] = (),  # [{"name", "kind": "clip" | "t5", "max_length", "hidden_size"}], in sequence order
        context_dim: int = 2048,
        uncond: str = "empty",
        pooled_from: str | None = "clip",
        join: str = "sequence",
    ):
        super().__init__()
        projected = encoders if join == "sequence" else []
        self.proj = nn.ModuleDict({e["name"]: nn.Linear(e["hidden_size"], context_dim) for e in projected})
        if not projected:  # nothing to learn: one marker so that the folder has a weights file diffusers can load
            self.register_buffer("unprojected", torch.ones(1))

    def forward(self, embeddings: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]):
        """``{name: (tokens B x L x D, mask B x L, pooled B x P or None)}`` -> ``(context, mask, pooled)``."""
        contexts, masks, pooled = [], [], None
        for e in self.config.encoders:
            tokens, mask, pool = embeddings[e["name"]]
            proj = self.proj[e["name"]] if self.config.join == "sequence" else None
            contexts.append(tokens if proj is None else proj(tokens.to(proj.weight.dtype)))
            masks.append(mask)
            if e["name"] == self.config.pooled_from:
                pooled = pool
        if self.config.join == "features":
            return torch.cat(contexts, -1), torch.stack(masks).any(0), pooled
        return torch.cat(contexts, 1), torch.cat(masks, 1), pooled

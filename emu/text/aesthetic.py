"""The LAION aesthetic predictor's MLP on L2-normalised CLIP image embeddings (the aesthetic score).

Same architecture and state-dict keys as the public predictor (``layers.0/2/4/6/7``; for CLIP ViT-L/14 the input
is 768 wide), so its checkpoint loads by path (``AestheticHead.from_file``: ``.pth`` / ``.pt`` / ``.safetensors``).
Curation filters with it and the evaluation reports it; ``python -m emu.curation.aesthetic`` trains one.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from emu.errors import ConfigError


class AestheticHead(nn.Module):
    """``Linear(d,1024) Dropout(.2) Linear(1024,128) Dropout(.2) Linear(128,64) Dropout(.1) Linear(64,16)
    Linear(16,1)`` in ``self.layers`` (LAION's ``MLP``)."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )  # fmt: skip

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Scores (B,) of image embeddings (B x d); they are L2-normalised here, as the predictor expects."""
        return self.layers(F.normalize(embeddings.float(), dim=-1)).squeeze(-1)

    @classmethod
    def from_file(cls, path: str | Path) -> AestheticHead:
        path = Path(path).expanduser()
        if not path.is_file():
            raise ConfigError("aesthetic.head", f"no aesthetic head at '{path}' (train one with "
                              "python -m emu.curation.aesthetic, or give the LAION predictor's .pth)")  # fmt: skip
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        if "layers.0.weight" not in state:
            raise ConfigError("aesthetic.head", f"'{path}' is not an aesthetic predictor (no layers.0.weight)")
        head = cls(state["layers.0.weight"].shape[1])
        head.load_state_dict(state)
        return head.eval()

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path))
        return path

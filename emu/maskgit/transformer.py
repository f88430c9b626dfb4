"""The bidirectional transformer of a masked generative image model (MaskGIT / Muse) over a grid of image tokens.

Tokens (FSQ ids, plus one mask id) are embedded, given fixed 2D sine-cosine positions and run through the DiT's
blocks (:class:`~emu.diffusion.dit.DiTBlock`: full self-attention, cross-attention to the text context as Muse's,
masked like the U-Net's); the blocks' adaLN modulation comes from the pooled text embedding (there is no time). A
last norm and linear layer give logits over the codebook at every position.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from emu.diffusion.dit import DiTBlock, modulate, sincos_2d
from emu.diffusion.unet import TimestepEmbedding, context_bias


class MaskedTokenTransformer(nn.Module):
    """Logits over ``codebook_size`` tokens at every position of a ``h x w`` token grid.

    Args:
        codebook_size: the tokenizer's tokens; id ``codebook_size`` is the mask.
        width, depth, heads, mlp_ratio, dropout: the DiT blocks'.
        context_dim: width of the text context (the conditioner projects every encoder to it).
        pooled_dim: width of the pooled text embedding that modulates every block (None: no modulation).
    """

    def __init__(self, codebook_size: int, width: int = 512, depth: int = 12, heads: int = 8,
                 context_dim: int = 2048, pooled_dim: int | None = None, mlp_ratio: int = 4,
                 dropout: float = 0.0, gradient_checkpointing: bool = False):  # fmt: skip
        super().__init__()
        if width % heads or width % 4:
            raise ValueError(f"width {width} must divide by heads ({heads}) and by 4 (the position embedding)")
        self.config = dict(codebook_size=codebook_size, width=width, depth=depth, heads=heads, context_dim=context_dim,
                           pooled_dim=pooled_dim, mlp_ratio=mlp_ratio, dropout=dropout)  # fmt: skip
        self.token_embedding = nn.Embedding(codebook_size + 1, width)
        self.class_embedding = TimestepEmbedding(pooled_dim, width) if pooled_dim else None
        self.blocks = nn.ModuleList(DiTBlock(width, heads, context_dim, mlp_ratio, dropout) for _ in range(depth))
        self.norm_out = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.adaLN_out = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        nn.init.zeros_(self.adaLN_out[1].weight)
        nn.init.zeros_(self.adaLN_out[1].bias)
        self.proj_out = nn.Linear(width, codebook_size)
        self.gradient_checkpointing = gradient_checkpointing

    @property
    def mask_id(self) -> int:
        return self.config["codebook_size"]

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = enabled

    def forward(
        self,
        tokens: torch.Tensor,
        grid: tuple[int, int],
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``tokens`` B x N ids (N = h * w, row-major; the mask id where masked), ``context`` B x L x D,
        ``context_mask`` B x L (True: a real token), ``pooled`` B x P -> B x N x codebook_size logits."""
        h, w = grid
        if tokens.shape[1] != h * w:
            raise ValueError(f"{tokens.shape[1]} tokens do not fill a {h} x {w} grid")
        x = self.token_embedding(tokens)
        x = x + sincos_2d(h, w, self.config["width"], x.device).to(x.dtype)
        c = torch.zeros(x.shape[0], self.config["width"], dtype=x.dtype, device=x.device)
        if self.class_embedding is not None:
            if pooled is None:
                raise ValueError("this transformer is modulated by the pooled text embedding: pass `pooled`")
            c = self.class_embedding(pooled.to(x.dtype))
        bias = context_bias(context_mask, x.dtype)
        context = context.to(x.dtype)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, c, context, bias, use_reentrant=False)
            else:
                x = block(x, c, context, bias)
        shift, scale = self.adaLN_out(c).chunk(2, dim=-1)
        return self.proj_out(modulate(self.norm_out(x), shift, scale))

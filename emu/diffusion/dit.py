"""A text-conditioned diffusion transformer (DiT, Peebles & Xie 2023) over patchified latents.

The latent (or image) is cut into ``patch_size`` x ``patch_size`` patches, each a token (a strided convolution, as
DiT's and SD3's ``PatchEmbed``), with fixed 2D sine-cosine position embeddings computed for the grid at hand (so any
bucket's aspect ratio works). Each block is DiT's adaLN-Zero block with PixArt-alpha's cross-attention to the text
(Chen et al. 2023): self-attention and the feed-forward are modulated (shift, scale, gate) by the time embedding plus
the pooled text embedding, and the text context enters by cross-attention between them, masked like the U-Net's.
The adaLN gates and the output projection start at zero (adaLN-Zero): a new block adds only its ungated
cross-attention to its input, and a new model predicts zero.

It takes the U-Net's call, ``net(x, t, context, context_mask, pooled)``, so the same denoiser, conditioner, samplers,
EMA, LoRA targets (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) and checkpoints serve both; a ``model.unet`` config
with ``arch: dit`` builds it (:func:`emu.diffusion.networks.build_network`; ``model=dit`` or ``model/unet=dit_xl``).
Trained by rectified flow (``model.parameterization=flow``) it is an SD3-like model with cross- instead of joint
attention.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from emu.diffusion.unet import Attention, FeedForward, TimestepEmbedding, context_bias, timestep_embedding

ARCH = "dit"


def sincos_2d(height: int, width: int, dim: int, device=None) -> torch.Tensor:
    """Fixed 2D sine-cosine position embeddings (MAE's / DiT's), ``height * width x dim`` in row-major order: half the
    channels encode the row, half the column, each as ``[sin, cos]`` over ``dim / 4`` frequencies."""
    if dim % 4:
        raise ValueError(f"the 2D sine-cosine embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64, device=device) / quarter)
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float64, device=device),
                                torch.arange(width, dtype=torch.float64, device=device), indexing="ij")  # fmt: skip
    parts = []
    for pos in (rows.flatten(), cols.flatten()):
        args = pos[:, None] * freqs[None]
        parts += [args.sin(), args.cos()]
    return torch.cat(parts, dim=1).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """adaLN-Zero self-attention and feed-forward, with cross-attention to the text context between them."""

    def __init__(self, dim: int, heads: int, context_dim: int, mlp_ratio: int = 4, dropout: float = 0.0):
        super().__init__()
        head_dim = dim // heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn1 = Attention(dim, heads, head_dim, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim, dropout=dropout)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim, mult=mlp_ratio, dropout=dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.adaLN_modulation[1].weight)
        nn.init.zeros_(self.adaLN_modulation[1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor, bias: torch.Tensor | None):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attn1(modulate(self.norm1(x), shift1, scale1))
        x = x + self.attn2(self.norm2(x), context, bias)
        return x + gate2[:, None] * self.ff(modulate(self.norm3(x), shift2, scale2))


class DiT(nn.Module):
    """Diffusion transformer with cross-attention to the text (PixArt-alpha's block on DiT's).

    Args:
        in_channels / out_channels: latent channels (16 for Emu's autoencoder; 3 on pixels).
        patch_size: latent pixels per token side (SD3: 2 on 128 x 128 latents; the miniature's 8 x 8 latents: 1).
        width: the tokens' width; depth: blocks; heads: attention heads (``width / heads`` per head).
        context_dim: width of the text context (the conditioner projects every encoder to it).
        pooled_dim: width of the pooled text embedding added to the time embedding (None: not used).
        mlp_ratio: the feed-forward's (GEGLU) inner width over ``width``.
    """

    def __init__(
        self,
        in_channels: int = 16,
        out_channels: int = 16,
        patch_size: int = 2,
        width: int = 1152,
        depth: int = 28,
        heads: int = 16,
        context_dim: int = 2048,
        pooled_dim: int | None = None,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
        gradient_checkpointing: bool = False,
        arch: str = ARCH,
    ):
        super().__init__()
        if arch != ARCH:
            raise ValueError(f"DiT builds arch={ARCH!r}, got {arch!r}")
        if width % heads or width % 4:
            raise ValueError(f"width {width} must divide by heads ({heads}) and by 4 (the position embedding)")
        self.config = dict(arch=ARCH, in_channels=in_channels, out_channels=out_channels, patch_size=patch_size,
                           width=width, depth=depth, heads=heads, context_dim=context_dim, pooled_dim=pooled_dim,
                           mlp_ratio=mlp_ratio, dropout=dropout)  # fmt: skip
        self.patch_embed = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        self.time_embedding = TimestepEmbedding(256, width)
        self.class_embedding = TimestepEmbedding(pooled_dim, width) if pooled_dim else None
        self.blocks = nn.ModuleList(DiTBlock(width, heads, context_dim, mlp_ratio, dropout) for _ in range(depth))
        self.norm_out = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.adaLN_out = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.proj_out = nn.Linear(width, patch_size * patch_size * out_channels)
        for layer in (self.adaLN_out[1], self.proj_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.gradient_checkpointing = gradient_checkpointing

    @property
    def downsample_factor(self) -> int:
        """Latent pixels per token side: the latent's sides must divide by it."""
        return self.config["patch_size"]

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = enabled

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x`` B x C x H x W latents, ``t`` B (or scalar) timesteps, ``context`` B x L x D, ``context_mask`` B x L
        (True: a real token), ``pooled`` B x P; the U-Net's call."""
        p = self.config["patch_size"]
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"latent size {tuple(x.shape[-2:])} is not divisible by the patch size {p}")
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        c = self.time_embedding(timestep_embedding(t, 256).to(x.dtype))
        if self.class_embedding is not None:
            if pooled is None:
                raise ValueError("this DiT adds a pooled text embedding to the time embedding: pass `pooled`")
            c = c + self.class_embedding(pooled.to(x.dtype))
        bias = context_bias(context_mask, x.dtype)
        context = context.to(x.dtype)
        h, w = x.shape[-2] // p, x.shape[-1] // p
        tokens = rearrange(self.patch_embed(x), "b d h w -> b (h w) d")
        tokens = tokens + sincos_2d(h, w, self.config["width"], x.device).to(tokens.dtype)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, c, context, bias, use_reentrant=False)
            else:
                tokens = block(tokens, c, context, bias)
        shift, scale = self.adaLN_out(c).chunk(2, dim=-1)
        out = self.proj_out(modulate(self.norm_out(tokens), shift, scale))
        return rearrange(out, "b (h w) (p q c) -> b c (h p) (w q)", h=h, w=w, p=p, q=p)

"""The text-conditioned U-Net, with the block structure and parameter names of diffusers' ``UNet2DConditionModel``.

Levels are described per resolution: ``block_channels[i]`` channels, ``layers_per_block[i]`` ResNet blocks,
and ``transformer_depth[i]`` transformer blocks after each ResNet (0: a plain ``DownBlock2D`` / ``UpBlock2D``
level; >0: ``CrossAttnDownBlock2D`` / ``CrossAttnUpBlock2D``). The mid block is always ResNet -> transformer ->
ResNet. A transformer block is self-attention, cross-attention to the text context (with its mask) and a GEGLU
feed-forward. The pooled text embedding, when ``pooled_dim`` is set, goes through ``class_embedding`` and is added
to the time embedding (diffusers' ``class_embed_type="projection"``), or, with ``addition_time_embed_dim``, through
``add_embedding`` together with the six size and crop ids (SDXL's ``addition_embed_type="text_time"``). Because names
match, diffusers weights load by state dict as they are (:mod:`emu.diffusion.convert`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

SIZE_CONDITIONS = 6  # original height, width; crop top, left; target height, width (SDXL's micro-conditioning)


def takes_size_cond(config: dict) -> bool:
    """Whether a U-Net of this config takes ``size_cond`` (B x 6, SDXL's ``time_ids`` order): emu's own
    ``size_conditioning`` or SDXL's ``text_time`` addition embedding (``addition_time_embed_dim``)."""
    return bool(config.get("size_conditioning") or config.get("addition_time_embed_dim"))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: ``[cos, sin]`` halves, as diffusers with
    ``flip_sin_to_cos=True, freq_shift=0``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def context_bias(context_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Cross-attention's additive bias from a B x L text mask (True: a real token): -10000 on padding, as diffusers
    (a fully masked row stays finite); None without a mask."""
    if context_mask is None:
        return None
    return ((~context_mask.bool()).to(dtype) * -10000.0)[:, None, None, :]


class TimestepEmbedding(nn.Module):
    """``linear_1 -> SiLU -> linear_2`` (diffusers' ``TimestepEmbedding``)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding added in between and a 1x1 shortcut when widths differ."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, groups: int, eps: float, dropout=0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Multi-head attention through ``scaled_dot_product_attention`` (flash / memory-efficient where available)."""

    def __init__(self, query_dim: int, heads: int, head_dim: int, context_dim: int | None = None, dropout=0.0):
        super().__init__()
        inner, context_dim = heads * head_dim, context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(dropout)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, bias: torch.Tensor | None = None):
        context = x if context is None else context
        q, k, v = (rearrange(p(t), "b n (h d) -> b h n d", h=self.heads)
                   for p, t in ((self.to_q, x), (self.to_k, context), (self.to_v, context)))  # fmt: skip
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.to_out[1](self.to_out[0](rearrange(out, "b h n d -> b n (h d)")))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text context, GEGLU feed-forward, each residual."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim, dropout=dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, bias)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """GroupNorm, projection in, ``depth`` transformer blocks over the flattened image, projection out, residual."""

    def __init__(self, channels, heads, context_dim, depth, groups, linear_projection=True, dropout=0.0):
        super().__init__()
        self.linear_projection = linear_projection
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        proj = nn.Linear if linear_projection else partial(nn.Conv2d, kernel_size=1)
        self.proj_in = proj(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, heads, channels // heads, context_dim, dropout) for _ in range(depth)]
        )
        self.proj_out = proj(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        h_, w_ = x.shape[-2:]
        h = self.norm(x)
        if self.linear_projection:
            h = self.proj_in(rearrange(h, "b c h w -> b (h w) c"))
        else:
            h = rearrange(self.proj_in(h), "b c h w -> b (h w) c")
        for block in self.transformer_blocks:
            h = block(h, context, bias)
        if self.linear_projection:
            h = rearrange(self.proj_out(h), "b (h w) c -> b c h w", h=h_, w=w_)
        else:
            h = self.proj_out(rearrange(h, "b (h w) c -> b c h w", h=h_, w=w_))
        return h + x


class Downsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=size, scale_factor=None if size else 2.0, mode="nearest"))


class _Level(nn.Module):
    """Shared forward of a down / up level: ResNet blocks, each followed by its transformer when there is one."""

    gradient_checkpointing = False

    def _call(self, module: nn.Module, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)


class DownBlock(_Level):
    """``DownBlock2D`` (no transformers) or ``CrossAttnDownBlock2D``."""

    def __init__(self, cin, cout, temb, layers, depth, heads, context_dim, groups, eps, downsample, linear, dropout):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(cin if i == 0 else cout, cout, temb, groups, eps, dropout) for i in range(layers)]
        )
        if depth:
            self.attentions = nn.ModuleList(
                [Transformer2DModel(cout, heads, context_dim, depth, groups, linear) for _ in range(layers)]
            )
        self.downsamplers = nn.ModuleList([Downsample2D(cout)]) if downsample else None

    def forward(self, h, temb, context, bias) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            h = self._call(resnet, h, temb)
            if hasattr(self, "attentions"):
                h = self._call(self.attentions[i], h, context, bias)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, skips


class UpBlock(_Level):
    """``UpBlock2D`` or ``CrossAttnUpBlock2D``: each ResNet takes the concatenated skip of the matching down level."""

    def __init__(self, cin, cprev, cout, temb, layers, depth, heads, context_dim, groups, eps, upsample, linear,
                 dropout):  # fmt: skip
        super().__init__()
        widths = [(cprev if i == 0 else cout) + (cin if i == layers - 1 else cout) for i in range(layers)]
        self.resnets = nn.ModuleList([ResnetBlock2D(w, cout, temb, groups, eps, dropout) for w in widths])
        if depth:
            self.attentions = nn.ModuleList(
                [Transformer2DModel(cout, heads, context_dim, depth, groups, linear) for _ in range(layers)]
            )
        self.upsamplers = nn.ModuleList([Upsample2D(cout)]) if upsample else None

    def forward(self, h, skips, temb, context, bias, size=None) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            h = self._call(resnet, torch.cat([h, skips.pop()], dim=1), temb)
            if hasattr(self, "attentions"):
                h = self._call(self.attentions[i], h, context, bias)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h, size)
        return h


class MidBlock(_Level):
    """``UNetMidBlock2DCrossAttn``: ResNet, transformer, ResNet."""

    def __init__(self, channels, temb, depth, heads, context_dim, groups, eps, linear, dropout):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, temb, groups, eps, dropout) for _ in range(2)])
        self.attentions = nn.ModuleList([Transformer2DModel(channels, heads, context_dim, depth, groups, linear)])

    def forward(self, h, temb, context, bias) -> torch.Tensor:
        h = self._call(self.resnets[0], h, temb)
        h = self._call(self.attentions[0], h, context, bias)
        return self._call(self.resnets[1], h, temb)


def _per_level(value: int | Sequence[int], n: int, name: str) -> tuple[int, ...]:
    values = (int(value),) * n if isinstance(value, int) else tuple(int(v) for v in value)
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries but the U-Net has {n} levels")
    return values


class UNet(nn.Module):
    """Text-conditioned latent U-Net (diffusers ``UNet2DConditionModel`` layout).

    Args:
        in_channels / out_channels: latent channels (16 for Emu's autoencoder).
        block_channels: width per level; the latent is downsampled 2x between levels.
        layers_per_block: ResNet blocks per down level (int or per level); up levels have one more.
        transformer_depth: transformer blocks per attention layer, per level (0 = no attention at that level);
            the mid block uses the last level's depth (at least 1).
        head_dim: channels per attention head: one width for all levels (SDXL: 64) or one per level (SD 1.x has 8
            heads at every level, so widths 40 / 80 / 160); the mid block uses the last level's.
        context_dim: width of the text context (the conditioner projects every encoder to it).
        pooled_dim: width of the pooled text embedding added to the time embedding (None: not used).
        size_conditioning: SDXL's size and crop conditioning: the image's original size, the crop's top-left corner and
            the target size (``size_cond``, B x 6: rows and columns each), each embedded sinusoidally and added to the
            time embedding through their own MLP. Off by default (the Emu paper does not describe it).
        addition_time_embed_dim: SDXL's ``text_time`` addition embedding instead (diffusers'
            ``addition_embed_type="text_time"``, SDXL: 256): each of the six ``size_cond`` ids embedded sinusoidally
            to this width, concatenated after the pooled text embedding and passed through one MLP
            (``add_embedding``, in ``pooled_dim + 6 * addition_time_embed_dim``) that replaces ``class_embedding``.
            Needs ``pooled_dim``; excludes ``size_conditioning``. None (default): off.
        linear_projection: transformer projections as Linear (SDXL) or 1x1 conv (SD 1.x).
    """

    def __init__(
        self,
        in_channels: int = 16,
        out_channels: int = 16,
        block_channels: Sequence[int] = (320, 640, 1280),
        layers_per_block: int | Sequence[int] = 2,
        transformer_depth: int | Sequence[int] = (0, 2, 10),
        head_dim: int | Sequence[int] = 64,
        context_dim: int = 2048,
        pooled_dim: int | None = None,
        norm_groups: int = 32,
        norm_eps: float = 1e-5,
        linear_projection: bool = True,
        dropout: float = 0.0,
        gradient_checkpointing: bool = False,
        size_conditioning: bool = False,
        addition_time_embed_dim: int | None = None,
    ):
        super().__init__()
        n = len(block_channels)
        layers = _per_level(layers_per_block, n, "layers_per_block")
        depth = _per_level(transformer_depth, n, "transformer_depth")
        head_dims = _per_level(head_dim, n, "head_dim")
        for c, hd in zip(block_channels, head_dims, strict=True):
            if c % hd or c % norm_groups:
                raise ValueError(f"block width {c} must divide by head_dim {hd} and norm_groups {norm_groups}")
        if addition_time_embed_dim and (not pooled_dim or size_conditioning):
            raise ValueError("addition_time_embed_dim (SDXL's text_time embedding) needs pooled_dim and replaces "
                             "size_conditioning: set pooled_dim and size_conditioning=False")  # fmt: skip
        head_dim = head_dim if isinstance(head_dim, int) else list(head_dims)
        optional = {"size_conditioning": True} if size_conditioning else {}
        if addition_time_embed_dim:
            optional["addition_time_embed_dim"] = int(addition_time_embed_dim)
        self.config = dict(
            in_channels=in_channels, out_channels=out_channels, block_channels=list(block_channels),
            layers_per_block=list(layers), transformer_depth=list(depth), head_dim=head_dim, context_dim=context_dim,
            pooled_dim=pooled_dim, norm_groups=norm_groups, norm_eps=norm_eps, linear_projection=linear_projection,
            dropout=dropout, **optional,
        )  # fmt: skip
        ch0, temb = block_channels[0], block_channels[0] * 4
        self.conv_in = nn.Conv2d(in_channels, ch0, 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch0, temb)
        pooled_alone = pooled_dim and not addition_time_embed_dim  # else the pooled embedding goes in add_embedding
        self.class_embedding = TimestepEmbedding(pooled_dim, temb) if pooled_alone else None
        self.size_embedding = TimestepEmbedding(SIZE_CONDITIONS * ch0, temb) if size_conditioning else None
        self.add_embedding = (TimestepEmbedding(pooled_dim + SIZE_CONDITIONS * addition_time_embed_dim, temb)
                              if addition_time_embed_dim else None)  # fmt: skip
        common = dict(context_dim=context_dim, groups=norm_groups, eps=norm_eps, linear=linear_projection,
                      dropout=dropout)  # fmt: skip

        self.down_blocks = nn.ModuleList()
        cout = ch0
        for i, c in enumerate(block_channels):
            cin, cout = cout, c
            self.down_blocks.append(DownBlock(cin, cout, temb, layers[i], depth[i], c // head_dims[i],
                                              downsample=i < n - 1, **common))  # fmt: skip
        top = block_channels[-1]
        self.mid_block = MidBlock(top, temb, max(depth[-1], 1), top // head_dims[-1], **common)

        self.up_blocks = nn.ModuleList()
        rev, rev_layers, rev_depth, rev_heads = block_channels[::-1], layers[::-1], depth[::-1], head_dims[::-1]
        cprev = top
        for i, c in enumerate(rev):
            cin = rev[min(i + 1, n - 1)]
            self.up_blocks.append(UpBlock(cin, cprev, c, temb, rev_layers[i] + 1, rev_depth[i], c // rev_heads[i],
                                          upsample=i < n - 1, **common))  # fmt: skip
            cprev = c
        self.conv_norm_out = nn.GroupNorm(norm_groups, ch0, eps=norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(ch0, out_channels, 3, padding=1)
        self.set_gradient_checkpointing(gradient_checkpointing)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.down_blocks) - 1)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        for m in self.modules():
            if isinstance(m, _Level):
                m.gradient_checkpointing = enabled

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
        size_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x`` B x C x H x W latents, ``t`` B (or scalar) timesteps, ``context`` B x L x D, ``context_mask`` B x L
        (True: a real token), ``pooled`` B x P, ``size_cond`` B x 6 (:func:`takes_size_cond`: original height,
        width, crop top, left, target height, width, as SDXL's ``time_ids``)."""
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        temb = self.time_embedding(timestep_embedding(t, self.config["block_channels"][0]).to(x.dtype))
        if self.config["pooled_dim"] and pooled is None:
            raise ValueError("this U-Net adds a pooled text embedding to the time embedding: pass `pooled`")
        if takes_size_cond(self.config) and size_cond is None:
            raise ValueError("this U-Net is size- and crop-conditioned: pass `size_cond` (B x 6)")
        if self.class_embedding is not None:
            temb = temb + self.class_embedding(pooled.to(x.dtype))
        if self.size_embedding is not None:
            emb = timestep_embedding(size_cond.flatten().float(), self.config["block_channels"][0])
            temb = temb + self.size_embedding(emb.view(x.shape[0], -1).to(x.dtype))
        if self.add_embedding is not None:  # SDXL's text_time: [pooled, embedded ids] through one MLP
            emb = timestep_embedding(size_cond.flatten().float(), self.config["addition_time_embed_dim"])
            temb = temb + self.add_embedding(torch.cat([pooled.to(x.dtype), emb.view(x.shape[0], -1).to(x.dtype)], -1))
        bias = context_bias(context_mask, x.dtype)
        context = context.to(x.dtype)

        h = self.conv_in(x)
        skips = [h]
        sizes = []
        for block in self.down_blocks:
            sizes.append(h.shape[-2:])
            h, s = block(h, temb, context, bias)
            skips += s
        h = self.mid_block(h, temb, context, bias)
        for i, block in enumerate(self.up_blocks):
            n_skip = len(block.resnets)
            level_skips, skips = skips[-n_skip:], skips[:-n_skip]
            size = tuple(sizes[-i - 2]) if block.upsamplers is not None else None
            h = block(h, level_skips, temb, context, bias, size)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))

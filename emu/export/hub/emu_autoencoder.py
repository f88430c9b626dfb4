"""emu's 16-channel autoencoder as a diffusers model: ``AutoencoderKL`` plus what diffusers has no option for.

Shipped inside an exported pipeline's ``vae/`` folder (``python -m emu.export diffusers``); it needs only torch and
diffusers. Beside diffusers' ``AutoencoderKL`` it has:

* ``fourier_frequencies``: fixed sin/cos features of the image concatenated to it before the encoder (the encoder's
  first convolution sees ``3 * (1 + 2 * len(fourier_frequencies))`` channels);
* ``patch_shortcut``: a learned linear f x f patch path beside the deep encoder (added to the posterior mean) and
  decoder (added to the output);
* the latent statistics as ``latents_mean`` / ``latents_std`` (diffusers' config keys): the pipeline normalises
  with them.
"""

from __future__ import annotations

import math

import torch
from diffusers import AutoencoderKL
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from torch import nn


def fourier_features(x: torch.Tensor, frequencies: torch.Tensor) -> torch.Tensor:
    """``[x, sin(2 pi f x), cos(2 pi f x)]`` per channel, channel-major (as emu's ``FourierFeatures``)."""
    b, _, h, w = x.shape
    arg = 2 * math.pi * x.unsqueeze(2) * frequencies.to(x).view(1, 1, -1, 1, 1)
    feats = torch.cat([arg.sin(), arg.cos()], dim=2).reshape(b, -1, h, w)
    return torch.cat([x, feats], dim=1)


class EmuAutoencoderKL(AutoencoderKL):
    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",),
        up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",),
        block_out_channels: tuple[int, ...] = (64,),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 16,
        norm_num_groups: int = 32,
        sample_size: int = 32,
        scaling_factor: float = 1.0,
        shift_factor: float | None = None,
        latents_mean: tuple[float, ...] | None = None,
        latents_std: tuple[float, ...] | None = None,
        force_upcast: bool = False,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
        mid_block_add_attention: bool = True,
        fourier_frequencies: tuple[float, ...] = (),
        patch_shortcut: bool = False,
    ):
        encoder_in = in_channels * (1 + 2 * len(fourier_frequencies))
        # the parent's own config registration is skipped: this class's config is the one above
        AutoencoderKL.__init__.__wrapped__(
            self, in_channels=encoder_in, out_channels=out_channels, down_block_types=tuple(down_block_types),
            up_block_types=tuple(up_block_types), block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block, act_fn=act_fn, latent_channels=latent_channels,
            norm_num_groups=norm_num_groups, sample_size=sample_size, scaling_factor=scaling_factor,
            shift_factor=shift_factor, latents_mean=latents_mean, latents_std=latents_std, force_upcast=force_upcast,
            use_quant_conv=use_quant_conv, use_post_quant_conv=use_post_quant_conv,
            mid_block_add_attention=mid_block_add_attention,
        )  # fmt: skip
        self.register_buffer("frequencies", torch.tensor(list(fourier_frequencies), dtype=torch.float32),
                             persistent=False)  # fmt: skip
        f = 2 ** (len(block_out_channels) - 1)
        if patch_shortcut:
            self.patch_encoder = nn.Conv2d(in_channels, latent_channels, f, stride=f)
            self.patch_decoder = nn.ConvTranspose2d(latent_channels, out_channels, f, stride=f)
        else:
            self.patch_encoder = self.patch_decoder = None
        self.use_tiling = False  # tiles would cut the patch path's grid and the Fourier features' context

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        h = fourier_features(x, self.frequencies) if len(self.frequencies) else x
        moments = self.encoder(h)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        if self.patch_encoder is not None:
            mean, logvar = moments.chunk(2, dim=1)
            moments = torch.cat([mean + self.patch_encoder(x), logvar], dim=1)
        return moments

    def _decode(self, z: torch.Tensor, return_dict: bool = True):
        out = self.decoder(self.post_quant_conv(z) if self.post_quant_conv is not None else z)
        if self.patch_decoder is not None:
            out = out + self.patch_decoder(z)
        return DecoderOutput(sample=out) if return_dict else (out,)

    def enable_tiling(self, use_tiling: bool = True) -> None:
        if use_tiling:
            raise NotImplementedError("emu's autoencoder decodes whole images (its patch path and features need them)")

"""Pixel space as an autoencoder: the identity, so that a diffusion model denoises pixels directly (Imagen-like).

``model.autoencoder=pixels`` puts :class:`PixelSpace` where the frozen autoencoder goes: it "encodes" an image in
[-1, 1] to itself (a posterior whose std is the log-variance clamp's floor, ``exp(-15)`` ~ 3e-7, far under one 8-bit
level) and "decodes" a sample to itself, with f = 1 and 3 latent channels. Everything else is the latent model's
own: the conditioner, denoiser, samplers, EMA, checkpoints, precomputed "latents" (the pixels) and exports (its
folder holds no weights but the statistics). Its statistics are zero mean and unit std, so ``latent_scaling=channel``
leaves pixels in [-1, 1]; set ``sigma_data=0.5`` (EDM's pixel value) for the v- and edm-parameterizations.
"""

from __future__ import annotations

import torch
from torch import nn

from emu.autoencoder.model import AutoencoderKL
from emu.utils.autoencoder_paths import PIXEL_CONFIG


class PixelSpace(AutoencoderKL):
    """The identity "autoencoder" of pixel diffusion (see the module docstring); ``channels``: 3 for RGB."""

    diffusers_layout = False  # no diffusers AutoencoderKL holds it: diffusers exports refuse pixel models

    def __init__(self, channels: int | None = None, **config):
        nn.Module.__init__(self)  # none of AutoencoderKL's networks: only its latent statistics and their methods
        channels = int(channels or config.get("latent_channels", PIXEL_CONFIG["latent_channels"]))  # a stored config's
        given = {**PIXEL_CONFIG, "in_channels": channels, "out_channels": channels, "latent_channels": channels}
        unknown = set(config) - set(given)
        if unknown or any(config[k] != given[k] for k in config):
            raise ValueError(f"pixel space takes only `channels`; got {config}")
        self.config = {"class": f"{type(self).__module__}.{type(self).__qualname__}", **given}
        self.fourier = self.encoder = self.decoder = self.quant_conv = self.post_quant_conv = None
        self.register_buffer("latent_mean", torch.zeros(channels))
        self.register_buffer("latent_std", torch.ones(channels))
        self.latent_statistics = {"of": "pixel space: none (the identity)"}

    @property
    def downsample_factor(self) -> int:
        return 1

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        pass  # nothing to recompute

    def moments(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.latent_channels:
            raise ValueError(f"pixel space of {self.latent_channels} channels got images of {x.shape[1]}")
        return torch.cat([x, torch.full_like(x, -30.0)], dim=1)  # the log-variance clamp's floor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z

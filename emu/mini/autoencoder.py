"""The miniature's autoencoder: :class:`~emu.autoencoder.model.AutoencoderKL` plus a learned linear patch path beside
the deep encoder and decoder, started at the PCA of the first batch's patches (conf/model/autoencoder_mini.yaml says
why: a deep autoencoder from scratch needs far more images than a CPU budget gives). It is not diffusers' layout, so
:mod:`emu.autoencoder.convert` refuses it; ``emu.export`` ships it as ``EmuAutoencoderKL`` (``patch_shortcut``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from emu.autoencoder.model import AutoencoderKL

INITIAL_LOGVAR = -8.0  # posterior std e^-4 at the start: the linear path alone, nearly sharp


def patch_shortcuts(channels: int, latent_channels: int, f: int) -> tuple[nn.Conv2d, nn.ConvTranspose2d]:
    """A linear f x f patch encoder and decoder that start as f x f average pooling of the image into the first
    ``channels`` latent channels and nearest-neighbour upsampling back (the other latent channels start unused).

    Added to the deep encoder's posterior mean and the deep decoder's output, they make an autoencoder begin
    at the linear baseline, so the deep paths only learn what a linear map cannot (DC-AE's space-to-channel
    shortcuts, Chen et al. 2024, here learned and at the latent only). Both are trained with the rest.
    """
    encoder = nn.Conv2d(channels, latent_channels, f, stride=f)  # weight: latent x channels x f x f
    decoder = nn.ConvTranspose2d(latent_channels, channels, f, stride=f)
    with torch.no_grad():
        for m in (encoder, decoder):
            m.weight.zero_()
            m.bias.zero_()
        for c in range(min(channels, latent_channels)):
            encoder.weight[c, c] = 1.0 / (f * f)
            decoder.weight[c, c] = 1.0
    return encoder, decoder


def patch_second_moment(x: torch.Tensor, f: int) -> torch.Tensor:
    """Sum of ``p p^T`` over the f x f patches of ``x`` (stride f/2, so 4x as many as the latent grid has):
    a (C*f*f)^2 float64 matrix whose top eigenvectors are the best linear patch autoencoder (uncentred PCA)."""
    patches = F.unfold(x.double(), f, stride=max(1, f // 2))  # b (c f f) n
    patches = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return patches.T @ patches


def pca_patch_weights(second_moment: torch.Tensor, k: int) -> torch.Tensor:
    """The top-``k`` eigenvectors of a patch second moment, as a k x (C*f*f) float32 matrix (sign-fixed; zero
    rows past C*f*f)."""
    _, vectors = torch.linalg.eigh(second_moment)
    top = vectors.flip(1)[:, :k].T  # k x d, largest eigenvalue first
    sign = torch.sign(top.sum(1, keepdim=True)).clamp(min=0) * 2 - 1  # deterministic sign: positive sum
    top = (top * sign).float()
    if k > top.shape[0]:  # more latent channels than a patch has values: the rest start unused
        top = torch.cat([top, top.new_zeros(k - top.shape[0], top.shape[1])])
    return top


class PatchShortcutAutoencoderKL(AutoencoderKL):
    """:class:`AutoencoderKL` with :func:`patch_shortcuts`: the linear encoder adds to the posterior mean, the linear
    decoder to the output. It starts as the linear path alone (deep outputs zero, posterior nearly sharp); the
    training module calls :meth:`init_from_batch` once, on the first batch, unless the weights come from a checkpoint.
    Takes :class:`AutoencoderKL`'s arguments."""

    diffusers_layout = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        c = self.config
        self.patch_encoder, self.patch_decoder = patch_shortcuts(c["in_channels"], c["latent_channels"],
                                                                 self.downsample_factor)  # fmt: skip
        with torch.no_grad():
            for conv in (self.encoder.conv_out, self.decoder.conv_out):
                conv.weight.zero_()
                conv.bias.zero_()
            last = self.quant_conv if self.quant_conv is not None else self.encoder.conv_out  # what gives the moments
            last.bias[: c["latent_channels"]].zero_()
            last.bias[c["latent_channels"] :].fill_(INITIAL_LOGVAR)
        # what a stored config rebuilds this from (emu.autoencoder.model.autoencoder_from_config); the flag is what
        # the exported EmuAutoencoderKL reads
        self.config.update({"class": f"{type(self).__module__}.{type(self).__qualname__}", "patch_shortcut": True})

    def moments(self, x: torch.Tensor) -> torch.Tensor:
        mean, logvar = super().moments(x).chunk(2, dim=1)  # the linear path adds to the posterior mean only
        return torch.cat([mean + self.patch_encoder(x), logvar], dim=1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return super().decode(z) + self.patch_decoder(z)

    @torch.no_grad()
    def init_from_batch(
        self, x: torch.Tensor, reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    ) -> None:
        """Start the patch path at the best linear autoencoder of ``x``'s patches (``reduce_sum`` sums the second
        moment over ranks, so every rank gets the same weights)."""
        self.init_patch_shortcut(reduce_sum(patch_second_moment(x, self.downsample_factor)))

    @torch.no_grad()
    def init_patch_shortcut(self, second_moment: torch.Tensor) -> None:
        """Set the patch shortcut to the best linear autoencoder of the patches whose second moment is given
        (:func:`patch_second_moment`, summed over batches or ranks): encoder rows and decoder columns are the
        top principal directions, so the model starts at what a linear map can reach (no biases: uncentred)."""
        k, c, f = self.latent_channels, self.patch_encoder.in_channels, self.downsample_factor
        w = pca_patch_weights(second_moment.to(self.patch_encoder.weight.device), k)
        self.patch_encoder.weight.copy_(w.view(k, c, f, f))
        self.patch_decoder.weight.copy_(w.view(k, c, f, f))
        self.patch_encoder.bias.zero_()
        self.patch_decoder.bias.zero_()


PatchShortcutAutoencoderKL.__init__.__signature__ = inspect.signature(AutoencoderKL.__init__)  # for config checks

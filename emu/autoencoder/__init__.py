"""Stage 0: the KL autoencoder (16 latent channels, Fourier-feature input, adversarial loss)."""

from emu.autoencoder.model import AutoencoderKL, DiagonalGaussian, FourierFeatures

__all__ = ["AutoencoderKL", "DiagonalGaussian", "FourierFeatures"]

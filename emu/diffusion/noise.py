"""Noise levels, as small pure functions (k-diffusion convention: ``x_noisy = x + sigma * noise``).

A discrete DDPM schedule (``alphas_cumprod``) maps to k-diffusion sigmas by ``sigma = sqrt((1 - a) / a)``; the
network of an eps- or v-model sees the fractional timestep :meth:`DiscreteSchedule.sigma_to_t`. Training draws
noise levels from the discrete schedule (uniform timesteps) or log-normally (EDM). The noise offset adds a
per-sample, per-channel constant to the noise (Emu: 0.02 in the last pre-training stage, 0.1 for quality-tuning).
"""

from __future__ import annotations

import torch

# alphas_cumprod of the final step after zero-terminal-SNR rescaling is 0 (sigma = inf); k-diffusion samplers need a
# finite sigma_max, so it is clamped here (sigma_max ~ 4500: the image is gone to float precision).
MIN_ALPHA_CUMPROD = 4.8973451890853435e-08
ZERO_SNR_SIGMA_MAX = ((1 - MIN_ALPHA_CUMPROD) / MIN_ALPHA_CUMPROD) ** 0.5


def scaled_linear_alphas_cumprod(
    steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012, zero_terminal_snr: bool = False
) -> torch.Tensor:
    """The Stable Diffusion / SDXL ``scaled_linear`` beta schedule, optionally rescaled to zero terminal SNR
    (Lin et al. 2023, "Common diffusion noise schedules and sample steps are flawed")."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    if zero_terminal_snr:
        alphas_cumprod = rescale_zero_terminal_snr(alphas_cumprod)
    return alphas_cumprod


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Shift and scale ``sqrt(alphas_cumprod)`` so the last step has SNR 0 and the first keeps its value."""
    s = alphas_cumprod.sqrt()
    s0, sT = s[0].clone(), s[-1].clone()
    s = (s - sT) * s0 / (s0 - sT)
    return (s**2).clamp(min=MIN_ALPHA_CUMPROD)


class DiscreteSchedule(torch.nn.Module):
    """The sigmas of a discrete schedule and the conversion between sigma and (fractional) timestep."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        super().__init__()
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
        self.register_buffer("sigmas", sigmas.float(), persistent=False)
        self.register_buffer("log_sigmas", sigmas.log().float(), persistent=False)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    @property
    def zero_terminal_snr(self) -> bool:
        """Whether the last timestep is pure noise (SNR 0, its sigma clamped to :data:`ZERO_SNR_SIGMA_MAX`)."""
        return self.sigma_max >= 0.999 * ZERO_SNR_SIGMA_MAX

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep by linear interpolation in log sigma."""
        log_sigma = sigma.float().log()
        dists = log_sigma - self.log_sigmas[:, None]
        low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        lo, hi = self.log_sigmas[low], self.log_sigmas[low + 1]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        return ((1 - w) * low + w * (low + 1)).view(sigma.shape)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = t.float()
        low, high = t.floor().long(), t.ceil().long()
        w = t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def sample_training_sigmas(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform integer timesteps -> their sigmas (the DDPM training distribution)."""
        t = torch.randint(0, len(self.sigmas), (n,), generator=generator, device="cpu")
        return self.sigmas.cpu()[t].to(self.sigmas.device)


def lognormal_sigmas(
    n: int, p_mean: float = -1.2, p_std: float = 1.2, generator: torch.Generator | None = None
) -> torch.Tensor:
    """EDM's training distribution: ``ln sigma ~ N(p_mean, p_std^2)``."""
    return (torch.randn(n, generator=generator) * p_std + p_mean).exp()


def offset_noise(like: torch.Tensor, offset: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian noise shaped like ``like`` plus ``offset`` times a per-sample, per-channel Gaussian constant."""
    noise = torch.randn(like.shape, generator=generator, dtype=torch.float32).to(like)
    if offset:
        const = torch.randn(like.shape[0], like.shape[1], *([1] * (like.ndim - 2)), generator=generator)
        noise = noise + offset * const.to(like)
    return noise


def snr(sigma: torch.Tensor, sigma_data: float = 1.0) -> torch.Tensor:
    """Signal-to-noise ratio of ``x + sigma * noise`` for data of std ``sigma_data``."""
    return (sigma_data / sigma) ** 2

"""Preconditioning and loss weighting: a network becomes a k-diffusion denoiser ``D(x, sigma) -> x0``.

``D(x, sigma) = c_skip * x + c_out * F(c_in * x, c_noise)`` with, for data std ``sigma_data``:

=====  =================================  ===================================  ==================  ====================
kind   c_skip                             c_out                                c_in                c_noise
=====  =================================  ===================================  ==================  ====================
eps    1                                  -sigma                               1/sqrt(sigma^2+1)   t(sigma) (discrete)
v      sd^2/(sigma^2+sd^2)                -sigma*sd/sqrt(sigma^2+sd^2)         1/sqrt(sigma^2+sd^2) t(sigma) (discrete)
edm    sd^2/(sigma^2+sd^2)                sigma*sd/sqrt(sigma^2+sd^2)          1/sqrt(sigma^2+sd^2) ln(sigma)/4
flow   1/(1+sigma)                        -sigma/(1+sigma)                     1/(1+sigma)         1000 t
=====  =================================  ===================================  ==================  ====================

``flow`` is rectified flow (Liu et al. 2022; SD3, Esser et al. 2024) in this convention: its interpolant
``x_t = (1 - t) x0 + t n`` is ``(1 - t)`` times ``x0 + sigma n`` with ``sigma = t / (1 - t)``, so ``c_in = 1 - t``
gives the network ``x_t``, and its target ``(x0 - c_skip x) / c_out`` is the velocity ``n - x0``; ``c_noise`` is
``1000 t``, SD3's (and diffusers' ``FlowMatchEulerDiscreteScheduler``'s) timestep. Its training ``t`` is logit-normal
(SD3: ``logit t ~ N(0, 1)``), which is log-normal ``sigma`` (``ln sigma = logit t``): ``p_mean`` / ``p_std``; the
``simple`` weighting is the plain velocity MSE. The samplers step in sigma; Euler over ``sigma = t / (1 - t)`` is Euler
on the flow's time grid exactly (:func:`~emu.diffusion.sampling.get_sigmas_flow`).

The training loss is the MSE in the network's output space, ``|F - (x0 - c_skip x)/c_out|^2``, times
``weight(sigma) * c_out^2`` where ``weight`` is the weighting in x0 space (SNR = sd^2 / sigma^2):

* ``simple``: weight 1 on the network's own target, the plain eps- / v- / F-MSE (Ho et al. 2020's L_simple). It is
  not uniform over noise levels: in x0 space it is ``1 / c_out^2``, which for sd = 1 (normalised latents) is SNR for
  eps (``|eps - eps_hat|^2 = SNR |x0 - x0_hat|^2``) and SNR + 1 for v and edm (``(sigma^2 + sd^2) / (sigma sd)^2``,
  the ``edm`` weighting, for any sd);
* ``min_snr``: min(SNR, gamma) (Hang et al. 2023);
* ``edm``: (sigma^2 + sd^2) / (sigma sd)^2 (Karras et al. 2022), 1 in the edm parameterization's F space.

``uniform``, this weighting's old name, is refused with the new one (old checkpoints are migrated when loaded:
:func:`emu.diffusion.checkpoints.load_diffusion`).
"""

from __future__ import annotations

import torch

from emu.diffusion.noise import DiscreteSchedule, lognormal_sigmas, snr

PARAMETERIZATIONS = ("eps", "v", "edm", "flow")
CONTINUOUS = ("edm", "flow")  # no discrete noise schedule: continuous sigma, log-normal in training
WEIGHTINGS = ("simple", "min_snr", "edm")
RENAMED_WEIGHTINGS = {"uniform": "simple"}  # old name -> new name (the same loss)


def weighting_problem(kind: str) -> str | None:
    """Why ``kind`` is not a loss weighting (an old name says its new one), or None."""
    if kind in WEIGHTINGS:
        return None
    if kind in RENAMED_WEIGHTINGS:
        return (f"{kind!r} is now called {RENAMED_WEIGHTINGS[kind]!r} (the same loss: weight 1 on the network's own "
                f"target, Ho et al.'s L_simple; it was never uniform over noise levels); set it to "
                f"{RENAMED_WEIGHTINGS[kind]!r}")  # fmt: skip
    return f"unknown loss weighting {kind!r}; choose one of {WEIGHTINGS}"


def preconditioning(kind: str, sigma: torch.Tensor, sigma_data: float = 1.0):
    """``(c_skip, c_out, c_in)`` for a parameterisation, broadcast like ``sigma``."""
    s2, sd2 = sigma**2, sigma_data**2
    if kind == "flow":  # sigma_data plays no part: the interpolant fixes the scales
        return 1 / (1 + sigma), -sigma / (1 + sigma), 1 / (1 + sigma)
    if kind == "eps":
        return torch.ones_like(sigma), -sigma, (s2 + 1) ** -0.5
    c_skip = sd2 / (s2 + sd2)
    c_out = sigma * sigma_data * (s2 + sd2) ** -0.5
    c_in = (s2 + sd2) ** -0.5
    if kind == "v":
        return c_skip, -c_out, c_in
    if kind == "edm":
        return c_skip, c_out, c_in
    raise ValueError(f"unknown parameterization {kind!r}; choose one of {PARAMETERIZATIONS}")


def loss_weight(kind: str, sigma: torch.Tensor, c_out: torch.Tensor, sigma_data: float = 1.0, gamma: float = 5.0):
    """The weight of the network-space MSE: ``simple`` 1, else the x0-space weighting times ``c_out^2``."""
    if kind == "simple":
        return torch.ones_like(sigma)
    if kind == "min_snr":
        return snr(sigma, sigma_data).clamp(max=gamma) * c_out**2
    if kind == "edm":
        return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2 * c_out**2
    raise ValueError(weighting_problem(kind))


class Denoiser:
    """Wraps a network ``net(x, c_noise, **cond)`` into ``D(x, sigma, **cond) -> x0`` and its training loss.

    A plain callable, not a module: it holds references to the network and noise schedule that its owner registers
    (so a LightningModule's state dict names the U-Net once, as ``unet.*``).

    Args:
        net: the U-Net (or any callable with that signature).
        parameterization: ``eps``, ``v``, ``edm`` or ``flow``.
        noise_schedule: the discrete DDPM schedule for eps / v (timesteps from sigmas; training noise levels);
            ``None`` for edm and flow (log-normal training noise, continuous sigma).
        sigma_data: the data std (latents are normalised per channel, so 1.0; EDM's pixel default is 0.5).
        weighting / min_snr_gamma: the loss weighting (see the module docstring).
        p_mean / p_std: EDM's log-normal training distribution (flow: the logit-normal ``t``'s, SD3's 0 / 1).
    """

    def __init__(
        self,
        net: torch.nn.Module,
        parameterization: str = "eps",
        noise_schedule: DiscreteSchedule | None = None,
        sigma_data: float = 1.0,
        weighting: str = "simple",
        min_snr_gamma: float = 5.0,
        p_mean: float = -1.2,
        p_std: float = 1.2,
    ):
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"unknown parameterization {parameterization!r}; choose one of {PARAMETERIZATIONS}")
        if weighting_problem(weighting):
            raise ValueError(weighting_problem(weighting))
        if parameterization not in CONTINUOUS and noise_schedule is None:
            raise ValueError(f"the {parameterization}-parameterization needs a discrete noise schedule")
        self.net, self.noise_schedule = net, noise_schedule
        self.parameterization, self.sigma_data, self.weighting = parameterization, sigma_data, weighting
        self.min_snr_gamma, self.p_mean, self.p_std = min_snr_gamma, p_mean, p_std

    @property
    def sigma_min(self) -> float:
        return self.noise_schedule.sigma_min if self.noise_schedule is not None else 0.002

    @property
    def sigma_max(self) -> float:
        return self.noise_schedule.sigma_max if self.noise_schedule is not None else 80.0

    def c_noise(self, sigma: torch.Tensor) -> torch.Tensor:
        if self.parameterization == "edm":
            return sigma.log() / 4
        if self.parameterization == "flow":
            return 1000 * sigma / (1 + sigma)
        return self.noise_schedule.sigma_to_t(sigma)

    def _scalings(self, sigma: torch.Tensor, ndim: int):
        shape = (-1,) + (1,) * (ndim - 1)
        return [c.view(shape) for c in preconditioning(self.parameterization, sigma, self.sigma_data)]

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
        c_skip, c_out, c_in = self._scalings(sigma.float(), x.ndim)
        out = self.net((x * c_in).to(x.dtype), self.c_noise(sigma), **cond)
        return (c_skip * x + c_out * out.float()).to(x.dtype)

    def sample_sigmas(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training noise levels: uniform timesteps (discrete) or log-normal (EDM)."""
        if self.noise_schedule is not None and self.parameterization not in CONTINUOUS:
            return self.noise_schedule.sample_training_sigmas(n, generator)
        return lognormal_sigmas(n, self.p_mean, self.p_std, generator)

    def loss(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        """Per-sample weighted MSE in the network's output space (see the module docstring)."""
        c_skip, c_out, c_in = self._scalings(sigma.float(), x0.ndim)
        x = x0 + noise * sigma.view(-1, *([1] * (x0.ndim - 1))).to(x0)
        out = self.net((x * c_in).to(x0.dtype), self.c_noise(sigma), **cond).float()
        target = (x0.float() - c_skip * x.float()) / c_out
        mse = (out - target).square().flatten(1).mean(1)
        return mse * loss_weight(self.weighting, sigma.float(), c_out.flatten(), self.sigma_data, self.min_snr_gamma)

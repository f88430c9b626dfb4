"""Samplers and sigma schedules in the k-diffusion convention.

``sample_X(model, x, sigmas, extra_args=None, callback=None, disable=None)``: ``model(x, sigma, **extra_args)``
returns the denoised image, ``x`` starts as ``sigmas[0] * noise``, ``sigmas`` decreases to 0. Any
k-diffusion-style denoiser can be driven by these samplers, and ours by k-diffusion's.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import trange

from emu.diffusion.denoiser import preconditioning
from emu.diffusion.noise import DiscreteSchedule

SAMPLERS = ("euler", "heun", "dpmpp_2m", "ddim")


# ------------------------------------------------------------------------------------------------ sigmas
def append_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_zeros([1])])


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, device="cpu") -> torch.Tensor:
    """Karras et al. (2022): ``n`` sigmas evenly spaced in ``sigma^(1/rho)``, then 0."""
    ramp = torch.linspace(0, 1, n, device=device)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return append_zero((max_inv + ramp * (min_inv - max_inv)) ** rho)


def get_sigmas_discrete(schedule: DiscreteSchedule, n: int, spacing: str = "trailing") -> torch.Tensor:
    """The model's own sigmas at ``n`` of its timesteps, then 0. ``trailing`` starts at the last timestep
    (Lin et al. 2023), ``leading`` is DDIM's original ``0, T/n, ...`` + offset 1, ``linspace`` spans both ends."""
    total = len(schedule.sigmas)
    if spacing == "trailing":
        t = torch.arange(total, 0, -total / n).round() - 1
    elif spacing == "leading":
        t = (torch.arange(0, n) * (total // n)).flip(0) + 1
    elif spacing == "linspace":
        t = torch.linspace(total - 1, 0, n)
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose trailing, leading or linspace")
    return append_zero(schedule.t_to_sigma(t.clamp(0, total - 1).to(schedule.sigmas.device)))


def get_sigmas_flow(n: int, shift: float = 1.0, t_max: float = 0.999, device="cpu") -> torch.Tensor:
    """A rectified-flow model's time grid as sigmas: ``n`` steps of ``t`` evenly from ``t_max`` to 0, each shifted by
    SD3's ``t' = shift t / (1 + (shift - 1) t)`` (more steps at high noise for ``shift > 1``; SD3 uses 3 at 1024px),
    as ``sigma = t / (1 - t)`` (the last one 0). ``t = 1`` (pure noise) would be infinite ``sigma``: the grid starts
    at ``t_max``, where ``x_t`` is 0.1% data."""
    if not 0 < t_max < 1 or shift <= 0:
        raise ValueError(f"t_max must be in (0, 1) and shift > 0, got {t_max} and {shift}")
    t = torch.linspace(t_max, 0, n + 1, device=device, dtype=torch.float64)
    t = shift * t / (1 + (shift - 1) * t)
    return (t / (1 - t)).float()


# ------------------------------------------------------------------------------------------------ samplers
def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE derivative ``dx/dsigma``."""
    return (x - denoised) / sigma


def _sigma(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return s * x.new_ones([x.shape[0]])


def _callback(callback, i, x, sigmas, denoised):
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Euler steps on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn)."""
    extra_args = extra_args or {}
    for i in trange(len(sigmas) - 1, disable=disable, desc="euler"):
        denoised = model(x, _sigma(sigmas[i], x), **extra_args)
        _callback(callback, i, x, sigmas, denoised)
        x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Heun's second-order method (Karras et al. 2022, Algorithm 2); the last step to sigma 0 is Euler."""
    extra_args = extra_args or {}
    for i in trange(len(sigmas) - 1, disable=disable, desc="heun"):
        denoised = model(x, _sigma(sigmas[i], x), **extra_args)
        _callback(callback, i, x, sigmas, denoised)
        d = to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, _sigma(sigmas[i + 1], x), **extra_args))
            x = x + (d + d_2) / 2 * dt
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(2M) (Lu et al. 2022): multistep, second order, one model call per step."""
    extra_args = extra_args or {}
    old_denoised = None
    for i in trange(len(sigmas) - 1, disable=disable, desc="dpmpp_2m"):
        denoised = model(x, _sigma(sigmas[i], x), **extra_args)
        _callback(callback, i, x, sigmas, denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
            h = t_next - t
            if old_denoised is None:
                d = denoised
            else:
                h_last = t - (-sigmas[i - 1].log())
                r = h_last / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h) * d
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, eta: float = 0.0, generator=None,
                noise_sampler: Callable[[torch.Size], torch.Tensor] | None = None):  # fmt: skip
    """DDIM (Song et al. 2021) in sigma space: ``x_next = x0 + sigma_next * eps`` with the predicted ``eps``.

    With ``eta = 0`` (the default) it is deterministic; ``eta > 0`` re-injects that fraction of the DDPM noise, drawn
    by ``noise_sampler(shape)`` when given (:func:`~emu.diffusion.pipeline.generate` passes one that draws each image's
    noise from its own seed), else from ``generator`` on the CPU.
    """
    extra_args = extra_args or {}
    for i in trange(len(sigmas) - 1, disable=disable, desc="ddim"):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, _sigma(sigma, x), **extra_args)
        _callback(callback, i, x, sigmas, denoised)
        eps = (x - denoised) / sigma
        if eta and sigma_next > 0:
            # the DDPM posterior std in sigma space (as k-diffusion's get_ancestral_step)
            up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
            down = (sigma_next**2 - up**2) ** 0.5
            if noise_sampler is not None:
                noise = noise_sampler(x.shape).to(x)
            else:
                noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
            x = denoised + down * eps + up * noise
        else:
            x = denoised + sigma_next * eps
    return x


def get_sampler(name: str) -> Callable:
    samplers = {"euler": sample_euler, "heun": sample_heun, "dpmpp_2m": sample_dpmpp_2m, "ddim": sample_ddim}
    if name not in samplers:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(samplers)}")
    return samplers[name]


def model_calls(name: str, steps: int) -> int:
    """Denoiser evaluations a sampler makes for ``steps`` steps (Heun: two per step but the last)."""
    return 2 * steps - 1 if name == "heun" else steps


# ------------------------------------------------------------------------------------------------ guidance
class CFGDenoiser(nn.Module):
    """Classifier-free guidance: ``uncond + scale * (cond - uncond)``, both in one batched call.

    ``cond`` / ``uncond`` are the keyword arguments of the denoiser for the prompts and for the empty prompt
    (tensors batched like ``x``). ``rescale`` (Lin et al. 2023, "guidance rescale") pulls the guided prediction's
    per-sample std back to the conditional one's, mixed by that fraction. Like diffusers' ``rescale_noise_cfg``, it
    acts on the network's own output (eps, v), so ``sample.py`` and a diffusers export agree: for a denoiser with a
    ``parameterization`` and ``sigma_data`` (:class:`~emu.diffusion.denoiser.Denoiser`), ``D = c_skip x + c_out F``
    is inverted to ``F`` per :func:`~emu.diffusion.denoiser.preconditioning`; any other k-diffusion denoiser is
    rescaled on its denoised x0.
    ``interval = (lo, hi)`` guides only at noise levels ``lo < sigma <= hi`` (Kynkäänniemi et al. 2024, "guidance in
    a limited interval") and returns the conditional prediction elsewhere. ``scale == 1`` and steps outside the
    interval skip the unconditional call.
    """

    def __init__(self, denoiser: Callable, scale: float = 5.0, rescale: float = 0.0,
                 interval: tuple[float, float] | None = None):  # fmt: skip
        super().__init__()
        if scale < 0 or not math.isfinite(scale):
            raise ValueError(f"guidance scale must be a finite number >= 0, got {scale}")
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"guidance rescale must be in [0, 1], got {rescale}")
        if interval is not None and not 0 <= interval[0] < interval[1]:
            raise ValueError(f"guidance interval must be (lo, hi) with 0 <= lo < hi, got {interval}")
        self.denoiser, self.scale, self.rescale, self.interval = denoiser, scale, rescale, interval

    def guided(self, sigma: torch.Tensor) -> torch.Tensor:
        """Per sample: whether guidance applies at this noise level."""
        if self.interval is None:
            return torch.ones_like(sigma, dtype=torch.bool)
        return (sigma > self.interval[0]) & (sigma <= self.interval[1])

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict, uncond: dict) -> torch.Tensor:
        guided = self.guided(sigma)
        if self.scale == 1.0 or not guided.any():
            return self.denoiser(x, sigma, **cond)
        both = {k: _cat(uncond[k], cond[k]) for k in cond}
        out_uncond, out_cond = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **both).chunk(2)
        out = out_uncond + self.scale * (out_cond - out_uncond)
        if self.rescale:
            out = self._rescaled(x, sigma, out, out_cond)
        return torch.where(guided.view(-1, *([1] * (x.ndim - 1))), out, out_cond)

    def _rescaled(self, x: torch.Tensor, sigma: torch.Tensor, out: torch.Tensor, out_cond: torch.Tensor):
        """Guidance rescale of the guided x0 ``out``, in the network's output space where the denoiser says what it
        is (guidance is linear, so the guided network output is ``(out - c_skip x) / c_out``)."""
        kind = getattr(self.denoiser, "parameterization", None)
        if kind is not None:
            shape = (-1,) + (1,) * (x.ndim - 1)
            c_skip, c_out, _ = (c.view(shape) for c in preconditioning(kind, sigma.float(), self.denoiser.sigma_data))
            to_net = lambda d: (d.float() - c_skip * x.float()) / c_out
            out_net, cond_net = to_net(out), to_net(out_cond)
        else:
            out_net, cond_net = out, out_cond
        dims = list(range(1, x.ndim))
        rescaled = out_net * (cond_net.std(dim=dims, keepdim=True) / out_net.std(dim=dims, keepdim=True))
        out_net = self.rescale * rescaled + (1 - self.rescale) * out_net
        return out_net if kind is None else (c_skip * x.float() + c_out * out_net).to(out.dtype)


def _cat(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None or b is None:
        return None
    if a.ndim >= 2 and a.shape[1] != b.shape[1]:  # token sequences of different lengths: pad the shorter
        n = max(a.shape[1], b.shape[1])
        a, b = (torch.nn.functional.pad(t, (0, 0) * (t.ndim - 2) + (0, n - t.shape[1])) for t in (a, b))
    return torch.cat([a, b])

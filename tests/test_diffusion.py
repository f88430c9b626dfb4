"""Diffusion pieces: schedules, preconditioning, loss weighting, noise offset and the samplers (analytic check)."""

import math
from dataclasses import asdict

import pytest
import torch
from omegaconf import OmegaConf

from emu.diffusion.denoiser import Denoiser, loss_weight, preconditioning
from emu.diffusion.noise import DiscreteSchedule, offset_noise, scaled_linear_alphas_cumprod
from emu.diffusion.pipeline import SamplingSettings
from emu.diffusion.sampling import (
    CFGDenoiser,
    get_sampler,
    get_sigmas_discrete,
    get_sigmas_karras,
)
from emu.errors import ConfigError
from emu.utils.resolution import check_resolution, resolution_problem
from tests.conftest import ROOT


def test_scaled_linear_matches_diffusers_and_zero_snr():
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ours = scaled_linear_alphas_cumprod(1000)
    torch.testing.assert_close(ours.float(), ref.alphas_cumprod, atol=1e-6, rtol=1e-5)
    zsnr = scaled_linear_alphas_cumprod(1000, zero_terminal_snr=True)
    ref_z = diffusers.DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True
    ).alphas_cumprod
    torch.testing.assert_close(zsnr[:-1].float(), ref_z[:-1], atol=1e-6, rtol=1e-4)
    assert zsnr[-1] < 1e-7 and ref_z[-1] < 1e-7  # terminal SNR ~ 0 (clamped finite for k-diffusion samplers)


def test_a_zero_terminal_snr_model_samples_on_trailing_timesteps_here_and_in_its_diffusers_export():
    """Karras spacing from a zero-SNR model's clamped sigma_max (~4519) spent 17 of 25 steps above 14.6 (an ordinary
    schedule's sigma_max): the default spacing (``auto``) takes its trailing timesteps instead, 3 of 25 up there, and
    so does the exported diffusers scheduler; an ordinary model keeps Karras."""
    from types import SimpleNamespace

    from emu.diffusion.pipeline import sampling_sigmas

    zero, plain = (DiscreteSchedule(scaled_linear_alphas_cumprod(1000, zero_terminal_snr=z)) for z in (True, False))
    assert zero.zero_terminal_snr and not plain.zero_terminal_snr
    model = lambda s, kind: SimpleNamespace(noise_schedule=s, parameterization=kind, sigma_min=s.sigma_min,
                                            sigma_max=s.sigma_max)  # fmt: skip
    assert SamplingSettings().spacing == "auto"
    sigmas = sampling_sigmas(model(zero, "v"), 25)
    torch.testing.assert_close(sigmas, get_sigmas_discrete(zero, 25))
    karras = get_sigmas_karras(25, zero.sigma_min, zero.sigma_max)
    assert int((sigmas[:-1] > 14.6).sum()) == 3 and int((karras > 14.6).sum()) == 17
    ordinary = get_sigmas_karras(25, plain.sigma_min, plain.sigma_max)
    torch.testing.assert_close(sampling_sigmas(model(plain, "eps"), 25), ordinary)
    pytest.importorskip("diffusers")
    from emu.export.diffusers import make_scheduler

    hp = SimpleNamespace(noise_schedule={"zero_terminal_snr": True}, parameterization="v")
    scheduler = make_scheduler(SimpleNamespace(hparams=hp), "euler")
    scheduler.set_timesteps(25)
    torch.testing.assert_close(scheduler.timesteps.float(), zero.sigma_to_t(sigmas[:-1]), atol=1e-3, rtol=0)
    # diffusers clamps the terminal alpha_cumprod to 2^-24 (sigma 4096), emu to 4.9e-8 (4519): the rest agree
    torch.testing.assert_close(scheduler.sigmas[1:].float(), sigmas[1:], rtol=1e-4, atol=1e-5)


def test_sigma_t_round_trip():
    s = DiscreteSchedule(scaled_linear_alphas_cumprod(1000))
    t = torch.tensor([0.0, 1.5, 420.25, 999.0])
    torch.testing.assert_close(s.sigma_to_t(s.t_to_sigma(t)), t, atol=1e-3, rtol=0)
    sig = get_sigmas_discrete(s, 10)
    assert len(sig) == 11 and sig[-1] == 0 and torch.all(sig[:-1].diff() < 0)
    assert math.isclose(float(sig[0]), s.sigma_max, rel_tol=1e-5)  # trailing spacing starts at the last step


@pytest.mark.parametrize("kind", ["eps", "v", "edm", "flow"])
def test_perfect_network_gives_exact_x0_and_zero_loss(kind):
    """A network that outputs its exact target makes D(x, sigma) = x0 and the loss 0, for every weighting."""
    torch.manual_seed(0)
    x0, noise = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    sigma = torch.tensor([0.05, 0.7, 3.0, 14.0])
    c_skip, c_out, _ = (c.view(-1, 1, 1, 1) for c in preconditioning(kind, sigma))
    x = x0 + sigma.view(-1, 1, 1, 1) * noise
    target = (x0 - c_skip * x) / c_out

    class Oracle(torch.nn.Module):
        def forward(self, x_in, c_noise):
            return target

    schedule = DiscreteSchedule(scaled_linear_alphas_cumprod())
    for weighting in ("simple", "min_snr", "edm"):
        d = Denoiser(Oracle(), kind, schedule if kind in ("eps", "v") else None, weighting=weighting)
        torch.testing.assert_close(d(x, sigma), x0, atol=1e-5, rtol=1e-5)
        assert d.loss(x0, noise, sigma).abs().max() < 1e-8
    if kind == "eps":  # eps-target is the noise, v-target is the usual v
        torch.testing.assert_close(target, noise)
    if kind == "v":
        a = (1 / (1 + sigma**2)).sqrt().view(-1, 1, 1, 1)
        torch.testing.assert_close(target, a * noise - (1 - a**2).sqrt() * x0, atol=1e-5, rtol=1e-5)
    if kind == "flow":  # the velocity of x_t = (1 - t) x0 + t n, and the network sees x_t itself
        torch.testing.assert_close(target, noise - x0, atol=1e-5, rtol=1e-5)
        t = (sigma / (1 + sigma)).view(-1, 1, 1, 1)
        _, _, c_in = (c.view(-1, 1, 1, 1) for c in preconditioning(kind, sigma))
        torch.testing.assert_close(x * c_in, (1 - t) * x0 + t * noise, atol=1e-6, rtol=1e-5)


def test_loss_weights():
    sigma = torch.tensor([0.1, 1.0, 10.0])
    _, c_out, _ = preconditioning("eps", sigma)
    # min-SNR-5 on eps: min(SNR, 5) / SNR
    torch.testing.assert_close(loss_weight("min_snr", sigma, c_out), torch.tensor([0.05, 1.0, 1.0]))
    _, c_out, _ = preconditioning("edm", sigma, 0.5)
    torch.testing.assert_close(loss_weight("edm", sigma, c_out, 0.5), torch.ones(3))  # EDM: 1 in F space
    # simple: 1 on the network's own target, which in x0 space (weight / c_out^2) is SNR for eps, SNR + 1 for v
    snr = 1 / sigma**2
    for kind, x0_space in (("eps", snr), ("v", snr + 1), ("edm", snr + 1)):
        _, c_out, _ = preconditioning(kind, sigma)
        torch.testing.assert_close(loss_weight("simple", sigma, c_out), torch.ones(3))
        torch.testing.assert_close(loss_weight("simple", sigma, c_out) / c_out**2, x0_space)
    # its old name is refused with the new one, when the denoiser is made (not at the first loss)
    with pytest.raises(ValueError, match="'uniform' is now called 'simple'"):
        Denoiser(torch.nn.Identity(), "eps", DiscreteSchedule(scaled_linear_alphas_cumprod()), weighting="uniform")


def test_offset_noise():
    g = torch.Generator().manual_seed(0)
    like = torch.zeros(512, 4, 8, 8)
    plain = offset_noise(like, 0.0, g)
    off = offset_noise(like, 0.1, torch.Generator().manual_seed(0))
    # the channel means of plain noise have std 1/8; the offset adds 0.1 std per sample and channel
    assert abs(float(plain.mean((2, 3)).std()) - 1 / 8) < 0.01
    assert abs(float(off.mean((2, 3)).std()) - math.sqrt(1 / 64 + 0.01)) < 0.01


def _gaussian_denoiser(mu: float, std: float):
    """The exact denoiser E[x0 | x0 + sigma n] for x0 ~ N(mu, std^2) per dimension."""

    def model(x, sigma):
        s = sigma.view(-1, *([1] * (x.ndim - 1)))
        return mu + std**2 / (std**2 + s**2) * (x - mu)

    return model


@pytest.mark.parametrize("name,steps", [("euler", 300), ("ddim", 300), ("heun", 30), ("dpmpp_2m", 30)])
def test_samplers_recover_gaussian_data(name, steps):
    """First-order samplers need more steps for the same error; that is the point of the second-order ones."""
    mu, std, sigma_max = 0.7, 0.4, 80.0
    sigmas = get_sigmas_karras(steps, 0.002, sigma_max)
    x = torch.randn(20000, 2, generator=torch.Generator().manual_seed(0)) * sigma_max
    out = get_sampler(name)(_gaussian_denoiser(mu, std), x, sigmas, disable=True)
    assert abs(float(out.mean()) - mu) < 0.02
    assert abs(float(out.std()) - std) < 0.02


def test_flow_euler_on_sigmas_is_euler_on_the_flow_time_grid():
    """Euler over sigma = t / (1 - t) with the flow preconditioning is the flow ODE's own Euler,
    x_t' = x_t + (t' - t) v, step for step, for any velocity field; SD3's shift puts more of the grid at high noise."""
    from emu.diffusion.sampling import get_sigmas_flow

    w = torch.tensor([[0.3, -0.2], [0.1, 0.5]])

    def velocity(x_t, t):  # any smooth field of x_t and t
        return x_t @ w.to(x_t.dtype) * (1 + t) - 0.4 * t

    class Net(torch.nn.Module):
        def forward(self, x_in, c_noise):
            return velocity(x_in, (c_noise / 1000).view(-1, 1))

    for shift in (1.0, 3.0):
        sigmas = get_sigmas_flow(12, shift=shift)
        t = sigmas.double() / (1 + sigmas.double())
        assert sigmas[-1] == 0 and torch.all(sigmas.diff() < 0)
        x_t = torch.randn(64, 2, generator=torch.Generator().manual_seed(0)).double() * t[0]
        ours = get_sampler("euler")(Denoiser(Net(), "flow"), (x_t / (1 - t[0])).float(), sigmas, disable=True)
        for i in range(len(t) - 1):  # the flow's Euler, in x_t
            x_t = x_t + (t[i + 1] - t[i]) * velocity(x_t, t[i])
        torch.testing.assert_close(ours.double(), x_t, atol=2e-5, rtol=1e-4)
    t = get_sigmas_flow(10, shift=3.0) / (1 + get_sigmas_flow(10, shift=3.0))
    assert float(t[5]) == pytest.approx(3 * 0.4995 / (1 + 2 * 0.4995), rel=1e-5)  # SD3's t' = 3t / (1 + 2t)


def test_flow_recovers_gaussian_data_and_trains_on_logit_normal_times():
    """The exact denoiser of Gaussian data through the flow grid from noise gives the data's distribution; the
    training times are logit-normal (SD3: logit t ~ N(0, 1))."""
    from emu.diffusion.sampling import get_sigmas_flow

    mu, std = 0.7, 0.4
    sigmas = get_sigmas_flow(300)
    x = torch.randn(20000, 2, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    out = get_sampler("euler")(_gaussian_denoiser(mu, std), x, sigmas, disable=True)
    assert abs(float(out.mean()) - mu) < 0.02 and abs(float(out.std()) - std) < 0.02
    sigma = Denoiser(torch.nn.Identity(), "flow", p_mean=0.0, p_std=1.0).sample_sigmas(
        50000, torch.Generator().manual_seed(0))  # fmt: skip
    logit = (sigma / (1 + sigma)).logit()
    assert abs(float(logit.mean())) < 0.02 and abs(float(logit.std()) - 1) < 0.02


def test_ddim_eta_stays_on_distribution():
    mu, std = -0.3, 1.5
    sigmas = get_sigmas_karras(500, 0.002, 80.0)
    x = torch.randn(20000, 1, generator=torch.Generator().manual_seed(1)) * 80.0
    out = get_sampler("ddim")(_gaussian_denoiser(mu, std), x, sigmas, disable=True, eta=1.0,
                              generator=torch.Generator().manual_seed(2))  # fmt: skip
    assert abs(float(out.mean()) - mu) < 0.05 and abs(float(out.std()) - std) < 0.05


def test_cfg_scale_one_is_conditional_and_scale_extrapolates():
    def denoiser(x, sigma, context):
        return x * 0 + context

    cond, uncond = {"context": torch.full((2, 3), 2.0)}, {"context": torch.full((2, 3), 1.0)}
    x, sigma = torch.zeros(2, 3), torch.ones(2)
    torch.testing.assert_close(CFGDenoiser(denoiser, 1.0)(x, sigma, cond, uncond), cond["context"])
    torch.testing.assert_close(CFGDenoiser(denoiser, 3.0)(x, sigma, cond, uncond), torch.full((2, 3), 4.0))
    with pytest.raises(ValueError, match="guidance scale"):
        CFGDenoiser(denoiser, -1.0)


def test_cfg_pads_token_sequences_of_different_lengths():
    seen = {}

    def denoiser(x, sigma, context, context_mask):
        seen["shapes"] = (context.shape, context_mask.shape, context_mask.dtype)
        return x

    cond = {"context": torch.ones(2, 5, 4), "context_mask": torch.ones(2, 5, dtype=torch.bool)}
    uncond = {"context": torch.zeros(2, 3, 4), "context_mask": torch.ones(2, 3, dtype=torch.bool)}
    CFGDenoiser(denoiser, 2.0)(torch.zeros(2, 4), torch.ones(2), cond, uncond)
    assert seen["shapes"] == ((4, 5, 4), (4, 5), torch.bool)


def test_sampling_settings_are_checked_once_with_their_key_and_match_their_config_group():
    group = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "sampling" / "default.yaml"))
    assert group == asdict(SamplingSettings())  # the config group and the object agree on fields and defaults
    s = SamplingSettings.from_config({"steps": 7, "spacing": "discrete"}, "model.val_sampling")
    assert (s.steps, s.spacing, s.sampler) == (7, "discrete", "dpmpp_2m")
    assert s.generate_kwargs() == {"sampler": "dpmpp_2m", "steps": 7, "spacing": "discrete", "eta": 0.0,
                                   "guidance": 5.0, "guidance_rescale": 0.0, "guidance_interval": None,
                                   "batch_size": 16}  # fmt: skip
    assert SamplingSettings.from_config({"sampler": "ddim", "eta": 1.0}).eta == 1.0
    for node, message in [
        ({"steps": 0}, "model.val_sampling.steps: must be in 1..1000, got 0"),
        ({"sampler": "plms"}, "model.val_sampling.sampler: must be one of"),
        ({"spacing": "linear"}, "model.val_sampling.spacing: must be one of ['auto', 'karras', 'discrete']"),
        ({"sigmas": "karras"}, "sigmas: is now called 'spacing' (the same values); set model.val_sampling.spacing="),
        ({"sampler": "ddim", "eta": -0.5}, "model.val_sampling.eta: must be a number >= 0, got -0.5"),
        ({"eta": 0.5}, "model.val_sampling.eta: is 0.5 but only the ddim sampler re-injects noise, not dpmpp_2m"),
        ({"guidance_rescale": 2}, "model.val_sampling.guidance_rescale: must be in [0, 1]"),
        ({"resolution": 0}, "model.val_sampling.resolution: must be positive"),
        ({"ema": "yes"}, "model.val_sampling.ema: must be true or false"),
        ({"schedule": "karras"}, "model.val_sampling.schedule: is not a sampling setting"),
    ]:
        with pytest.raises(ConfigError) as e:
            SamplingSettings.from_config(node, "model.val_sampling")
        assert message in str(e.value)


def test_the_resolution_invariant_names_the_parts_and_the_nearest_size():
    assert resolution_problem(64, 16, "x") is None
    assert resolution_problem(40, 16, "autoencoder f=8 x U-Net 2x") == (
        "40 is not a positive multiple of 16 (autoencoder f=8 x U-Net 2x); try 32"
    )
    assert resolution_problem(0, 8, "f=8").endswith("try 8") and resolution_problem(1020, 32, "f").endswith("try 1024")
    with pytest.raises(ConfigError, match=r"^data\.resolution: 60 is not a positive multiple of 8 \(f=8\); try 64$"):
        check_resolution(60, 8, "data.resolution", "f=8")

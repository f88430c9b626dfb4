"""Text -> image: conditioning, a sampler with classifier-free guidance, decoding. Used by validation, ``sample.py``
and evaluation alike, so every image in the project comes from the same code.

Each image's starting noise comes from its own seed (a CPU generator), so an image depends on its prompt, seed
and settings, not on the batch it was drawn in.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
from tqdm.auto import tqdm

from emu.diffusion.sampling import CFGDenoiser, get_sampler, get_sigmas_discrete, get_sigmas_karras

SIGMA_SCHEDULES = ("karras", "discrete")


def sampling_sigmas(denoiser, steps: int, schedule: str = "karras") -> torch.Tensor:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if schedule == "karras":
        return get_sigmas_karras(steps, denoiser.sigma_min, denoiser.sigma_max)
    if schedule == "discrete":
        if denoiser.schedule is None:
            raise ValueError("the 'discrete' sigma schedule needs a model with a discrete noise schedule; use karras")
        return get_sigmas_discrete(denoiser.schedule, steps).cpu()
    raise ValueError(f"unknown sigma schedule {schedule!r}; choose one of {SIGMA_SCHEDULES}")


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
    """One standard-normal latent per seed, drawn on the CPU (same seed, same noise, on any device)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def generate(
    denoiser,
    conditioner,
    autoencoder,
    prompts: Sequence[str],
    seeds: Sequence[int],
    height: int,
    width: int,
    sampler: str = "dpmpp_2m",
    steps: int = 25,
    guidance: float = 5.0,
    guidance_rescale: float = 0.0,
    schedule: str = "karras",
    batch_size: int = 16,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Images in [-1, 1], N x 3 x H x W, for ``prompts[i]`` with ``seeds[i]``."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    factor = autoencoder.downsample_factor * getattr(denoiser.net, "downsample_factor", 1)
    if height % factor or width % factor:
        raise ValueError(f"resolution {height}x{width} must be a multiple of {factor} (autoencoder x U-Net)")
    sample_fn = get_sampler(sampler)
    sigmas = sampling_sigmas(denoiser, steps, schedule)
    cfg = CFGDenoiser(denoiser, guidance, guidance_rescale)
    device = next(denoiser.net.parameters()).device
    latent_shape = (autoencoder.latent_channels, height // autoencoder.downsample_factor,
                    width // autoencoder.downsample_factor)  # fmt: skip
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    out = []
    batches = range(0, len(prompts), batch_size)
    for start in tqdm(batches, desc="sampling", disable=not progress or len(batches) == 1):
        chunk = list(prompts[start : start + batch_size])
        x = initial_noise(seeds[start : start + batch_size], latent_shape).to(device) * sigmas[0]
        with autocast:
            c = conditioner.condition(chunk)
            u = conditioner.unconditional_batch(len(chunk))
            cond = {"context": c.context, "context_mask": c.mask, "pooled": c.pooled}
            uncond = {"context": u.context, "context_mask": u.mask, "pooled": u.pooled}
            z = sample_fn(cfg, x, sigmas.to(device), extra_args={"cond": cond, "uncond": uncond}, disable=True)
            images = autoencoder.decode(autoencoder.denormalize(z.float()))
        out.append(images.float().clamp(-1, 1).cpu())
    return torch.cat(out)

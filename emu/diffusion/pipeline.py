"""Text -> image: conditioning, a sampler with classifier-free guidance, decoding. Used by validation, ``sample.py``
and evaluation alike, so every image in the project comes from the same code, with the same settings object
(:class:`SamplingSettings`, the ``sampling`` config group).

Each image's starting noise comes from its own seed (a CPU generator), and so does the noise DDIM re-injects with
``eta > 0`` (another generator per image), so an image depends on its prompt, seed and settings, not on the batch it
was drawn in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from emu.diffusion.sampling import (
    SAMPLERS,
    CFGDenoiser,
    get_sampler,
    get_sigmas_discrete,
    get_sigmas_flow,
    get_sigmas_karras,
)
from emu.diffusion.unet import takes_size_cond
from emu.errors import ConfigError
from emu.text.conditioner import Conditioning
from emu.utils.resolution import check_resolution

SPACINGS = ("auto", "karras", "discrete")  # how the sampler's noise levels are spaced


TOKEN_DECODERS = ("maskgit",)  # how a masked token model (emu.maskgit) samples; diffusion models refuse it


@dataclass(frozen=True)
class SamplingSettings:
    """How images are generated: one object for ``sample.py``, ``eval.py``, validation samples and checkpoint
    selection. Its config group is ``conf/sampling/default.yaml`` (the same fields and defaults); every value is
    checked when the object is made, and a bad one is a :class:`ConfigError` naming its key.

    Args:
        sampler: a k-diffusion-style sampler of :mod:`emu.diffusion.sampling` (``euler``, ``heun``, ``dpmpp_2m``,
            ``ddim``), or for a masked token model (:mod:`emu.maskgit`) ``maskgit``: iterative parallel decoding in
            ``steps`` steps with classifier-free ``guidance`` (its spacing, eta and guidance interval do not apply).
        steps: sampler steps.
        spacing: how the sampler's noise levels (sigmas) are spaced: ``karras`` (Karras et al., rho 7), ``discrete``
            (the model's own timesteps, trailing; eps / v models only) or ``auto`` (``discrete`` for zero-terminal-SNR
            models, else ``karras``). Was called ``sigmas``; that key is refused with the new name.
        eta: the fraction of DDPM noise DDIM re-injects at each step (0: deterministic DDIM; 1: DDPM's posterior
            noise), drawn from each image's seed; ``ddim`` only (another sampler refuses eta > 0).
        guidance: the classifier-free guidance scale (1: none).
        guidance_rescale: rescale of the guided prediction's std (Lin et al. 2023), 0 to 1.
        guidance_interval: ``[sigma_lo, sigma_hi]``: guide only at noise levels in ``(sigma_lo, sigma_hi]`` and use the
            conditional prediction elsewhere (Kynkäänniemi et al. 2024); None: at every level.
        negative_prompt: what the guidance steers away from, in place of the empty prompt ("" is the empty prompt's
            own unconditional embedding, identical to no negative prompt).
        resolution: the image side; None: the training resolution of the checkpoint.
        width / height: a non-square size (multiples of the downsampling); None: ``resolution``.
        batch_size: images per sampler call.
        ema: sample with the EMA weights when the model has them (else the raw ones).
    """

    sampler: str = "dpmpp_2m"
    steps: int = 25
    spacing: str = "auto"
    eta: float = 0.0
    guidance: float = 5.0
    guidance_rescale: float = 0.0
    guidance_interval: tuple[float, float] | None = None
    negative_prompt: str = ""
    resolution: int | None = None
    width: int | None = None
    height: int | None = None
    batch_size: int = 16
    ema: bool = True

    RENAMED: ClassVar[dict[str, str]] = {"sigmas": "spacing"}  # old key -> new key (refused, with the new name)

    def __post_init__(self) -> None:
        if self.guidance_interval is not None:  # lists from YAML / JSON -> a hashable pair
            object.__setattr__(self, "guidance_interval", tuple(float(v) for v in self.guidance_interval))
        self.check()

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | SamplingSettings | None, key: str = "sampling") -> SamplingSettings:
        """The settings of a config node (a mapping of some or all fields; missing ones take the defaults), with
        errors named ``<key>.<field>``."""
        if isinstance(node, SamplingSettings):
            return node
        node = dict(node or {})
        renamed = sorted(set(node) & set(cls.RENAMED))
        if renamed:
            old = renamed[0]
            raise ConfigError(f"{key}.{old}", f"is now called {cls.RENAMED[old]!r} (the same values); set "
                              f"{key}.{cls.RENAMED[old]}={node[old]} instead")  # fmt: skip
        unknown = sorted(set(node) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"{key}.{unknown[0]}", f"is not a sampling setting; they are "
                              f"{', '.join(f.name for f in fields(cls))}")  # fmt: skip
        try:
            return cls(**node)
        except ConfigError as e:
            raise ConfigError(f"{key}.{e.key}", e.problem) from None
        except (TypeError, ValueError) as e:  # a value that is not a number where one is needed
            raise ConfigError(key, f"{e}; got {node}") from None

    def check(self) -> None:
        checks = {
            "sampler": (self.sampler in (*SAMPLERS, *TOKEN_DECODERS), f"must be one of {[*SAMPLERS, *TOKEN_DECODERS]}"),
            "spacing": (self.spacing in SPACINGS, f"must be one of {list(SPACINGS)}"),
            "eta": (0 <= float(self.eta) < math.inf, "must be a number >= 0"),
            "steps": (isinstance(self.steps, int) and 1 <= self.steps <= 1000, "must be in 1..1000"),
            "guidance": (0 <= float(self.guidance) <= 50, "must be in [0, 50]"),
            "guidance_rescale": (0 <= float(self.guidance_rescale) <= 1, "must be in [0, 1]"),
            "guidance_interval": (
                self.guidance_interval is None
                or (len(self.guidance_interval) == 2 and 0 <= self.guidance_interval[0] < self.guidance_interval[1]),
                "must be [sigma_lo, sigma_hi] with 0 <= sigma_lo < sigma_hi (or null)",
            ),
            "negative_prompt": (isinstance(self.negative_prompt, str), "must be a string"),
            "resolution": (self.resolution is None or int(self.resolution) > 0, "must be positive (or null)"),
            "width": (self.width is None or int(self.width) > 0, "must be positive (or null)"),
            "height": (self.height is None or int(self.height) > 0, "must be positive (or null)"),
            "batch_size": (int(self.batch_size) >= 1, "must be >= 1"),
            "ema": (isinstance(self.ema, bool), "must be true or false"),
        }
        for key, (ok, problem) in checks.items():
            if not ok:
                raise ConfigError(key, f"{problem}, got {getattr(self, key)!r}")
        if self.eta and self.sampler != "ddim":
            raise ConfigError("eta", f"is {self.eta} but only the ddim sampler re-injects noise, not {self.sampler}; "
                              "set sampler=ddim, or eta=0")  # fmt: skip

    def generate_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`generate` but prompts and size (the size and the weights are the caller's
        to apply; the negative prompt is the caller's to repeat per image)."""
        skip = ("resolution", "width", "height", "ema", "negative_prompt")
        return {k: v for k, v in asdict(self).items() if k not in skip}

    def image_size(self, default: int, multiple: int | None = None, what: str = "") -> tuple[int, int]:
        """``(height, width)``: the explicit width / height, else ``resolution``, else ``default``; with ``multiple``,
        each side is checked against it (a ConfigError names ``sampling.<the key that set it>``)."""
        side = int(self.resolution or default)
        height, width = int(self.height or side), int(self.width or side)
        if multiple is not None:
            for key, value, given in (("height", height, self.height), ("width", width, self.width)):
                check_resolution(value, multiple, f"sampling.{key if given else 'resolution'}", what)
        return height, width

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def sampling_sigmas(denoiser, steps: int, spacing: str = "auto") -> torch.Tensor:
    """The noise levels (sigmas) a sampler steps through, spaced by ``spacing``: ``karras`` or the model's own
    ``discrete`` timesteps (trailing); ``auto``: a rectified-flow model's own time grid (``get_sigmas_flow``),
    ``discrete`` for a zero-terminal-SNR model, else ``karras``. A zero-SNR
    model's last sigma is ~4519 (clamped infinity): Karras spacing from there spends 17 of 25 steps above 14.6 (an
    ordinary schedule's sigma_max), trailing timesteps 3 (Lin et al. 2023 sample such models on trailing timesteps)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if spacing == "auto" and denoiser.parameterization == "flow":  # its own time grid
        return get_sigmas_flow(steps)
    if spacing == "auto":
        schedule = denoiser.noise_schedule
        zero_snr = schedule is not None and denoiser.parameterization != "edm" and schedule.zero_terminal_snr
        spacing = "discrete" if zero_snr else "karras"
    if spacing == "karras":
        return get_sigmas_karras(steps, denoiser.sigma_min, denoiser.sigma_max)
    if spacing == "discrete":
        if denoiser.noise_schedule is None:
            raise ValueError("spacing='discrete' needs a model with a discrete noise schedule (eps / v); use karras")
        return get_sigmas_discrete(denoiser.noise_schedule, steps).cpu()
    raise ValueError(f"unknown sigma spacing {spacing!r}; choose one of {SPACINGS}")


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
    """One standard-normal latent per seed, drawn on the CPU (same seed, same noise, on any device)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def step_noise(seeds: Sequence[int]) -> Callable[[torch.Size], torch.Tensor]:
    """A sampler's ``noise_sampler(shape)`` for the images of ``seeds``: each call draws one standard-normal latent per
    image from that image's own CPU generator, seeded from its seed but apart from :func:`initial_noise`'s, so the
    noise an image gets at each step depends on its seed alone, not on its batch or the batch size."""
    generators = [torch.Generator().manual_seed((int(s) * 1_000_003 + 1) % 2**63) for s in seeds]

    def sample(shape: torch.Size) -> torch.Tensor:
        if shape[0] != len(generators):
            raise ValueError(f"noise for {shape[0]} images asked of a sampler seeded for {len(generators)}")
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g) for g in generators])

    return sample


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
    guidance_interval: tuple[float, float] | None = None,
    spacing: str = "auto",
    eta: float = 0.0,
    batch_size: int = 16,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
    latent_scaling: str = "channel",
    negative_prompts: Sequence[str] | None = None,
) -> torch.Tensor:
    """Images in [-1, 1], N x 3 x H x W, for ``prompts[i]`` with ``seeds[i]``, guided away from
    ``negative_prompts[i]`` ("" or None: the unconditional embedding). ``eta`` (``ddim`` only): the noise DDIM
    re-injects, drawn per image from its seed (:func:`step_noise`)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if eta < 0 or (eta and sampler != "ddim"):
        raise ValueError(f"eta must be >= 0 and is for the ddim sampler only, got eta={eta} with {sampler}")
    negatives = list(negative_prompts) if negative_prompts is not None else [""] * len(prompts)
    if len(negatives) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(negatives)} negative prompts")
    f_ae, f_unet = autoencoder.downsample_factor, getattr(denoiser.net, "downsample_factor", 1)
    for side in {height, width}:
        check_resolution(side, f_ae * f_unet, "resolution", f"autoencoder f={f_ae} x U-Net {f_unet}x")
    if sampler in TOKEN_DECODERS:
        raise ConfigError("sampling.sampler", f"{sampler!r} decodes a masked token model's tokens; a diffusion model "
                          f"samples with one of {list(SAMPLERS)}")  # fmt: skip
    sample_fn = get_sampler(sampler)
    sigma_levels = sampling_sigmas(denoiser, steps, spacing)
    cfg = CFGDenoiser(denoiser, guidance, guidance_rescale, guidance_interval)
    device = next(denoiser.net.parameters()).device
    latent_shape = (autoencoder.latent_channels, height // autoencoder.downsample_factor,
                    width // autoencoder.downsample_factor)  # fmt: skip
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    out = []
    batches = range(0, len(prompts), batch_size)
    for start in tqdm(batches, desc="sampling", disable=not progress or len(batches) == 1):
        chunk = list(prompts[start : start + batch_size])
        chunk_seeds = seeds[start : start + batch_size]
        x = initial_noise(chunk_seeds, latent_shape).to(device) * sigma_levels[0]
        noise = {"eta": eta, "noise_sampler": step_noise(chunk_seeds)} if eta else {}
        with autocast:
            c = conditioner.condition(chunk)
            u = negative_conditioning(conditioner, negatives[start : start + batch_size])
            cond = {"context": c.context, "context_mask": c.mask, "pooled": c.pooled}
            uncond = {"context": u.context, "context_mask": u.mask, "pooled": u.pooled}
            if takes_size_cond(getattr(denoiser.net, "config", {})):  # uncropped, the output's size (SDXL's default)
                size = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32, device=device)
                cond["size_cond"] = uncond["size_cond"] = size.expand(len(chunk), -1)
            z = sample_fn(cfg, x, sigma_levels.to(device), extra_args={"cond": cond, "uncond": uncond}, disable=True,
                          **noise)  # fmt: skip
            images = autoencoder.decode(autoencoder.denormalize(z.float(), latent_scaling))
        out.append(images.float().clamp(-1, 1).cpu())
    return torch.cat(out)


def negative_conditioning(conditioner, negatives: Sequence[str]) -> Conditioning:
    """The conditioning guidance steers away from: each image's negative prompt, and the unconditional embedding
    where it is empty (so an empty negative prompt is exactly no negative prompt, whatever ``uncond`` is)."""
    u = conditioner.unconditional_batch(len(negatives))
    given = torch.tensor([bool(n) for n in negatives])
    if not given.any():
        return u
    n = conditioner.condition([n or "" for n in negatives])
    keep = given.to(n.context.device)
    pooled = None if n.pooled is None else torch.where(keep[:, None], n.pooled, u.pooled.to(n.pooled))
    return Conditioning(torch.where(keep[:, None, None], n.context, u.context.to(n.context)),
                        torch.where(keep[:, None], n.mask, u.mask.to(n.mask.device)), pooled)  # fmt: skip

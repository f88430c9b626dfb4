"""Weights between emu's :class:`~emu.autoencoder.model.AutoencoderKL` and diffusers' ``AutoencoderKL``.

The two share block structure and parameter names, so conversion maps the configs and loads the state dict
as it is: SD's and SDXL's autoencoders (with ``quant_conv`` / ``post_quant_conv``) and SD3's and FLUX.1's (16 latent
channels, without them). Models with Fourier-feature input or the patch shortcut (the miniature's) have no diffusers
counterpart and are refused.

The latent normalisation goes along: diffusers' one ``shift_factor`` / ``scaling_factor`` (SD, SDXL, SD3, FLUX.1)
becomes :meth:`~emu.autoencoder.model.AutoencoderKL.set_latent_factors` (``latent_scaling=factor`` applies it bit for
bit); per-channel ``latents_mean`` / ``latents_std`` become the latent statistics, with diffusers' meaning (the
normalised latent is ``(z - latents_mean) * scaling_factor / latents_std``). Back in diffusers, a model with factors
writes them, one with statistics writes ``latents_mean`` / ``latents_std`` and ``scaling_factor`` 1.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from emu.autoencoder.model import AutoencoderKL

_OURS_ONLY = ("latent_mean", "latent_std")


def emu_config(c: Mapping[str, Any]) -> dict[str, Any]:
    """emu's :class:`AutoencoderKL` arguments for a diffusers ``AutoencoderKL`` config (all its keys, as a model's
    ``.config`` has them); a ``ValueError`` for what has no counterpart."""
    if set(c["down_block_types"]) != {"DownEncoderBlock2D"} or set(c["up_block_types"]) != {"UpDecoderBlock2D"}:
        raise ValueError(f"only DownEncoderBlock2D/UpDecoderBlock2D autoencoders convert, got {c['down_block_types']}")
    if c["act_fn"] != "silu":
        raise ValueError(f"only SiLU autoencoders convert, got act_fn={c['act_fn']!r}")
    return dict(
        in_channels=c["in_channels"],
        out_channels=c["out_channels"],
        latent_channels=c["latent_channels"],
        block_out_channels=tuple(c["block_out_channels"]),
        layers_per_block=c["layers_per_block"],
        norm_num_groups=c["norm_num_groups"],
        mid_block_attention=c.get("mid_block_add_attention", True),
        use_quant_conv=c.get("use_quant_conv", True),
        use_post_quant_conv=c.get("use_post_quant_conv", True),
    )


def read_emu_config(folder: str | Path) -> dict[str, Any]:
    """:func:`emu_config` of a diffusers ``AutoencoderKL`` folder's ``config.json`` (diffusers' defaults for the keys it
    leaves out), without loading weights."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    with torch.device("meta"):
        vae = DiffusersAutoencoderKL.from_config(DiffusersAutoencoderKL.load_config(str(folder)))
    return emu_config(vae.config)


def from_diffusers(vae, source: str | None = None) -> AutoencoderKL:
    """A diffusers ``AutoencoderKL`` -> ours, with identical outputs and the same latent normalisation (``source``:
    where it came from, for the latent statistics' record)."""
    c = vae.config
    model = AutoencoderKL(**emu_config(c))
    missing, unexpected = model.load_state_dict(vae.state_dict(), strict=False)
    if unexpected or set(missing) - set(_OURS_ONLY):
        raise ValueError(f"state dicts differ: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    origin = {"source": source} if source else {}
    mean, std = c.get("latents_mean"), c.get("latents_std")
    if mean is not None and std is not None:  # per channel (e.g. Playground v2.5): (z - mean) * scaling_factor / std
        std = torch.tensor(std, dtype=torch.float64) / float(c["scaling_factor"])
        of = f"the diffusers config's latents_mean / latents_std (the latter over scaling_factor {c['scaling_factor']})"
        model.set_latent_statistics(torch.tensor(mean).float(), std.float(), {"of": of, **origin})
    else:  # one shift and scale for all channels: (z - shift_factor) * scaling_factor; SD / SDXL have no shift
        of = "the diffusers config's shift_factor / scaling_factor"
        model.set_latent_factors(c["scaling_factor"], c.get("shift_factor"), {"of": of, **origin})
    return model.to(next(vae.parameters()).dtype)


def diffusers_config(model: AutoencoderKL) -> dict:
    """The diffusers ``AutoencoderKL`` config of ``model``: its ``shift_factor`` / ``scaling_factor`` when it has them
    (:meth:`~emu.autoencoder.model.AutoencoderKL.latent_factors`), else its latent statistics as ``latents_mean`` /
    ``latents_std`` with ``scaling_factor`` 1 (diffusers divides ``latents_std`` by it)."""
    c = model.config
    n = len(c["block_out_channels"])
    factors = model.latent_factors()
    if factors is not None:
        normalisation = dict(shift_factor=factors[0], scaling_factor=factors[1])
    else:
        normalisation = dict(scaling_factor=1.0, latents_mean=model.latent_mean.tolist(),
                             latents_std=model.latent_std.tolist())  # fmt: skip
    return dict(
        in_channels=c["in_channels"],
        out_channels=c["out_channels"],
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(c["block_out_channels"]),
        layers_per_block=c["layers_per_block"],
        latent_channels=c["latent_channels"],
        norm_num_groups=c["norm_num_groups"],
        mid_block_add_attention=c["mid_block_attention"],
        use_quant_conv=c["use_quant_conv"],
        use_post_quant_conv=c["use_post_quant_conv"],
        **normalisation,
    )


def diffusers_state_dict(model: AutoencoderKL) -> dict:
    """``model``'s weights under diffusers' names (the latent statistics live in the config instead)."""
    return {k: v for k, v in model.state_dict().items() if k not in _OURS_ONLY}


def to_diffusers(model: AutoencoderKL):
    """Ours -> a diffusers ``AutoencoderKL`` (latent normalisation as :func:`diffusers_config` writes it). Models with
    Fourier features or the miniature's patch shortcut export through ``emu.export``'s ``EmuAutoencoderKL`` instead."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    if model.fourier is not None:
        raise ValueError("an autoencoder with Fourier-feature input has no diffusers counterpart")
    if not model.diffusers_layout:
        raise ValueError(
            f"{type(model).__name__} (e.g. the miniature's patch shortcut) has no diffusers counterpart: it adds to "
            "diffusers' layout; train emu.autoencoder.model.AutoencoderKL"
        )
    vae = DiffusersAutoencoderKL(**diffusers_config(model))
    vae.load_state_dict(diffusers_state_dict(model), strict=True)
    return vae.to(next(model.parameters()).dtype)


def load_diffusers(folder: str | Path) -> AutoencoderKL:
    """emu's :class:`AutoencoderKL` of a diffusers ``AutoencoderKL`` folder (``config.json`` +
    ``diffusion_pytorch_model.safetensors``, e.g. a pipeline's ``vae/``), in float32, converted by
    :func:`from_diffusers`."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    vae = DiffusersAutoencoderKL.from_pretrained(str(folder), local_files_only=True, torch_dtype=torch.float32)
    return from_diffusers(vae, source=str(folder))

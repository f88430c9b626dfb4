"""Weights between emu's :class:`~emu.autoencoder.model.AutoencoderKL` and diffusers' ``AutoencoderKL``.

The two share block structure and parameter names, so conversion maps the configs and loads the state dict
as it is. Models with Fourier-feature input or the
patch shortcut (the miniature's) have no diffusers counterpart and are refused.
"""

from __future__ import annotations

import torch

from emu.autoencoder.model import AutoencoderKL

_OURS_ONLY = ("latent_mean", "latent_std")


def from_diffusers(vae) -> AutoencoderKL:
    """A diffusers ``AutoencoderKL`` -> ours, with identical outputs."""
    c = vae.config
    if set(c.down_block_types) != {"DownEncoderBlock2D"} or set(c.up_block_types) != {"UpDecoderBlock2D"}:
        raise ValueError(f"only DownEncoderBlock2D/UpDecoderBlock2D autoencoders convert, got {c.down_block_types}")
    if c.act_fn != "silu" or not getattr(c, "use_quant_conv", True) or not getattr(c, "use_post_quant_conv", True):
        raise ValueError("only SiLU autoencoders with quant_conv and post_quant_conv convert")
    model = AutoencoderKL(
        in_channels=c.in_channels,
        out_channels=c.out_channels,
        latent_channels=c.latent_channels,
        block_out_channels=tuple(c.block_out_channels),
        layers_per_block=c.layers_per_block,
        norm_num_groups=c.norm_num_groups,
        mid_block_attention=getattr(c, "mid_block_add_attention", True),
    )
    missing, unexpected = model.load_state_dict(vae.state_dict(), strict=False)
    if unexpected or set(missing) - set(_OURS_ONLY):
        raise ValueError(f"state dicts differ: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    if getattr(c, "latents_mean", None) is not None and getattr(c, "latents_std", None) is not None:
        model.set_latent_statistics(torch.tensor(c.latents_mean).float(), torch.tensor(c.latents_std).float(),
                                    {"of": "the diffusers config's latents_mean / latents_std"})  # fmt: skip
    return model.to(next(vae.parameters()).dtype)


def diffusers_config(model: AutoencoderKL) -> dict:
    """The diffusers ``AutoencoderKL`` config of ``model`` (latent statistics as ``latents_mean`` / ``latents_std``)."""
    c = model.config
    n = len(c["block_out_channels"])
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
        latents_mean=model.latent_mean.tolist(),
        latents_std=model.latent_std.tolist(),
    )


def diffusers_state_dict(model: AutoencoderKL) -> dict:
    """``model``'s weights under diffusers' names (the latent statistics live in the config instead)."""
    return {k: v for k, v in model.state_dict().items() if k not in _OURS_ONLY}


def to_diffusers(model: AutoencoderKL):
    """Ours -> a diffusers ``AutoencoderKL`` (latent statistics go to ``latents_mean`` / ``latents_std``). Models with
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

"""The KL autoencoder of stage 0, with the block structure and parameter names of diffusers' ``AutoencoderKL``.

Emu's changes over the SD autoencoder are configuration here: ``latent_channels`` (4 -> 16) and an optional,
fixed Fourier-feature transform of the RGB input (:class:`FourierFeatures`). Latents are normalised per
channel (EDM2) with statistics measured on data and stored in the model's ``latent_mean`` / ``latent_std``
buffers (:meth:`AutoencoderKL.normalize` / :meth:`AutoencoderKL.denormalize`); a public autoencoder converted from
diffusers keeps its one ``shift_factor`` / ``scaling_factor`` instead (:meth:`AutoencoderKL.set_latent_factors`).
SD3's and FLUX.1's autoencoders have no ``quant_conv`` / ``post_quant_conv`` (``use_quant_conv=False``,
``use_post_quant_conv=False``, diffusers' names).

State-dict keys match diffusers (``encoder.down_blocks.0.resnets.0.conv1.weight``, ...), so weights convert by
loading them as they are (:mod:`emu.autoencoder.convert`); the Fourier transform has no parameters and the
latent statistics are buffers of our own.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from emu.errors import ConfigError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
log = logging.getLogger(__name__)
MIN_LATENT_STD = 1e-6  # the floor of a stored std (a channel at it is collapsed)
COLLAPSE_RATIO = 1e-2  # a channel whose std is below this fraction of the median channel's is collapsed


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-Conv twice with a residual; a 1x1 ``conv_shortcut`` when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, groups: int = 32, eps: float = 1e-6, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.conv_shortcut(x) if self.conv_shortcut is not None else x) + h


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over all positions (diffusers' VAE mid-block ``Attention``), via SDPA."""

    def __init__(self, channels: int, groups: int = 32, eps: float = 1e-6):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        t = rearrange(self.group_norm(x), "b c h w -> b (h w) c")
        q, k, v = (rearrange(f(t), "b n c -> b 1 n c") for f in (self.to_q, self.to_k, self.to_v))
        out = rearrange(F.scaled_dot_product_attention(q, k, v), "b 1 n c -> b n c")
        out = self.to_out[1](self.to_out[0](out))
        return x + rearrange(out, "b (h w) c -> b c h w", h=h, w=w)


class Downsample2D(nn.Module):
    """Asymmetric zero pad (right, bottom) then a stride-2 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownEncoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(layers)
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(layers)
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class UNetMidBlock2D(nn.Module):
    """ResNet, self-attention, ResNet at the lowest resolution."""

    def __init__(self, channels: int, groups: int, attention: bool = True):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(channels, channels, groups), ResnetBlock2D(channels, channels, groups)]
        )
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups)]) if attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


def _run(blocks: list[nn.Module], x: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    for block in blocks:
        x = checkpoint(block, x, use_reentrant=False) if use_checkpoint and torch.is_grad_enabled() else block(x)
    return x


class Encoder(nn.Module):
    def __init__(self, in_channels, latent_channels, block_out_channels, layers_per_block, groups, mid_attention):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], 3, padding=1)
        n = len(block_out_channels)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock2D(block_out_channels[max(i - 1, 0)], c, layers_per_block, groups, downsample=i < n - 1)
            for i, c in enumerate(block_out_channels)
        )
        self.mid_block = UNetMidBlock2D(block_out_channels[-1], groups, mid_attention)
        self.conv_norm_out = nn.GroupNorm(groups, block_out_channels[-1], eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(block_out_channels[-1], 2 * latent_channels, 3, padding=1)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _run([*self.down_blocks, self.mid_block], self.conv_in(x), self.gradient_checkpointing)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, out_channels, latent_channels, block_out_channels, layers_per_block, groups, mid_attention):
        super().__init__()
        rev = list(reversed(block_out_channels))
        self.conv_in = nn.Conv2d(latent_channels, rev[0], 3, padding=1)
        self.mid_block = UNetMidBlock2D(rev[0], groups, mid_attention)
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock2D(rev[max(i - 1, 0)], c, layers_per_block + 1, groups, upsample=i < len(rev) - 1)
            for i, c in enumerate(rev)
        )
        self.conv_norm_out = nn.GroupNorm(groups, block_out_channels[0], eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, 3, padding=1)
        self.gradient_checkpointing = False

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = _run([self.mid_block, *self.up_blocks], self.conv_in(z), self.gradient_checkpointing)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class FourierFeatures(nn.Module):
    """Fixed sin/cos features of the input, concatenated to it: C -> C * (1 + 2 * len(frequencies)) channels.

    ``frequencies`` multiply 2π on input in [-1, 1] (Emu gives none). 8-bit levels are 2/255 apart there, so above
    255/4 = 63.75 a feature no longer varies smoothly with intensity: at 64 it flips sign at every level (the last
    bit's parity) and at 128 it aliases. The paper-scale default is 1..16 (docs/benchmarks.md#fourier-features).
    Nothing in it is learned.
    """

    def __init__(self, frequencies: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0)):
        super().__init__()
        self.register_buffer("frequencies", torch.tensor(frequencies, dtype=torch.float32), persistent=False)

    def extra_channels(self, channels: int) -> int:
        return channels * 2 * len(self.frequencies)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arg = 2 * math.pi * x.unsqueeze(2) * self.frequencies.to(x.dtype).view(1, 1, -1, 1, 1)  # b c f h w
        feats = torch.cat([arg.sin(), arg.cos()], dim=2)
        return torch.cat([x, rearrange(feats, "b c f h w -> b (c f) h w")], dim=1)


LATENT_SCALINGS = ("channel", "global", "factor")


def collapsed_channels(std: torch.Tensor, ratio: float = COLLAPSE_RATIO) -> list[int]:
    """The latent channels whose std is below ``ratio`` times the median channel's (or at the floor): channels the
    encoder does not use."""
    floor = torch.maximum(std.median() * ratio, torch.tensor(MIN_LATENT_STD, dtype=std.dtype, device=std.device))
    return [int(c) for c in torch.nonzero(std <= floor).flatten()]


class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)) per latent element."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        device = generator.device if generator is not None else self.mean.device  # a CPU generator: CPU noise
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def kl(self) -> torch.Tensor:
        """KL to N(0, I), summed over latent elements: shape (B,)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    """KL autoencoder: ``encode(x)`` -> :class:`DiagonalGaussian`, ``decode(z)`` -> image, ``forward`` reconstructs.

    Args:
        latent_channels: 4 (SD), 8 or 16 (Emu).
        block_out_channels: widths per resolution; f = 2 ** (len - 1) (4 entries: f=8).
        layers_per_block: ResNet blocks per encoder stage (the decoder has one more, as in diffusers).
        norm_num_groups: GroupNorm groups (must divide every width).
        fourier_frequencies: frequencies of the fixed Fourier-feature input transform; empty for none.
        mid_block_attention: self-attention in the mid blocks.
        use_quant_conv, use_post_quant_conv: the 1x1 convolutions after the encoder and before the decoder (SD and
            SDXL have them; SD3 and FLUX.1 do not).
        gradient_checkpointing: recompute block activations in the backward pass to save memory.

    Diffusers' layout and nothing else (``diffusers_layout``; :mod:`emu.autoencoder.convert`). A subclass that adds
    to it (the miniature's :class:`emu.mini.autoencoder.PatchShortcutAutoencoderKL`) names itself in ``config``
    (``class``), so checkpoints and exports rebuild it (:func:`autoencoder_from_config`) without this package
    importing it.
    """

    diffusers_layout = True

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        latent_channels: int = 16,
        block_out_channels: tuple[int, ...] = (128, 256, 512, 512),
        layers_per_block: int = 2,
        norm_num_groups: int = 32,
        fourier_frequencies: tuple[float, ...] = (),
        mid_block_attention: bool = True,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        block_out_channels = tuple(int(c) for c in block_out_channels)
        fourier_frequencies = tuple(float(f) for f in fourier_frequencies)
        bad = [c for c in block_out_channels if c % norm_num_groups]
        if bad:
            raise ConfigError(
                "model.autoencoder.norm_num_groups", f"{norm_num_groups} does not divide the widths {bad}"
            )
        self.config = dict(
            in_channels=in_channels,
            out_channels=out_channels,
            latent_channels=latent_channels,
            block_out_channels=list(block_out_channels),
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            fourier_frequencies=list(fourier_frequencies),
            mid_block_attention=mid_block_attention,
            use_quant_conv=use_quant_conv,
            use_post_quant_conv=use_post_quant_conv,
        )
        self.fourier = FourierFeatures(fourier_frequencies) if fourier_frequencies else None
        encoder_in = in_channels + (self.fourier.extra_channels(in_channels) if self.fourier else 0)
        args = (latent_channels, block_out_channels, layers_per_block, norm_num_groups, mid_block_attention)
        self.encoder = Encoder(encoder_in, *args)
        self.decoder = Decoder(out_channels, *args)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1) if use_post_quant_conv else None
        self.register_buffer("latent_mean", torch.zeros(latent_channels))
        self.register_buffer("latent_std", torch.ones(latent_channels))
        self.latent_statistics: dict[str, Any] = {}  # how latent_mean / latent_std were measured (none: not yet)
        self.set_gradient_checkpointing(gradient_checkpointing)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config["block_out_channels"]) - 1)

    @property
    def latent_channels(self) -> int:
        return self.config["latent_channels"]

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.encoder.gradient_checkpointing = self.decoder.gradient_checkpointing = enabled

    def moments(self, x: torch.Tensor) -> torch.Tensor:
        """The posterior's mean and log-variance, concatenated on the channels."""
        if x.shape[-1] % self.downsample_factor or x.shape[-2] % self.downsample_factor:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by f={self.downsample_factor}")
        moments = self.encoder(self.fourier(x) if self.fourier is not None else x)
        return self.quant_conv(moments) if self.quant_conv is not None else moments

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.moments(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z) if self.post_quant_conv is not None else z)

    def forward(self, x: torch.Tensor, sample_posterior: bool = False, generator=None) -> torch.Tensor:
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator) if sample_posterior else posterior.mode())

    # ------------------------------------------------------------------ latent normalisation
    def _scale(self, scaling: str) -> torch.Tensor:
        """The divisor per channel: its own std (``channel``), or one std for all channels (``global``: the root mean
        square of the channel stds, so the latents keep unit variance on average and each channel its share; taken in
        float64, so channels that share one std are divided by exactly that std)."""
        if scaling == "channel":
            return self.latent_std.view(1, -1, 1, 1)
        if scaling == "global":
            rms = self.latent_std.double().square().mean().sqrt().to(self.latent_std.dtype)
            return rms.expand(self.latent_channels).view(1, -1, 1, 1)
        raise ValueError(f"unknown latent scaling {scaling!r}; choose one of {LATENT_SCALINGS}")

    def normalize(self, z: torch.Tensor, scaling: str = "channel") -> torch.Tensor:
        """Raw latents -> zero mean per channel (with the stored data statistics) and unit std: per channel
        (``channel``, EDM2) or on average over channels (``global``, SD's single scale factor); ``factor``: diffusers'
        ``(z - shift_factor) * scaling_factor`` with the factors of a converted public autoencoder
        (:meth:`set_latent_factors`), the same operations in the same order as diffusers' pipelines, so bit for bit
        theirs. The statistics follow ``z`` to its device (the autoencoder itself may stay on the CPU: training on
        precomputed latents)."""
        if scaling == "factor":
            shift, scale = self._factors()
            return (z if shift is None else z - shift) * scale
        return (z - self.latent_mean.to(z).view(1, -1, 1, 1)) / self._scale(scaling).to(z)

    def denormalize(self, z: torch.Tensor, scaling: str = "channel") -> torch.Tensor:
        if scaling == "factor":
            shift, scale = self._factors()
            return z / scale if shift is None else z / scale + shift
        return z * self._scale(scaling).to(z) + self.latent_mean.to(z).view(1, -1, 1, 1)

    def latent_factors(self) -> tuple[float | None, float] | None:
        """diffusers' ``(shift_factor, scaling_factor)`` when the latent statistics are a public autoencoder's one shift
        and scale (:meth:`set_latent_factors`; no shift: ``None``), else ``None`` (per-channel statistics)."""
        record = self.latent_statistics
        if "scaling_factor" not in record:
            return None
        shift = record.get("shift_factor")
        return (None if shift is None else float(shift)), float(record["scaling_factor"])

    def _factors(self) -> tuple[float | None, float]:
        factors = self.latent_factors()
        if factors is None:
            raise ValueError(
                "latent scaling 'factor' needs diffusers' shift_factor / scaling_factor (a public autoencoder "
                "converted from diffusers, e.g. SD3's or FLUX.1's); this autoencoder has per-channel statistics "
                f"({self.latent_statistics.get('of', 'never measured')}): use 'channel' or 'global'"
            )
        return factors

    def set_latent_factors(
        self, scaling_factor: float, shift_factor: float | None = None, record: dict[str, Any] | None = None
    ) -> None:
        """Store diffusers' one shift and one scale for all channels, ``(z - shift_factor) * scaling_factor`` (SD3,
        FLUX.1; SD and SDXL have no shift). Every channel's mean becomes ``shift_factor`` and its std
        ``1 / scaling_factor`` (float64, then rounded once), so ``global`` scaling divides by exactly that std and
        ``channel`` agrees with it; ``factor`` scaling applies the two numbers themselves, as diffusers does. The
        record keeps them (``config.json``, checkpoint headers); new statistics replace them."""
        scale = float(scaling_factor)
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scaling_factor must be a positive number, got {scaling_factor!r}")
        shift = None if shift_factor is None else float(shift_factor)
        n = self.latent_channels
        mean = torch.full((n,), shift or 0.0, dtype=self.latent_mean.dtype)
        std = torch.full((n,), 1.0 / scale, dtype=self.latent_std.dtype)
        self.set_latent_statistics(mean, std, {**(record or {}), "shift_factor": shift, "scaling_factor": scale})

    def set_latent_statistics(
        self, mean: torch.Tensor, std: torch.Tensor, record: dict[str, Any] | None = None
    ) -> list[int]:
        """Store the per-channel statistics that :meth:`normalize` uses; ``record`` says how they were measured (it is
        written to ``config.json`` with them). Returns the collapsed channels (:func:`collapsed_channels`), with a
        warning: normalising divides their posterior noise by a tiny std."""
        if mean.shape != (self.latent_channels,) or std.shape != (self.latent_channels,):
            raise ValueError(f"latent statistics must have shape ({self.latent_channels},)")
        self.latent_mean.copy_(mean)
        self.latent_std.copy_(std.clamp(min=MIN_LATENT_STD))
        self.latent_statistics = dict(record or {})
        collapsed = collapsed_channels(std)
        if collapsed:
            log.warning(
                "latent channels %s have collapsed (std %s against a median of %.3g): the encoder does not use them, "
                "and normalising them amplifies whatever noise they carry",
                collapsed, [round(float(std[c]), 6) for c in collapsed], float(std.median()),
            )  # fmt: skip
        return collapsed

    # ------------------------------------------------------------------------------------ export/import
    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``model.safetensors`` (weights and latent statistics) and ``config.json``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt", "emu_kind": "autoencoder"})
        config = {"_class_name": "emu.AutoencoderKL", **self.config}
        if self.latent_statistics:
            config["latent_statistics"] = self.latent_statistics
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> AutoencoderKL:
        """Load a folder written by :meth:`save_pretrained` (as the class its config names)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        folder = Path(folder)
        config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        if not config_path.is_file() or not weights_path.is_file():
            raise FileNotFoundError(
                f"'{folder}' is not an exported emu autoencoder (needs {CONFIG_NAME} and {WEIGHTS_NAME})"
            )
        config = json.loads(config_path.read_text())
        if config.pop("_class_name", None) != "emu.AutoencoderKL":
            raise ValueError(f"'{config_path}' describes another kind of model, not an emu autoencoder")
        with safe_open(str(weights_path), "pt") as f:
            kind = (f.metadata() or {}).get("emu_kind")
        if kind != "autoencoder":
            raise ValueError(f"'{weights_path}' holds a {kind or 'foreign'} checkpoint, not an emu autoencoder")
        record = config.pop("latent_statistics", {})
        model = autoencoder_from_config(config)
        model.load_state_dict(load_file(str(weights_path)))
        model.latent_statistics = record
        return model


# configs written before a subclass named itself: the flag it set -> its class
LEGACY_CLASSES = {"patch_shortcut": "emu.mini.autoencoder.PatchShortcutAutoencoderKL"}


def autoencoder_from_config(config: dict[str, Any]) -> AutoencoderKL:
    """The autoencoder a stored config (a checkpoint's, an export's ``config.json``) describes: the subclass its
    ``class`` names by dotted path, else :class:`AutoencoderKL`; old configs say ``patch_shortcut: true`` instead."""
    config = dict(config)
    path = config.pop("class", None)
    for flag, legacy in LEGACY_CLASSES.items():
        if config.pop(flag, False) and path is None:
            path = legacy
    if path is None:
        return AutoencoderKL(**config)
    from hydra.utils import get_class

    cls = get_class(path)
    if not (isinstance(cls, type) and issubclass(cls, AutoencoderKL)):
        raise ValueError(f"'{path}' is not an AutoencoderKL")
    return cls(**config)

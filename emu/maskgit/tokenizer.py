"""The masked transformer's image tokenizer: FSQ tokens of the frozen autoencoder's normalised latents.

Muse tokenizes images with a VQGAN; here the tokens come from the stage-0 autoencoder's latents, which already hold
what the images are (f = 8, 16 channels), so the tokenizer only has to make them discrete: a small convolutional
encoder squeezes each latent position's channels to ``len(levels)`` bounded values, :class:`~emu.autoencoder.fsq.FSQ`
rounds them (one token per position, ``prod(levels)`` tokens), and a decoder maps them back to the latent channels.
It trains by latent MSE on the corpus's latents (precomputed ones included) with the autoencoder frozen, so an image
is the autoencoder's decoding of the tokens' latents. :class:`TokenizerModule` trains it with ``train.py``
(``experiment=mini/tokenizer``); its checkpoints have ``kind: tokenizer`` and :func:`load_tokenizer` reads them.
:class:`TokenRoundTrip` is an image's way through both (what ``eval.py`` measures of a tokenizer checkpoint, as of an
autoencoder: PSNR, SSIM, LPIPS, the judge's appeal of the reconstructions).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from emu.autoencoder.fsq import FSQ
from emu.autoencoder.model import LATENT_SCALINGS
from emu.autoencoder.module import load_autoencoder
from emu.data.batches import trains_on_good_samples
from emu.diffusion.base import TextToImageModule, check_schedule, plain
from emu.diffusion.frozen import FrozenNetworks
from emu.diffusion.precompute import fingerprint
from emu.errors import ConfigError
from emu.training.distributed import FSDPStrategy
from emu.utils.checkpoint_header import header, write_header

KIND = "tokenizer"


def _stack(c_in: int, hidden: int, c_out: int, depth: int, kernel_size: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c_in, hidden, kernel_size, padding=kernel_size // 2)]
    for _ in range(depth - 1):
        layers += [nn.SiLU(), nn.Conv2d(hidden, hidden, kernel_size, padding=kernel_size // 2)]
    return nn.Sequential(*layers, nn.SiLU(), nn.Conv2d(hidden, c_out, 1))


class LatentTokenizer(nn.Module):
    """Tokens of ``latent_channels``-channel latents, one per position, through FSQ with ``levels``.

    Args:
        latent_channels: the autoencoder's latent channels.
        levels: FSQ's levels (``prod(levels)`` tokens; ``[8, 5, 5, 5]``: 1000, ``[7, 5, 5, 5, 5]``: 4375).
        hidden, depth, kernel_size: the encoder's and decoder's convolutions (``depth`` of ``kernel_size``, then a
            1x1 to the output).
    """

    def __init__(self, latent_channels: int = 16, levels: Sequence[int] = (8, 5, 5, 5), hidden: int = 128,
                 depth: int = 2, kernel_size: int = 3):  # fmt: skip
        super().__init__()
        levels = [int(v) for v in levels]
        self.config = dict(latent_channels=latent_channels, levels=levels, hidden=hidden, depth=depth,
                           kernel_size=kernel_size)  # fmt: skip
        self.fsq = FSQ(levels)
        self.encoder = _stack(latent_channels, hidden, self.fsq.dim, depth, kernel_size)
        self.decoder = _stack(self.fsq.dim, hidden, latent_channels, depth, kernel_size)

    @property
    def codebook_size(self) -> int:
        return self.fsq.codebook_size

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(reconstruction, codes)`` of latents ``z`` (B x C x h x w); gradients pass the rounding straight."""
        codes = self.fsq(self.encoder(z))
        return self.decoder(codes), codes

    @torch.no_grad()
    def tokenize(self, z: torch.Tensor) -> torch.Tensor:
        """B x h x w token ids (int64) of latents ``z``, in float32 whatever the autocast around it (a value near a
        level's edge rounds the same in training, sampling and evaluation)."""
        with torch.autocast(z.device.type, enabled=False):
            return self.fsq.codes_to_indices(self.fsq(self.encoder(z.float())))

    def detokenize(self, tokens: torch.Tensor) -> torch.Tensor:
        """Latents (B x C x h x w) of token ids (B x h x w)."""
        codes = self.fsq.indices_to_codes(tokens).to(self.decoder[0].weight.dtype)
        return self.decoder(codes)


class TokenizerModule(TextToImageModule):
    """Trains a :class:`LatentTokenizer` on the frozen ``autoencoder``'s normalised latents (``latent_scaling``) by
    MSE. Validation logs the latent MSE relative to the latents' variance (``val/relative_mse``), the share of the
    tokens a validation batch uses (``val/codebook_usage``, averaged over batches), and the PSNR of the images decoded
    from the tokens against the autoencoder's own decoding (``val/psnr_vs_autoencoder``, first batch).

    Args:
        tokenizer: :class:`LatentTokenizer`'s keyword arguments (``latent_channels`` from the autoencoder).
        autoencoder: the stage-0 checkpoint or export folder (frozen), as the diffusion model's.
        latent_scaling, sample_latents: how latents are normalised and drawn, as the diffusion model's (the
            transformer that reads the tokens uses the tokenizer's).
        lr, betas, weight_decay, warmup_steps, lr_schedule, lr_scaling, lr_reference_batch, cooldown_steps: AdamW and
            its schedule, as the diffusion model's.
        image_weight: the weight of an image loss beside the latent MSE: the MSE of the autoencoder's decoding of the
            reconstructed latents against its decoding of the latents (0: the latent MSE alone). The latent MSE weighs
            every latent channel alike; the decoder does not, and the images are what the tokens are for.
    """

    def __init__(self, tokenizer: dict[str, Any], autoencoder: str, latent_scaling: str = "channel",
                 sample_latents: bool = False, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, warmup_steps: int = 100, lr_schedule: str = "constant",
                 lr_scaling: str = "none", lr_reference_batch: int = 1, cooldown_steps: int = 0,
                 image_weight: float = 0.0):  # fmt: skip
        super().__init__()
        tokenizer, betas = plain(tokenizer), tuple(plain(betas))
        if image_weight < 0:
            raise ConfigError("model.image_weight", f"must be >= 0, got {image_weight}")
        self.offloads_frozen = image_weight == 0  # an image loss decodes at every step: the decoder stays on the device
        self.save_hyperparameters()
        check_schedule(lr_schedule, lr_scaling, lr_reference_batch, cooldown_steps)
        if latent_scaling not in LATENT_SCALINGS:
            raise ConfigError("model.latent_scaling", f"must be one of {LATENT_SCALINGS}, got {latent_scaling!r}")
        self.autoencoder = load_autoencoder(autoencoder)
        if self.autoencoder.downsample_factor == 1:
            raise ConfigError("model.autoencoder", "is pixel space: a latent tokenizer needs a latent autoencoder")
        channels = self.autoencoder.latent_channels
        tokenizer = {**dict(tokenizer), "latent_channels": tokenizer.get("latent_channels", channels)}
        if tokenizer["latent_channels"] != channels:
            raise ConfigError("model.tokenizer.latent_channels", f"is {tokenizer['latent_channels']} but the "
                              f"autoencoder's latents have {channels} channels")  # fmt: skip
        self.tokenizer = LatentTokenizer(**tokenizer)
        self.frozen = FrozenNetworks({"autoencoder": self.autoencoder})
        self.ema = None
        self.conditioner = None  # no text
        self.val_prompts: list[str] = []  # no sample grid: validation logs the reconstruction figures

    def trained_modules(self) -> dict[str, nn.Module]:
        return {"tokenizer": self.tokenizer}

    @property
    def resolution_multiple(self) -> int:
        return self.autoencoder.downsample_factor

    @property
    def downsampling(self) -> str:
        return f"autoencoder f={self.autoencoder.downsample_factor}"

    def decoded(self, z: torch.Tensor) -> torch.Tensor:
        """Images (the autoencoder's decoding) of normalised latents ``z``."""
        return self.autoencoder.decode(self.autoencoder.denormalize(z, self.hparams.latent_scaling))

    def reconstruction_loss(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, reconstruction)``: the latent MSE, plus ``image_weight`` times the MSE of the decoded images
        against the autoencoder's decoding of ``z``."""
        recon, _ = self.tokenizer(z)
        loss = F.mse_loss(recon, z)
        if self.hparams.image_weight > 0:
            with torch.no_grad():
                target = self.decoded(z)
            loss = loss + self.hparams.image_weight * F.mse_loss(self.decoded(recon), target)
        return loss, recon

    def configure_model(self) -> None:
        if self._trainer is not None and isinstance(self._trainer.strategy, FSDPStrategy):
            raise ConfigError("trainer", "a tokenizer is small enough for every GPU: train it with trainer=ddp, not "
                              "FSDP (experiment=tokenizer does)")  # fmt: skip

    @trains_on_good_samples  # a batch with no good sample is skipped (emu.data.batches)
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        z = self.batch_latents(batch)
        loss, _ = self.reconstruction_loss(z)
        self.log("train/loss", loss, prog_bar=True, batch_size=z.shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        z = self.batch_latents(batch)
        recon, codes = self.tokenizer(z)
        bs = z.shape[0]
        if self.hparams.image_weight > 0:
            with self.frozen.on(self.device):
                self.log("val/loss", self.reconstruction_loss(z)[0], prog_bar=True, batch_size=bs, sync_dist=True)
        else:
            self.log("val/loss", F.mse_loss(recon, z), prog_bar=True, batch_size=bs, sync_dist=True)
        self.log("val/relative_mse", F.mse_loss(recon, z) / z.var(), batch_size=bs, sync_dist=True)
        used = torch.unique(self.tokenizer.fsq.codes_to_indices(codes)).numel()
        self.log("val/codebook_usage", used / self.tokenizer.codebook_size, batch_size=bs, sync_dist=True)
        if batch_idx == 0:
            with self.frozen.on(self.device):
                ours, theirs = self.decoded(recon).clamp(-1, 1), self.decoded(z).clamp(-1, 1)
            mse = ((ours - theirs) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-10)  # [-1, 1]: peak-to-peak 2
            self.log("val/psnr_vs_autoencoder", (10 * torch.log10(4 / mse)).mean(), batch_size=bs, sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        sd = checkpoint["state_dict"]
        for k in [k for k in sd if k.startswith(self.frozen.prefixes)]:
            del sd[k]
        write_header(checkpoint, KIND, tokenizer_config=self.tokenizer.config, resolution=self.train_resolution,
                     latent_scaling=self.hparams.latent_scaling, autoencoder=str(self.hparams.autoencoder),
                     autoencoder_fingerprint=fingerprint(self.autoencoder))  # fmt: skip

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if header(checkpoint).get("kind") != KIND:
            raise ValueError(f"this is a {header(checkpoint).get('kind') or 'non-emu'} checkpoint, not a tokenizer")
        own = self.state_dict()
        checkpoint["state_dict"].update({k: v for k, v in own.items() if k.startswith(self.frozen.prefixes)})


class TokenRoundTrip(nn.Module):
    """Images through the autoencoder and the tokenizer and back: encode (the posterior's mode), normalise, tokenize,
    detokenize, denormalise, decode. The best a masked transformer over these tokens can draw."""

    def __init__(self, autoencoder: nn.Module, tokenizer: LatentTokenizer, latent_scaling: str = "channel"):
        super().__init__()
        self.autoencoder, self.tokenizer, self.latent_scaling = autoencoder, tokenizer, latent_scaling

    @property
    def latent_channels(self) -> int:
        return self.autoencoder.latent_channels

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        ae = self.autoencoder
        z = ae.normalize(ae.encode(images).mode(), self.latent_scaling)
        z = self.tokenizer.detokenize(self.tokenizer.tokenize(z))
        return ae.decode(ae.denormalize(z, self.latent_scaling))


def is_tokenizer_checkpoint(path: str | Path) -> bool:
    path = Path(path).expanduser()
    if not path.is_file() or path.suffix != ".ckpt":
        return False
    try:
        return header(torch.load(path, map_location="cpu", weights_only=False, mmap=True)).get("kind") == KIND
    except Exception:  # not a torch file: whoever loads it says what it is
        return False


def load_round_trip(path: str | Path) -> TokenRoundTrip:
    """The :class:`TokenRoundTrip` of a tokenizer checkpoint, through the autoencoder it was trained on (its path in
    the checkpoint, checked by fingerprint)."""
    tokenizer, info = load_tokenizer(path, "a/b")
    autoencoder = load_autoencoder(info["autoencoder"])
    if fingerprint(autoencoder) != info.get("autoencoder_fingerprint"):
        raise ConfigError("a/b", f"the autoencoder at '{info['autoencoder']}' is not the one the tokenizer '{path}' "
                          "was trained on (its weights changed since)")  # fmt: skip
    return TokenRoundTrip(autoencoder.eval(), tokenizer, info["latent_scaling"]).eval()


def load_tokenizer(path: str | Path, key: str = "model.tokenizer") -> tuple[LatentTokenizer, dict[str, Any]]:
    """The tokenizer of a ``kind: tokenizer`` checkpoint (frozen, eval mode) and its header (``latent_scaling``,
    ``autoencoder_fingerprint``, ...)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(key, f"no tokenizer checkpoint at '{path}' (train one with "
                          "`python train.py experiment=mini/tokenizer`)")  # fmt: skip
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    info = header(ckpt)
    if info.get("kind") != KIND:
        raise ConfigError(key, f"'{path}' is a {info.get('kind') or 'non-emu'} checkpoint, not a "
                          "tokenizer checkpoint")  # fmt: skip
    tokenizer = LatentTokenizer(**info["tokenizer_config"])
    prefix = "tokenizer."
    tokenizer.load_state_dict({k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)})
    return tokenizer.eval().requires_grad_(False), info

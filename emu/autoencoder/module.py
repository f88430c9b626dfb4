"""Stage 0 LightningModule: trains the autoencoder with a PatchGAN (two optimizers, manual optimization).

Validation logs PSNR and SSIM (torchmetrics), LPIPS when the loss has it, rFID when Inception weights are
given, a grid of inputs over reconstructions, and measures the per-channel mean and std of the latents stage 1
trains on (posterior samples, :class:`LatentStatistics`) over the whole validation set, summed across ranks; they are
stored in the autoencoder's buffers, so every checkpoint carries the statistics of its own weights, and the export
records the step and image count they came from.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from emu.autoencoder.convert import load_diffusers
from emu.autoencoder.losses import AutoencoderLoss
from emu.autoencoder.model import AutoencoderKL, DiagonalGaussian, autoencoder_from_config
from emu.data.batches import good_samples
from emu.errors import ConfigError
from emu.training.distributed import FSDPStrategy
from emu.training.numerics import NumericalGuard
from emu.training.optim import images_per_step
from emu.utils.autoencoder_paths import PIXELS, find_autoencoder
from emu.utils.checkpoint_header import header, write_header
from emu.utils.images import image_grid, log_image
from emu.utils.resolution import check_resolution
from emu.utils.schedules import LR_SCALINGS, scaled_lr, warmup_constant

KIND = "autoencoder"


class LatentStatistics:
    """Running per-channel mean and std of what stage 1 trains on, posterior **samples** (float64 sums).

    A sample's variance is the spread of the posterior means plus the mean posterior variance, so both are summed
    exactly from each posterior's mean and variance, with no noise drawn. (Measured on the means alone, a channel
    whose means barely move got a std near 0, and normalising then blew its posterior noise up.) A plain tensor
    counts as a posterior with no variance. :meth:`reduced` sums the counts of all ranks.
    """

    def __init__(self, channels: int):
        self.sum = torch.zeros(channels, dtype=torch.float64)
        self.sumsq = torch.zeros(channels, dtype=torch.float64)
        self.count = 0  # latent elements per channel
        self.images = 0

    def update(self, latents: DiagonalGaussian | torch.Tensor) -> None:
        mean = latents.mean if isinstance(latents, DiagonalGaussian) else latents
        m = mean.detach().double().cpu().transpose(0, 1).flatten(1)  # C x (B*H*W)
        self.sum += m.sum(1)
        self.sumsq += m.square().sum(1)
        if isinstance(latents, DiagonalGaussian):
            self.sumsq += latents.logvar.detach().double().exp().cpu().transpose(0, 1).flatten(1).sum(1)
        self.count += m.shape[1]
        self.images += mean.shape[0]

    def reduced(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> LatentStatistics:
        """These statistics summed over ranks by ``reduce_sum`` (e.g. the strategy's all-reduce; identity on one)."""
        counts = torch.tensor([self.count, self.images], dtype=torch.float64)
        packed = reduce_sum(torch.cat([self.sum, self.sumsq, counts])).double().cpu()
        out, c = LatentStatistics(len(self.sum)), len(self.sum)
        out.sum, out.sumsq, out.count, out.images = packed[:c], packed[c : 2 * c], int(packed[-2]), int(packed[-1])
        return out

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.sum / self.count
        var = (self.sumsq / self.count - mean.square()).clamp(min=0)
        return mean.float(), var.sqrt().float()


class AutoencoderModule(L.LightningModule):
    """Trains :class:`~emu.autoencoder.model.AutoencoderKL` with :class:`~emu.autoencoder.losses.AutoencoderLoss`.

    Args:
        autoencoder, loss: the network and its losses (built by Hydra from the model config).
        lr, betas, weight_decay, warmup_steps: AdamW of the autoencoder (linear warm-up, then constant).
        lr_scaling: how ``lr`` (and ``disc_lr``) scale with the global batch (:func:`~emu.utils.schedules.scaled_lr`):
            ``none`` (as given), ``linear`` (``lr`` is per image: the LDM recipe's 4.5e-6 x GPUs x batch) or ``sqrt``.
        disc_lr: learning rate of the discriminator (default: ``lr``).
        grad_clip: gradient-norm clip for both optimizers (0: off).
        init_from: an autoencoder checkpoint or export folder to initialise the weights from, or a public one
            (a diffusers ``AutoencoderKL`` folder or cached hub id: :func:`load_autoencoder`).
        rfid_weights: a local Inception FID weights file (torch-fidelity's ``pt_inception-2015-12-05``);
            rFID is computed at validation when given.
        num_logged_images: images in the validation grid.
        export_on_fit_end: write ``export/`` (safetensors + config.json) into the run folder at the end.
    """

    def __init__(
        self,
        autoencoder: AutoencoderKL,
        loss: AutoencoderLoss,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.5, 0.9),
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_scaling: str = "none",
        disc_lr: float | None = None,
        grad_clip: float = 0.0,
        init_from: str | None = None,
        rfid_weights: str | None = None,
        num_logged_images: int = 8,
        export_on_fit_end: bool = True,
    ):
        super().__init__()
        if lr_scaling not in LR_SCALINGS:
            raise ConfigError("model.lr_scaling", f"must be one of {list(LR_SCALINGS)}, got {lr_scaling!r}")
        betas = tuple(float(b) for b in betas)  # plain values in checkpoints (resume loads them weights_only)
        self.save_hyperparameters(ignore=["autoencoder", "loss"])
        self.automatic_optimization = False
        self.autoencoder = autoencoder
        self.loss = loss
        if init_from:  # the weights and the latent statistics with the record of where they came from
            start = load_autoencoder(init_from, expect=autoencoder.config)
            self.autoencoder.load_state_dict(start.state_dict())
            self.autoencoder.latent_statistics = dict(start.latent_statistics)
        self.psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        self.rfid = _make_rfid(rfid_weights) if rfid_weights else None
        self._stats: LatentStatistics | None = None
        self._lpips_sum = 0.0
        self._lpips_n = 0
        # Whether the autoencoder still waits for its data-dependent initialisation (``init_from_batch``: the
        # miniature's PCA patch path), saved in checkpoints so that a resumed run or a model loaded with init_from is
        # never re-initialised. The buffer keeps its first name: old checkpoints carry it.
        needs_init = hasattr(autoencoder, "init_from_batch") and not init_from
        self.register_buffer("patch_init_pending", torch.tensor(needs_init))

    # ------------------------------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        if self.trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy):
            raise ConfigError("trainer", "FSDP shards the U-Net; the autoencoder (~84M parameters at paper scale) "
                              "trains data-parallel: use trainer=ddp")  # fmt: skip
        precision = str(self.trainer.precision) if self.trainer is not None else ""
        if precision.startswith("16"):
            raise ConfigError("trainer.precision", f"{precision} is not supported here; use bf16-mixed or 32-true")
        resolution = getattr(self.trainer.datamodule if self.trainer is not None else None, "resolution", None)
        if resolution is not None:
            check_resolution(resolution, self.resolution_multiple, "data.resolution",
                             f"the autoencoder's downsampling f={self.resolution_multiple}")  # fmt: skip

    @property
    def resolution_multiple(self) -> int:
        return self.autoencoder.downsample_factor

    def global_batch(self) -> int:
        """Images per optimizer step: the per-rank batch x ranks (manual optimization: no gradient accumulation)."""
        batch = images_per_step(self.trainer) if self.trainer is not None else None
        if batch is None:
            raise ConfigError("model.lr_scaling", "scales the learning rate by the batch, which needs a DataModule "
                              "with a batch_size: use lr_scaling=none to give the rate itself")  # fmt: skip
        return batch

    def learning_rates(self) -> tuple[float, float]:
        """(autoencoder, discriminator) learning rates after ``lr_scaling``."""
        h = self.hparams
        batch = self.global_batch() if h.lr_scaling != "none" else 1
        return scaled_lr(h.lr, h.lr_scaling, batch), scaled_lr(h.disc_lr or h.lr, h.lr_scaling, batch)

    def configure_optimizers(self):
        h = self.hparams
        lr, disc_lr = self.learning_rates()
        if h.lr_scaling != "none":
            rank_zero_info(f"autoencoder learning rate {h.lr:g} scaled ({h.lr_scaling}) to {self.global_batch()} "
                           f"images per step: {lr:.3g}; discriminator {disc_lr:.3g}")  # fmt: skip
        opt_ae = torch.optim.AdamW(
            self.autoencoder.parameters(), lr=lr, betas=tuple(h.betas), weight_decay=h.weight_decay
        )
        opt_d = torch.optim.AdamW(self.loss.discriminator.parameters(), lr=disc_lr, betas=tuple(h.betas))
        warmup = max(1, h.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt_ae, partial(warmup_constant, warmup=warmup))
        return [opt_ae, opt_d], [{"scheduler": sched, "interval": "step"}]

    # --------------------------------------------------------------------------------------- training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        if (picked := good_samples(self, batch)) is None:
            return None  # no good sample (on any rank): skipped (emu.data.batches)
        batch, weight = picked  # weight: this rank's share of the step's good samples (0: a stand-in)
        x = batch["image"]
        opt_ae, opt_d = self.optimizers()
        # global_step counts autoencoder steps only: the discriminator steps its raw optimizer below.
        step = self.global_step
        if bool(self.patch_init_pending):
            self._init_from_first_batch(x)
        posterior = self.autoencoder.encode(x)
        recon = self.autoencoder.decode(posterior.sample())
        last_layer = self.autoencoder.decoder.conv_out.weight
        loss, logs = self.loss.generator_loss(x, recon, posterior, step, last_layer)
        opt_ae.zero_grad(set_to_none=True)
        self.manual_backward(loss * weight if weight != 1.0 else loss)
        if self.hparams.grad_clip:
            self.clip_gradients(opt_ae, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")
        opt_ae.step()
        self.lr_schedulers().step()

        if self.loss.adversarial_active(step):
            d_loss, d_logs = self.loss.discriminator_loss(x, recon)
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss * weight if weight != 1.0 else d_loss)
            if self._gradients_usable(list(self.loss.discriminator.parameters()), "discriminator"):
                if self.hparams.grad_clip:
                    torch.nn.utils.clip_grad_norm_(self.loss.discriminator.parameters(), self.hparams.grad_clip)
                opt_d.optimizer.step()
            logs.update(d_logs)
        bs = x.shape[0]
        self.log("train/loss", logs["total"], prog_bar=True, batch_size=bs)
        self.log_dict({f"train/{k}": v for k, v in logs.items() if k != "total"}, batch_size=bs)
        return loss.detach()

    @torch.no_grad()
    def _init_from_first_batch(self, x: torch.Tensor) -> None:
        """The autoencoder's initialisation from the first batch, its sums over ranks (every rank gets the same)."""
        world = self.trainer is not None and self.trainer.world_size > 1
        reduce_sum = (lambda t: self.trainer.strategy.reduce(t, reduce_op="sum")) if world else (lambda t: t)
        self.autoencoder.init_from_batch(x, reduce_sum)
        self.patch_init_pending.fill_(False)

    def _gradients_usable(self, params: list[torch.nn.Parameter], name: str) -> bool:
        """The run's :class:`~emu.training.numerics.NumericalGuard` decides (the raw discriminator step bypasses
        Lightning's hooks); without one, every step is taken."""
        guard = next((c for c in self.trainer.callbacks if isinstance(c, NumericalGuard)), None)
        return guard is None or guard.check(self.trainer, self, params, name)

    # ------------------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self._stats = LatentStatistics(self.autoencoder.latent_channels)
        self._lpips_sum, self._lpips_n = 0.0, 0

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x = batch["image"]
        posterior = self.autoencoder.encode(x)
        z = posterior.mode()
        recon = self.autoencoder.decode(z).clamp(-1, 1)
        self._stats.update(posterior)
        rec, logs = self.loss.reconstruction(x, recon)
        bs = x.shape[0]
        self.log("val/rec", rec, prog_bar=True, batch_size=bs)
        if "lpips" in logs:
            self._lpips_sum += float(logs["lpips"]) * bs
            self._lpips_n += bs
        x01, r01 = (x.float() + 1) / 2, (recon.float() + 1) / 2
        self.psnr.update(r01, x01)
        self.ssim.update(r01, x01)
        if self.rfid is not None:
            self.rfid.update(x01, real=True)
            self.rfid.update(r01, real=False)
        if batch_idx == 0 and not self.trainer.sanity_checking:
            n = self.hparams.num_logged_images
            grid = image_grid(torch.cat([x[:n], recon[:n]]), nrow=min(n, bs))
            log_image(self.trainer, "val/inputs_over_reconstructions", grid)

    def on_validation_epoch_end(self) -> None:
        self.log("val/psnr", self.psnr.compute(), prog_bar=True)
        self.log("val/ssim", self.ssim.compute())
        self.psnr.reset()
        self.ssim.reset()
        if self._lpips_n:
            self.log("val/lpips", self._lpips_sum / self._lpips_n)
        if self.rfid is not None:
            self.log("val/rfid", self.rfid.compute())
            self.rfid.reset()
        if self._stats is not None and not self.trainer.sanity_checking:
            strategy = self.trainer.strategy
            stats = self._stats.reduced(lambda t: strategy.reduce(t.to(self.device), reduce_op="sum"))
            if stats.count:
                mean, std = stats.compute()
                record = {"of": "posterior samples", "step": self.global_step, "images": stats.images,
                          "split": "val"}  # fmt: skip
                collapsed = self.autoencoder.set_latent_statistics(mean.to(self.device), std.to(self.device), record)
                self.log("val/latent_std_mean", std.mean(), sync_dist=False)
                self.log("val/latent_std_min", std.min(), sync_dist=False)
                self.log("val/latent_collapsed_channels", float(len(collapsed)), sync_dist=False)

    # ------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        write_header(checkpoint, KIND, autoencoder_config=self.autoencoder.config,
                     latent_statistics=self.autoencoder.latent_statistics)  # fmt: skip

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A resumed run keeps the record of its restored statistics (the buffers come back with the weights)."""
        self.autoencoder.latent_statistics = dict(header(checkpoint).get("latent_statistics") or {})

    def on_fit_end(self) -> None:
        record = self.autoencoder.latent_statistics
        if record.get("step") != self.global_step:
            rank_zero_warn(
                f"the latent statistics are from step {record.get('step', 'none: never measured')}, not the final step "
                f"{self.global_step}: validate at the last step, or measure them with python -m emu.autoencoder.stats"
            )
        if self.hparams.export_on_fit_end and self.trainer.is_global_zero and self.trainer.default_root_dir:
            folder = self.autoencoder.save_pretrained(Path(self.trainer.default_root_dir) / "export")
            print(f"  exported autoencoder to {folder}")


def _make_rfid(weights: str):
    from torchmetrics.image.fid import FrechetInceptionDistance

    if not Path(weights).expanduser().is_file():
        raise ConfigError("model.rfid_weights", f"'{weights}' is not a file (Inception weights for FID)")
    return FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=str(weights))


def load_autoencoder(path: str | Path, expect: dict[str, Any] | None = None) -> AutoencoderKL:
    """An :class:`AutoencoderKL` from a stage-0 Lightning checkpoint (``.ckpt``), an export folder, or a public
    autoencoder: a diffusers ``AutoencoderKL`` folder (SD, SDXL, SD3, FLUX.1), a pipeline folder with one in ``vae/``,
    or the hub id of either in the local Hugging Face cache (:func:`~emu.utils.autoencoder_paths.find_autoencoder`),
    converted by :func:`~emu.autoencoder.convert.from_diffusers` with its latent normalisation; ``pixels``: pixel space
    (:class:`~emu.autoencoder.pixel.PixelSpace`, the identity).

    ``expect``: a config the loaded model must match (e.g. the U-Net's latent channels); a mismatch raises
    :class:`ConfigError` naming the key. A checkpoint of another stage raises ``ValueError``.
    """
    kind, path = find_autoencoder(path)
    if kind == PIXELS:
        from emu.autoencoder.pixel import PixelSpace

        model = PixelSpace()
    elif kind == "emu":
        model = AutoencoderKL.from_pretrained(path)
    elif kind == "diffusers":
        model = load_diffusers(path)
    else:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        info = header(ckpt)
        if info.get("kind") != KIND:
            raise ValueError(f"'{path}' is a {info.get('kind', 'non-emu')} checkpoint, not a stage-0 autoencoder")
        model = autoencoder_from_config(info["autoencoder_config"])
        prefix = "autoencoder."
        model.load_state_dict({k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)})
        model.latent_statistics = dict(info.get("latent_statistics") or {})
    for key, value in (expect or {}).items():
        if key in model.config and model.config[key] != value:
            raise ConfigError(
                f"model.autoencoder.{key}",
                f"is {value} but the checkpoint '{path}' has {model.config[key]}; "
                "set it to match or use another checkpoint",
            )
    return model.eval()

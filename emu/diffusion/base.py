"""What the text-to-image modules share (:class:`~emu.diffusion.module.DiffusionModule`, the masked transformer's
:class:`~emu.maskgit.module.MaskGITModule` and its tokenizer's module): the frozen autoencoder's normalised latents,
the trainable text conditioner, AdamW with the scaled rate and schedule, the EMA (updated after every optimizer step,
swapped in for validation) and the validation sample grid.

A subclass builds ``self.autoencoder``, ``self.frozen`` (:class:`~emu.diffusion.frozen.FrozenNetworks`), ``self.ema``
(or None), and where it has text ``self.conditioner``; it names what trains in :meth:`trained_modules`, the image
side's multiple in :attr:`resolution_multiple` / :attr:`downsampling`, and how it samples in ``sample(prompts, seeds)``
(the validation grid uses ``val_prompts``, ``val_seeds`` and ``val_sampling``). Its hyperparameters hold the ones read
here: ``sample_latents``, ``latent_scaling``, ``lr``, ``betas``, ``weight_decay``, ``warmup_steps``, ``lr_schedule``,
``lr_scaling``, ``lr_reference_batch``, ``cooldown_steps``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, ListConfig, OmegaConf

from emu.autoencoder.model import DiagonalGaussian
from emu.data.buckets import check_buckets
from emu.diffusion.precompute import check_precomputed
from emu.diffusion.prompts import read_prompts
from emu.errors import ConfigError
from emu.text.conditioner import TextConditioner
from emu.text.encoders import FrozenTextEncoder
from emu.training.optim import images_per_step, weight_decay_groups
from emu.utils.images import image_grid, log_image
from emu.utils.resolution import check_resolution
from emu.utils.schedules import LR_SCALINGS, scaled_lr, warmup_constant, warmup_constant_cooldown, warmup_cosine


def plain(x):
    """A config node as plain Python containers (what checkpoints keep); anything else as it is."""
    return OmegaConf.to_container(x, resolve=True) if isinstance(x, DictConfig | ListConfig) else x


def build_conditioner(text: dict[str, Any], context_dim: int) -> TextConditioner:
    """A :class:`TextConditioner` from ``{encoders: {name: {name_or_path, kind, max_length, dtype}}, dropout, ...}``."""
    text = dict(text)
    encoders = {name: FrozenTextEncoder(**cfg) for name, cfg in dict(text.pop("encoders")).items()}
    return TextConditioner(encoders, context_dim=context_dim, **text)


def check_schedule(lr_schedule: str, lr_scaling: str, lr_reference_batch: int, cooldown_steps: int) -> None:
    """Refuse learning-rate settings :meth:`TextToImageModule.configure_optimizers` cannot follow, naming the key."""
    if lr_schedule not in ("constant", "cosine"):
        raise ConfigError("model.lr_schedule", f"must be 'constant' or 'cosine', got {lr_schedule!r}")
    if lr_scaling not in LR_SCALINGS or lr_reference_batch < 1:
        raise ConfigError("model.lr_scaling", f"must be one of {list(LR_SCALINGS)} with lr_reference_batch >= 1, "
                          f"got {lr_scaling!r} and {lr_reference_batch}")  # fmt: skip
    if cooldown_steps < 0 or (cooldown_steps and lr_schedule != "constant"):
        raise ConfigError("model.cooldown_steps", f"must be >= 0, and only with lr_schedule=constant (cosine "
                          f"decays already), got {cooldown_steps} with {lr_schedule}")  # fmt: skip


class TextToImageModule(L.LightningModule):
    """The shared parts of emu's text-to-image LightningModules (see the module doc); not trained by itself."""

    train_resolution: int | None = None
    images_per_sample = 1  # images in one training sample (a preference pair: 2), what the EMA and records count
    offloads_frozen = True  # on precomputed data, the frozen networks stay on the CPU (a subclass may need them)

    def trained_modules(self) -> dict[str, torch.nn.Module]:
        """What the optimizer and the EMA see, by name."""
        raise NotImplementedError

    @property
    def resolution_multiple(self) -> int:
        """What every image side must divide by."""
        raise NotImplementedError

    @property
    def downsampling(self) -> str:
        """What :attr:`resolution_multiple` is made of, for error messages."""
        raise NotImplementedError

    def set_validation_prompts(self, prompts: list[str] | str | None, seeds: list[int] | None) -> None:
        """``val_prompts`` (a list, a file or a named set) and their ``val_seeds`` (default ``0..n-1``), checked."""
        self.val_prompts = read_val_prompts(prompts)
        self.val_seeds = list(seeds) if seeds else list(range(len(self.val_prompts)))
        if len(self.val_seeds) != len(self.val_prompts):
            raise ConfigError("model.val_seeds", f"has {len(self.val_seeds)} seeds for {len(self.val_prompts)} prompts")

    def train(self, mode: bool = True):
        super().train(mode)
        self.frozen.eval()
        return self

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        res = getattr(dm, "resolution", None)
        manifest = getattr(getattr(dm, "source", None), "manifest", None)
        if manifest is not None:
            check_precomputed(manifest, self)
            if self.offloads_frozen:
                self.frozen.offload()  # training reads their outputs: the frozen networks stay on the CPU
            named = [*self.named_parameters(), *self.named_buffers()]  # DDP neither syncs them nor sees two devices
            self._ddp_params_and_buffers_to_ignore = [n for n, _ in named if n.startswith(self.frozen.prefixes)]
        if res is not None:
            self.train_resolution = int(res)
            check_resolution(res, self.resolution_multiple, "data.resolution", self.downsampling)
        if getattr(dm, "buckets", None):
            check_buckets(dm.buckets, self.resolution_multiple, self.downsampling)

    def _apply(self, fn, recurse: bool = True):
        """Every move and cast (``.to(device)``, ``.cuda()``, ``.to(dtype)`` ...) runs this: while :attr:`frozen` is
        offloaded (training on precomputed latents and embeddings) it passes the frozen networks by, on the CPU (see
        :mod:`emu.diffusion.frozen`)."""
        frozen = self.__dict__.get("frozen")  # None while __init__ builds the networks
        if recurse and frozen is not None and frozen.offloaded:
            return frozen.apply_around(self, fn)
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.latents_from(self.autoencoder.encode(images.to(self.device)), generator)

    def latents_from(self, posterior: DiagonalGaussian, generator: torch.Generator | None = None) -> torch.Tensor:
        z = posterior.sample(generator) if self.hparams.sample_latents else posterior.mode()
        return self.autoencoder.normalize(z, self.hparams.latent_scaling)

    def batch_latents(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
        """Normalised latents of a batch: from its precomputed posterior moments, else by encoding its images."""
        if "latent" in batch:
            return self.latents_from(DiagonalGaussian(batch["latent"].to(self.device, torch.float32)), generator)
        return self.encode_images(batch["image"], generator)

    def conditioning(self, captions: list[str], drop: bool, embeddings=None,
                     generator: torch.Generator | None = None) -> dict[str, torch.Tensor | None]:  # fmt: skip
        """The network's text inputs, from precomputed frozen-encoder ``embeddings`` when given; ``generator`` draws the
        CFG dropout (default: the global RNG)."""
        c = self.conditioner(embeddings or self.conditioner.encode(list(captions)), drop=drop, generator=generator)
        return {"context": c.context, "context_mask": c.mask, "pooled": c.pooled}

    # -------------------------------------------------------------------------------------- training
    def optimizer_step(self, *args, **kwargs) -> None:
        """The optimizer's step, then the EMA's: both are done before any ``on_train_batch_end`` hook, so a
        checkpoint taken there (ModelCheckpoint, preemption) holds the EMA of the weights it holds."""
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            beta = self.ema.update(self.trained_modules(), self._images_per_step)
            self.log("train/ema_beta", beta, batch_size=1)

    def learning_rate(self) -> float:
        """``lr`` scaled from ``lr_reference_batch`` to the run's global batch (per-rank batch x ranks x
        accumulation), as ``lr_scaling`` says."""
        hp = self.hparams
        if hp.lr_scaling == "none":
            return hp.lr
        batch = images_per_step(self.trainer) if self.trainer is not None else None
        if batch is None:
            raise ConfigError("model.lr_scaling", "scales the rate by the batch, which needs a DataModule with a "
                              "batch_size: use lr_scaling=none to give the rate itself")  # fmt: skip
        lr = scaled_lr(hp.lr, hp.lr_scaling, batch, hp.lr_reference_batch)
        rank_zero_info(f"learning rate {hp.lr:g} at {hp.lr_reference_batch} images per step, scaled ({hp.lr_scaling}) "
                       f"to {batch}: {lr:.3g}")  # fmt: skip
        return lr

    def configure_optimizers(self):
        hp = self.hparams
        groups = weight_decay_groups(self.trained_modules().values(), hp.weight_decay)
        opt = torch.optim.AdamW(
            groups, lr=self.learning_rate(), betas=tuple(hp.betas), fused=self.device.type == "cuda"
        )
        total = lambda: max(1, self.trainer.estimated_stepping_batches) if self.trainer is not None else 1
        if hp.lr_schedule == "cosine":
            fn = partial(warmup_cosine, warmup=hp.warmup_steps, total=total())
        elif hp.cooldown_steps:
            fn = partial(warmup_constant_cooldown, warmup=hp.warmup_steps, total=total(), cooldown=hp.cooldown_steps)
        else:
            fn = partial(warmup_constant, warmup=hp.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, fn)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -------------------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        if self.ema is not None:
            self._ema_ctx = self.ema.swapped(self.trained_modules())
            self._ema_ctx.__enter__()

    def on_validation_epoch_end(self) -> None:
        swapped = self.ema is not None
        try:
            if self.val_prompts and not self.trainer.sanity_checking:
                if swapped and not self.val_sampling.ema:  # model.val_sampling.ema=false: sample the raw weights
                    self._ema_ctx.__exit__(None, None, None)
                    swapped = False
                images = self.sample(self.val_prompts, self.val_seeds)  # on every rank: sharded weights need all
                if self.trainer.is_global_zero:
                    caption = " | ".join(self.val_prompts)
                    log_image(self.trainer, "val/samples", image_grid(images, nrow=min(8, len(images))), caption)
        finally:
            if swapped:
                self._ema_ctx.__exit__(None, None, None)


def read_val_prompts(prompts: list[str] | str | None) -> list[str]:
    """``model.val_prompts``: a list, a text file or a named set (none: no validation grid)."""
    if prompts is None:
        return []
    if isinstance(prompts, str):
        return read_prompts(prompts, "model.val_prompts")
    return [str(p) for p in prompts]

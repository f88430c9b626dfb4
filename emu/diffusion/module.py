"""Stage 1 LightningModule: text-to-image latent diffusion on a frozen autoencoder's normalised latents.

Images are encoded by the stage-0 autoencoder (frozen, no grad) and normalised per channel with its stored
statistics; captions go through the frozen text encoders and the trainable projections of the conditioner
(with classifier-free-guidance dropout). The loss is the denoiser's weighted MSE at noise levels drawn from the
training distribution, with the configured noise offset. An EMA of the U-Net and projections (half-life in
images) is kept in the checkpoint and used for validation and sampling. Validation reports the loss at fixed
noise and samples a fixed set of prompts with fixed seeds into a logged grid.

The frozen networks and where they live: :mod:`emu.diffusion.frozen`; what checkpoints hold and how they load again
(:func:`~emu.diffusion.checkpoints.load_diffusion`, :func:`~emu.diffusion.checkpoints.load_for_sampling`):
:mod:`emu.diffusion.checkpoints`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from emu.autoencoder.model import LATENT_SCALINGS
from emu.autoencoder.module import load_autoencoder
from emu.data.batches import trains_on_good_samples
from emu.data.samples import size_conditions
from emu.diffusion.base import TextToImageModule, build_conditioner, check_schedule, plain, read_val_prompts
from emu.diffusion.checkpoints import on_load, on_save, read_init_weights
from emu.diffusion.convert import read_unet_kwargs
from emu.diffusion.denoiser import CONTINUOUS, Denoiser, weighting_problem
from emu.diffusion.ema import EMA, WeightCopy
from emu.diffusion.frozen import FrozenNetworks
from emu.diffusion.lora import adapters_off, add_lora, base_fingerprint, lora_settings, merged_copy
from emu.diffusion.networks import SHARDED_BLOCKS, build_network
from emu.diffusion.noise import DiscreteSchedule, offset_noise, scaled_linear_alphas_cumprod
from emu.diffusion.pipeline import TOKEN_DECODERS, SamplingSettings, generate
from emu.diffusion.preference import dpo_logits, dpo_loss, kto_loss, kto_reference_point, preference_settings
from emu.diffusion.sampling import SAMPLERS
from emu.diffusion.unet import takes_size_cond
from emu.errors import ConfigError
from emu.training.distributed import FSDPStrategy, shard_modules
from emu.training.optim import images_per_step
from emu.utils.checkpoint_header import diffusers_unet_folder


class DiffusionModule(TextToImageModule):
    """Trains a denoising network (the U-Net of :mod:`emu.diffusion.unet`, or the DiT of :mod:`emu.diffusion.dit`) as a
    k-diffusion-style denoiser.

    Args:
        unet: the denoising network's keyword arguments: :class:`~emu.diffusion.unet.UNet`'s, or with ``arch: dit``
            :class:`~emu.diffusion.dit.DiT`'s (:mod:`emu.diffusion.networks`); or a diffusers U-Net folder or pipeline
            folder with ``unet/`` (SDXL-base's) whose ``config.json`` gives them
            (:func:`~emu.diffusion.convert.read_unet_kwargs`).
        text: the conditioner: ``encoders`` (name -> FrozenTextEncoder kwargs), ``dropout``, ``uncond``,
            ``pooled_from``.
        autoencoder: the stage-0 checkpoint or export folder (frozen), or a public autoencoder: a diffusers
            ``AutoencoderKL`` folder (SD3's, FLUX.1's, ...), a pipeline folder with one in ``vae/``, or a cached hub id
            (:func:`~emu.autoencoder.module.load_autoencoder`).
        parameterization: ``eps``, ``v``, ``edm`` or ``flow`` (rectified flow: set ``p_mean=0 p_std=1`` for SD3's
            logit-normal ``t``); noise_schedule: the discrete DDPM schedule (``steps``,
            ``beta_start``, ``beta_end``, ``zero_terminal_snr``) for eps / v; weighting: ``simple`` (weight 1
            on the network's own target: SNR in x0 space for eps, SNR + 1 for v; was ``uniform``), ``min_snr`` or
            ``edm`` (see :mod:`emu.diffusion.denoiser`); sigma_data, min_snr_gamma, p_mean, p_std: see
            :class:`Denoiser`.
        noise_offset: per-sample, per-channel noise offset (0.02 late in pre-training, 0.1 in quality-tuning).
        sample_latents: draw latents from the autoencoder's posterior (else its mode).
        latent_scaling: ``channel`` (unit std per latent channel, EDM2) or ``global`` (one scale for all channels,
            as SD's scale factor: a channel keeps its share of the energy, so the diffusion loss and the noise weigh
            the autoencoder's coarse channels above its fine ones), or ``factor`` (a public autoencoder's own
            ``(z - shift_factor) * scaling_factor``, bit for bit as diffusers' SD3 and FLUX.1 pipelines apply it).
        lr, betas, weight_decay, warmup_steps, lr_schedule: AdamW; ``constant`` or ``cosine`` after warm-up; weight
            decay on weight matrices and kernels only, not on biases, norms and embeddings
            (:func:`~emu.training.optim.weight_decay_groups`).
        lr_scaling, lr_reference_batch: ``lr`` is the rate at ``lr_reference_batch`` images per step, scaled to the
            run's global batch by ``none`` / ``linear`` / ``sqrt`` (:func:`~emu.utils.schedules.scaled_lr`): the
            progressive-resolution stages shrink the batch 16x and their rate with it.
        cooldown_steps: with ``lr_schedule=constant``, a linear cooldown to 0 over the run's last steps.
        ema_half_life_images, ema_ramp: the EMA (see :mod:`emu.diffusion.ema`); 0 disables it.
        val_prompts / val_seeds: the fixed prompts sampled at every validation (a list, or a text file).
        val_sampling: how they are sampled: :class:`~emu.diffusion.pipeline.SamplingSettings` fields (the
            ``sampling`` config group).
        init_from: a diffusion checkpoint whose EMA (else raw) weights initialise this model (stage 2), or a diffusers
            U-Net or pipeline folder whose U-Net does (converted; e.g. SDXL-base with ``unet.addition_time_embed_dim``).
        channels_last: keep the U-Net's weights and inputs in channels-last memory format (faster convolutions on
            GPUs with tensor cores); under FSDP only the inputs (FSDP2 shards contiguous parameters only), which
            still makes the convolutions' outputs channels-last.
        compile: ``torch.compile`` the U-Net (after sharding, under FSDP).
        size_cond_dropout: with ``unet.size_conditioning`` or ``unet.addition_time_embed_dim`` (SDXL's ``text_time``),
            how often a training sample's size and crop conditioning is zeroed.
        lora: LoRA adapters on the U-Net (:mod:`emu.diffusion.lora`: ``rank``, ``alpha``, ``targets``, ``dropout``),
            added after ``init_from`` is loaded: only they train (the text projections freeze too), the EMA averages
            them alone, and checkpoints hold them (the base is ``init_from``, read again when they load). None or rank
            0: full fine-tuning.
        gradient_checkpointing: recompute the U-Net's blocks' activations in the backward pass (as
            ``unet.gradient_checkpointing``, for a ``model.unet`` given as a diffusers folder; under FSDP the strategy's
            ``activation_checkpointing`` does it).
        objective: ``sft``: the denoising loss on the data (pre-training, Emu's quality-tuning); ``dpo``:
            Diffusion-DPO on preference pairs (``image`` preferred to ``image_l``: :class:`~emu.data.pairs.PairSource`);
            ``kto``: Diffusion-KTO on images labelled desirable or not (``meta["label"]``). Both compare with a frozen
            reference, the weights ``init_from`` gave (under LoRA: the base with the adapters bypassed); see
            :mod:`emu.diffusion.preference`.
        preference: the preference objectives' settings: ``beta`` (the reward scale; the paper's 5000), and KTO's
            ``desirable_weight`` / ``undesirable_weight`` (lambda_D / lambda_U).
    """

    def __init__(
        self,
        unet: dict[str, Any] | str,
        text: dict[str, Any],
        autoencoder: str,
        parameterization: str = "eps",
        noise_schedule: dict[str, Any] | None = None,
        weighting: str = "simple",
        sigma_data: float = 1.0,
        min_snr_gamma: float = 5.0,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        noise_offset: float = 0.0,
        sample_latents: bool = True,
        latent_scaling: str = "channel",
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.01,
        warmup_steps: int = 1000,
        lr_schedule: str = "constant",
        lr_scaling: str = "none",
        lr_reference_batch: int = 1,
        cooldown_steps: int = 0,
        ema_half_life_images: float = 500_000,
        ema_ramp: float | None = 0.05,
        val_prompts: list[str] | str | None = None,
        val_seeds: list[int] | None = None,
        val_sampling: dict[str, Any] | None = None,
        init_from: str | None = None,
        channels_last: bool = False,
        compile: bool = False,
        size_cond_dropout: float = 0.1,
        lora: dict[str, Any] | None = None,
        gradient_checkpointing: bool = False,
        objective: str = "sft",
        preference: dict[str, float] | None = None,
    ):
        super().__init__()
        unet, text, noise_schedule = plain(unet), plain(text), plain(noise_schedule) or {}  # plain containers
        if isinstance(unet, str):  # a diffusers U-Net folder: its config, as kwargs (the checkpoint keeps those)
            unet = read_unet_kwargs(unet)
        val_prompts, val_seeds, betas = plain(val_prompts), plain(val_seeds), tuple(plain(betas))  # in checkpoints
        if isinstance(val_prompts, str):  # a file or a named set: the checkpoint keeps the prompts, not where they were
            val_prompts = read_val_prompts(val_prompts)
        val_sampling = SamplingSettings.from_config(plain(val_sampling), "model.val_sampling").as_dict()
        if val_sampling["sampler"] in TOKEN_DECODERS:
            raise ConfigError("model.val_sampling.sampler", f"is {val_sampling['sampler']!r}, a masked token model's "
                              f"decoding; a diffusion model samples with one of {list(SAMPLERS)}")  # fmt: skip
        lora = lora_settings(plain(lora))  # completed (alpha, targets) in checkpoints
        preference = preference_settings(objective, plain(preference))  # completed in checkpoints
        if lora and not init_from:
            raise ConfigError("model.lora", "trains adapters over a base model: set model.init_from (an emu checkpoint "
                              "or export, or a diffusers U-Net or pipeline folder such as SDXL-base)")  # fmt: skip
        if lora:  # the base is read again wherever the adapters load: by absolute path
            init_from = str(Path(init_from).expanduser().absolute())
        self.save_hyperparameters()
        check_schedule(lr_schedule, lr_scaling, lr_reference_batch, cooldown_steps)
        if weighting_problem(weighting):  # before any network is built (an old config's "uniform" says its new name)
            raise ConfigError("model.weighting", weighting_problem(weighting))
        if latent_scaling not in LATENT_SCALINGS:
            raise ConfigError("model.latent_scaling", f"must be one of {LATENT_SCALINGS}, got {latent_scaling!r}")
        if noise_schedule.get("zero_terminal_snr") and parameterization == "eps":
            raise ConfigError("model.noise_schedule.zero_terminal_snr", "needs v- or edm-parameterization (eps is "
                              "undefined at SNR 0); set model.parameterization=v")  # fmt: skip

        self.unet = build_network(unet)  # the U-Net or, with arch=dit, the DiT (the name is the checkpoints')
        self.conditioner = build_conditioner(text, context_dim=self.unet.config["context_dim"])
        if self.unet.config["pooled_dim"] != self.conditioner.pooled_dim:
            raise ConfigError(
                "model.unet.pooled_dim",
                f"is {self.unet.config['pooled_dim']} but the conditioner's pooled embedding "
                f"({text.get('pooled_from', 'clip')}) has {self.conditioner.pooled_dim}",
            )
        self.autoencoder = load_autoencoder(autoencoder, expect={"latent_channels": self.unet.config["in_channels"]})
        if latent_scaling == "factor" and self.autoencoder.latent_factors() is None:
            raise ConfigError("model.latent_scaling", f"factor needs an autoencoder with diffusers' shift_factor / "
                              f"scaling_factor (a public one converted from diffusers); '{autoencoder}' has "
                              "per-channel statistics: use channel or global")  # fmt: skip
        # a plain attribute, not a submodule: the frozen networks stay registered where they are, keys and all
        encoders = {f"conditioner.encoders.{name}": encoder for name, encoder in self.conditioner.encoders.items()}
        self.frozen = FrozenNetworks({"autoencoder": self.autoencoder, **encoders})
        # registered here (moves with the module); the denoiser only refers to it
        self.noise_schedule = None if parameterization in CONTINUOUS else DiscreteSchedule(
            scaled_linear_alphas_cumprod(**noise_schedule))  # fmt: skip
        self.denoiser = Denoiser(self.unet, parameterization, self.noise_schedule, sigma_data, weighting, min_snr_gamma,
                                 p_mean, p_std)  # fmt: skip
        self.val_sampling = SamplingSettings(**val_sampling)
        self.ema: EMA | None = None
        self.set_validation_prompts(val_prompts, val_seeds)
        self.train_resolution: int | None = None  # set from the datamodule at setup; stored in checkpoints
        self.trained_steps: int | None = None  # set when loaded (load_diffusion)
        self.exported_weights: str | None = None  # "ema" / "raw" when loaded from an export folder
        self.trained_on: dict[str, Any] | None = None  # the data's description, when loaded (model cards)
        self.sampled_weights: str | None = None  # "ema" / "raw": what load_for_sampling put in place
        object.__setattr__(self, "adapters", None)  # a view, not a submodule (its weights are the U-Net's)
        self.base_fingerprint: str | None = None  # with lora: the base's (lora.base_fingerprint)
        if init_from:
            self.initialise_from(init_from)
        if lora:
            if diffusers_unet_folder(init_from) and len(self.conditioner.proj):
                raise ConfigError("model.lora", f"'{init_from}' gives a U-Net only: this model's text projections "
                                  "would stay random and frozen under LoRA (text.join=sequence); start from an emu "
                                  "checkpoint, or use SDXL's join (model=sdxl)")  # fmt: skip
            base = {**{f"unet.{k}": v for k, v in self.unet.state_dict().items()},
                    **{f"conditioner.proj.{k}": v for k, v in self.conditioner.proj.state_dict().items()}}  # fmt: skip
            self.base_fingerprint = base_fingerprint(base)
            object.__setattr__(self, "adapters", add_lora(self.unet, lora))
            self.conditioner.proj.requires_grad_(False)
        # the preference objectives' reference: the weights init_from gave (LoRA: the base, adapters bypassed); not in
        # single-file checkpoints (init_from gives it again; a sharded FSDP checkpoint holds every key of the model),
        # nor built where init_from is not read (loaded for sampling)
        self.reference = None
        if objective != "sft" and init_from and not lora:
            self.reference = WeightCopy(self.trained_modules())
        if ema_half_life_images > 0:
            self.ema = EMA(self.trained_modules(), ema_half_life_images, ema_ramp)

    # ------------------------------------------------------------------------------------------ parts
    def trained_modules(self) -> dict[str, torch.nn.Module]:
        """What the optimizer and the EMA see: the U-Net and the text projections, or with ``lora`` the adapters."""
        if self.adapters is not None:
            return {"lora": self.adapters}
        return {"unet": self.unet, "text_proj": self.conditioner.proj}

    def configure_model(self) -> None:
        """Under :class:`~emu.training.distributed.FSDPStrategy`: shard the network (the U-Net's ResNet and transformer
        blocks, or the DiT's blocks, as units: :data:`~emu.diffusion.networks.SHARDED_BLOCKS`), the text projections
        and the EMA's copies of both; the frozen networks stay replicated."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        sharded = isinstance(strategy, FSDPStrategy)
        if self.hparams.channels_last and not sharded:  # FSDP2 refuses non-contiguous parameters
            self.unet.to(memory_format=torch.channels_last)
        if sharded and self.adapters is not None:
            raise ConfigError(
                "model.lora",
                "trains under DDP (trainer=ddp), not FSDP: the base is frozen and the "
                "adapters are small, so every GPU holds a whole copy (SDXL's U-Net: ~10 GB in float32)",
            )
        if self.hparams.get("gradient_checkpointing"):
            self.unet.set_gradient_checkpointing(True)
        if sharded and self.reference is not None and not strategy.reshard_after_forward:
            raise ConfigError(
                "trainer.strategy.reshard_after_forward",
                f"is false, but model.objective={self.hparams.objective} swaps its reference's weights in for one "
                "pass a step: gathered weights kept after that pass would be the reference's in the model's own pass; "
                "keep it true (or train LoRA adapters, whose reference is their base)",
            )
        if sharded:
            if strategy.activation_checkpointing:
                self.unet.set_gradient_checkpointing(True)
            parts = [self.unet, *self.conditioner.proj.values()]  # the projections run one by one: each is a unit
            for copy in (self.ema, self.reference):
                if copy is not None:
                    parts += [copy.shadow["unet"], *copy.shadow["text_proj"].values()]
            shard_modules(parts, wrap=SHARDED_BLOCKS, strategy=strategy)
        if self.hparams.compile and not getattr(self, "_compiled", False):
            self.unet.compile()  # in place: parameter names (and checkpoints) stay as they are
            self._compiled = True

    @property
    def images_per_sample(self) -> int:
        """A DPO sample is a pair: two images (the EMA's half-life and selection's records count images)."""
        return 2 if self.hparams.get("objective") == "dpo" else 1

    @property
    def resolution_multiple(self) -> int:
        return self.autoencoder.downsample_factor * self.unet.downsample_factor

    @property
    def downsampling(self) -> str:
        """What :attr:`resolution_multiple` is made of, for error messages."""
        net = "DiT patch" if self.unet.config.get("arch") == "dit" else "U-Net"
        return f"autoencoder f={self.autoencoder.downsample_factor} x {net} {self.unet.downsample_factor}x"

    def size_condition(self, metas: list[dict[str, Any]], drop: bool, generator: torch.Generator | None = None):
        """The batch's size and crop conditioning (B x 6); with ``drop``, each sample's is zeroed with probability
        ``size_cond_dropout`` (so that the model also learns without it)."""
        size = size_conditions(metas)
        p = self.hparams.size_cond_dropout
        if drop and p > 0:
            keep = torch.rand(len(size), generator=generator) >= p
            size = size * keep[:, None]
        return size.to(self.device)

    # ------------------------------------------------------------------------------------------ training
    def diffusion_loss(self, batch: dict[str, Any], generator: torch.Generator | None = None, drop: bool = True):
        """The objective's loss on ``batch`` (``model.objective``: :meth:`objective_terms`)."""
        return self.objective_terms(batch, generator, drop)["loss"]

    def objective_terms(self, batch: dict[str, Any], generator: torch.Generator | None = None,
                        drop: bool = True) -> dict[str, torch.Tensor]:  # fmt: skip
        """``{"loss": ...}`` and what else the objective logs: the denoising loss (``sft``), or a preference
        objective's (:meth:`preference_terms`)."""
        if self.hparams.get("objective", "sft") != "sft":
            return self.preference_terms(batch, generator, drop)
        z = self.batch_latents(batch, generator)
        if self.hparams.channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        cond = self.conditioning(batch["caption"], drop=drop, embeddings=batch.get("text"))
        if takes_size_cond(self.unet.config):
            cond["size_cond"] = self.size_condition(batch["meta"], drop, generator)
        noise = offset_noise(z, self.hparams.noise_offset, generator)
        sigma = self.denoiser.sample_sigmas(z.shape[0], generator).to(self.device)
        return {"loss": self.denoiser.loss(z, noise, sigma, **cond).mean()}

    @contextmanager
    def reference_weights(self) -> Iterator[None]:
        """A context in which the network is the preference objectives' frozen reference, in eval mode (no dropout,
        as a frozen copy would run): the weights ``init_from`` gave (swapped in), or under LoRA the base with its
        adapters bypassed. The trained modules' weights and modes come back after it."""
        if self.adapters is None and self.reference is None:
            raise self._no_reference()
        modules = [self.unet, self.conditioner.proj]
        modes = [m.training for m in modules]
        weights = adapters_off(self.unet) if self.adapters is not None else self.reference.swapped(
            self.trained_modules())  # fmt: skip
        try:
            with weights:
                for m in modules:
                    m.train(False)
                yield
        finally:
            for m, mode in zip(modules, modes, strict=True):
                m.train(mode)

    def preference_terms(self, batch: dict[str, Any], generator: torch.Generator | None = None,
                         drop: bool = True) -> dict[str, torch.Tensor]:  # fmt: skip
        """Diffusion-DPO on a batch of pairs (``image`` preferred over ``image_l``, one caption each) or Diffusion-KTO
        on labelled images (``meta["label"]``): the per-sample denoising errors of the model and of its reference
        (:meth:`reference_weights`) on the same noisy latents, with the same CFG drops (a pair shares its noise,
        noise level and text), into :mod:`emu.diffusion.preference`'s loss."""
        hp, pairs = self.hparams, self.hparams.objective == "dpo"
        if "latent" in batch:
            raise ConfigError("model.objective", f"{hp.objective} encodes its images itself: train on images (data="
                              f"{'pairs' if pairs else 'folder'}), not precomputed latents")  # fmt: skip
        if pairs and "image_l" not in batch:
            raise ConfigError("model.objective", "dpo trains on preference pairs: data=pairs (a folder of pairs.jsonl, "
                              "Pick-a-Pic's columns: caption, jpg_0, jpg_1, label_0)")  # fmt: skip
        n = len(batch["caption"])
        z = self.encode_images(batch["image"], generator)
        if pairs:
            z = torch.cat([z, self.encode_images(batch["image_l"], generator)])
        if hp.channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        embeddings = batch.get("text") or self.conditioner.encode(list(batch["caption"]))
        drop_seed = int(torch.randint(2**62, (), generator=generator))  # the same CFG drops for model and reference
        size = self.size_condition(batch["meta"], drop, generator) if takes_size_cond(self.unet.config) else None
        noise = offset_noise(z[:n], hp.noise_offset, generator)
        sigma = self.denoiser.sample_sigmas(n, generator).to(self.device)
        twice = (lambda t: None if t is None else torch.cat([t, t])) if pairs else (lambda t: t)
        noise, sigma, size = twice(noise), twice(sigma), twice(size)

        def errors() -> torch.Tensor:
            cond = self.conditioning([], drop=drop, embeddings=embeddings,
                                     generator=torch.Generator().manual_seed(drop_seed))  # fmt: skip
            if size is not None:
                cond["size_cond"] = size
            return self.denoiser.loss(z, noise, sigma, **{k: twice(v) for k, v in cond.items()})

        with torch.no_grad(), self.reference_weights():
            ref = errors()
        err = errors()
        beta = hp.preference["beta"]
        if pairs:
            logits = dpo_logits(err[:n], err[n:], ref[:n], ref[n:], beta)
            return {"loss": dpo_loss(err[:n], err[n:], ref[:n], ref[n:], beta).mean(),
                    "accuracy": (logits > 0).float().mean(), "logits": logits.mean().detach()}  # fmt: skip
        desirable = torch.tensor([_label(meta) for meta in batch["meta"]], device=err.device)
        z0 = kto_reference_point(err, ref)
        loss = kto_loss(err, ref, desirable, beta, z0, hp.preference["desirable_weight"],
                        hp.preference["undesirable_weight"])  # fmt: skip
        return {"loss": loss.mean(), "reference_point": z0, "desirable": desirable.float().mean()}

    def setup(self, stage: str) -> None:
        super().setup(stage)
        preference = self.hparams.get("objective", "sft") != "sft"
        if stage == "fit" and preference and self.adapters is None and self.reference is None:
            raise self._no_reference()  # now, not at the first step

    def _no_reference(self) -> ConfigError:
        return ConfigError("model.init_from", f"model.objective={self.hparams.objective} compares the model with a "
                           "frozen reference, the weights model.init_from gives: set it (stage 1's "
                           "checkpoint)")  # fmt: skip

    @trains_on_good_samples  # a batch with no good sample is skipped (emu.data.batches)
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        terms = self.objective_terms(batch)
        loss = terms.pop("loss")
        bs = len(batch["caption"])
        self._images_per_step = images_per_step(self.trainer, bs) * self.images_per_sample  # the EMA counts images
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for name, value in terms.items():  # a preference objective's accuracy, reference point ...
            self.log(f"train/{name}", value, batch_size=bs)
        return loss

    # ------------------------------------------------------------------------------------------ validation
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        g = torch.Generator().manual_seed(10_000 + batch_idx)  # the same noise every validation
        terms = self.objective_terms(batch, generator=g, drop=False)
        bs = len(batch["caption"])
        self.log("val/loss", terms.pop("loss"), prog_bar=True, batch_size=bs, sync_dist=True)
        for name, value in terms.items():
            self.log(f"val/{name}", value, batch_size=bs, sync_dist=True)

    def sample(self, prompts: list[str], seeds: list[int], settings: SamplingSettings | None = None,
               **kw) -> torch.Tensor:  # fmt: skip
        """Images for ``prompts`` with ``seeds`` through the weights as they are now, with ``settings`` (default:
        ``model.val_sampling``); their size (``settings.image_size``) defaults to the data's resolution, then the
        checkpoint's training one.
        ``kw`` goes to :func:`~emu.diffusion.pipeline.generate` (e.g. ``autocast_dtype``, ``progress``)."""
        settings = settings or self.val_sampling
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        height, width = settings.image_size(getattr(dm, "resolution", None) or self.train_resolution or 64)
        kw = {**settings.generate_kwargs(), "progress": False, "latent_scaling": self.hparams.latent_scaling,
              "negative_prompts": [settings.negative_prompt] * len(prompts), **kw}  # fmt: skip
        with self.frozen.on(self.device):  # (offloaded ones visit the device)
            return generate(self.denoiser, self.conditioner, self.autoencoder, prompts, seeds, height, width, **kw)

    # ------------------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        on_save(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        on_load(self, checkpoint)

    def initialise_from(self, path: str) -> None:
        """Weights (EMA where present) from a diffusion checkpoint, one file or a sharded (FSDP) checkpoint folder,
        from which only the EMA (else the trained weights) is read: initialisation, not resume."""
        parts = self.trained_modules()
        for name, weights in read_init_weights(path, parts).items():
            try:
                parts[name].load_state_dict(weights)
            except RuntimeError as e:
                raise ConfigError(
                    "model.init_from",
                    f"the {name} weights of '{path}' do not fit this model's (set "
                    f"model.unet to the checkpoint's U-Net): {str(e).splitlines()[-1].strip()}",
                ) from e
        if self.ema is not None:  # (in __init__ it is made after this)
            self.ema = EMA(self.trained_modules(), self.hparams.ema_half_life_images, self.hparams.ema_ramp)

    def merge_lora(self) -> None:
        """Add the adapters into the U-Net's weights (their EMA, where it was copied in first, e.g. by
        :func:`~emu.diffusion.checkpoints.load_for_sampling`): a plain model with the base's keys, one set of weights
        (no EMA), no LoRA. What the exports of a LoRA model hold."""
        if self.adapters is None:
            return
        self.unet = merged_copy(self.unet)
        self.denoiser.net = self.unet
        object.__setattr__(self, "adapters", None)
        self.base_fingerprint = None
        self.conditioner.proj.requires_grad_(True)
        self.ema = None
        self.hparams["lora"] = None


def _label(meta: dict[str, Any]) -> bool:
    """A KTO sample's label from its metadata: ``label`` true (desirable) or false, or 1 / 0."""
    label = meta.get("label")
    if isinstance(label, bool) or label in (0, 1):
        return bool(label)
    raise ConfigError("model.objective", f"kto needs every image labelled: a 'label' of true (desirable) or false in "
                      f"its metadata.jsonl row, got {label!r}")  # fmt: skip

"""The masked generative transformer's LightningModule (MaskGIT / Muse): text-to-image over FSQ tokens.

Beside :class:`~emu.diffusion.module.DiffusionModule`, and built from the same parts
(:class:`~emu.diffusion.base.TextToImageModule`): the frozen autoencoder's normalised latents (precomputed ones
included), the conditioner with its CFG dropout, AdamW, the EMA, the validation grid, checkpointing and resume. The
latents become tokens through a frozen :class:`~emu.maskgit.tokenizer.LatentTokenizer` (``tokenizer``: its
checkpoint); each image masks ``ceil(cos(pi r / 2) N)`` of its ``N`` tokens for ``r ~ U(0, 1)``
(:func:`~emu.maskgit.schedule.training_mask`) and the transformer
(:class:`~emu.maskgit.transformer.MaskedTokenTransformer`) learns the masked ones by cross-entropy. Sampling is
MaskGIT's iterative parallel decoding with classifier-free guidance (:func:`~emu.maskgit.decoding.decode`;
``sampling.sampler=maskgit``, ``steps``, ``guidance``), then the tokenizer's and the autoencoder's decoders.

Checkpoints have ``kind: maskgit`` and hold the transformer, the text projections and the EMA; the autoencoder, the
text encoders and the tokenizer are referenced by path. :func:`load_maskgit` reads them;
:func:`load_text_to_image` loads either kind of text-to-image checkpoint for sampling (``sample.py``, ``eval.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from emu.autoencoder.module import load_autoencoder
from emu.data.batches import trains_on_good_samples
from emu.diffusion.base import TextToImageModule, build_conditioner, check_schedule, plain, read_val_prompts
from emu.diffusion.checkpoints import load_for_sampling
from emu.diffusion.ema import EMA
from emu.diffusion.frozen import FrozenNetworks
from emu.diffusion.networks import SHARDED_BLOCKS
from emu.diffusion.pipeline import TOKEN_DECODERS, SamplingSettings, negative_conditioning
from emu.diffusion.precompute import fingerprint
from emu.errors import ConfigError
from emu.maskgit.decoding import decode
from emu.maskgit.schedule import training_mask
from emu.maskgit.tokenizer import load_tokenizer
from emu.maskgit.transformer import MaskedTokenTransformer
from emu.training.distributed import FSDPStrategy, shard_modules
from emu.training.optim import images_per_step
from emu.utils.checkpoint_header import header, is_sharded_checkpoint, read_header, write_header

KIND = "maskgit"
DEFAULT_SAMPLING = {"sampler": "maskgit", "steps": 12, "guidance": 2.0}


def masked_cross_entropy(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                         label_smoothing: float = 0.0) -> torch.Tensor:  # fmt: skip
    """The mean cross-entropy of ``logits`` (B x N x K) against ``tokens`` (B x N) over the masked positions only
    (``mask`` True), with ``label_smoothing`` (MaskGIT's 0.1)."""
    return F.cross_entropy(logits[mask].float(), tokens[mask], label_smoothing=label_smoothing)


class MaskGITModule(TextToImageModule):
    """Trains a masked token transformer on a frozen tokenizer's tokens of the autoencoder's latents.

    Args:
        transformer: :class:`~emu.maskgit.transformer.MaskedTokenTransformer`'s keyword arguments (its
            ``codebook_size`` is the tokenizer's).
        text: the conditioner, as the diffusion model's (``encoders``, ``dropout`` for classifier-free guidance, ...).
        autoencoder: the stage-0 checkpoint or export folder the tokenizer was trained on (checked by fingerprint).
        tokenizer: a ``kind: tokenizer`` checkpoint (:mod:`emu.maskgit.tokenizer`).
        latent_scaling: None: the tokenizer's (another value is refused: its tokens mean that normalisation).
        sample_latents: tokenize a draw from the posterior (else its mode).
        label_smoothing: of the masked tokens' cross-entropy.
        lr, betas, weight_decay, warmup_steps, lr_schedule, lr_scaling, lr_reference_batch, cooldown_steps,
            ema_half_life_images, ema_ramp, val_prompts, val_seeds: as the diffusion model's.
        val_sampling: how the validation grid samples (:class:`~emu.diffusion.pipeline.SamplingSettings`, sampler
            ``maskgit``: ``steps`` decoding steps, ``guidance``).
        temperature, choice_temperature: the decoding's token temperature and MaskGIT's annealed choice temperature.
        init_from: a ``kind: maskgit`` checkpoint whose EMA (else raw) weights initialise this model (stage 2).
        compile: ``torch.compile`` the transformer (after sharding, under FSDP).
    """

    def __init__(
        self,
        transformer: dict[str, Any],
        text: dict[str, Any],
        autoencoder: str,
        tokenizer: str,
        latent_scaling: str | None = None,
        sample_latents: bool = False,
        label_smoothing: float = 0.1,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.96),
        weight_decay: float = 0.045,
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
        temperature: float = 1.0,
        choice_temperature: float = 4.5,
        init_from: str | None = None,
        compile: bool = False,
    ):
        super().__init__()
        transformer, text, betas = plain(transformer), plain(text), tuple(plain(betas))
        val_prompts, val_seeds = plain(val_prompts), plain(val_seeds)
        if isinstance(val_prompts, str):  # the checkpoint keeps the prompts, not where they were
            val_prompts = read_val_prompts(val_prompts)
        val_sampling = SamplingSettings.from_config({**DEFAULT_SAMPLING, **(plain(val_sampling) or {})},
                                                    "model.val_sampling")  # fmt: skip
        check_decoder(val_sampling, "model.val_sampling.sampler")
        tok, info = load_tokenizer(tokenizer)
        if latent_scaling not in (None, info["latent_scaling"]):
            raise ConfigError("model.latent_scaling", f"is {latent_scaling!r} but the tokenizer's tokens are of "
                              f"{info['latent_scaling']!r}-normalised latents: leave it unset")  # fmt: skip
        latent_scaling = info["latent_scaling"]
        val_sampling = val_sampling.as_dict()
        self.save_hyperparameters()
        check_schedule(lr_schedule, lr_scaling, lr_reference_batch, cooldown_steps)
        self.autoencoder = load_autoencoder(autoencoder)
        if fingerprint(self.autoencoder) != info.get("autoencoder_fingerprint"):
            raise ConfigError("model.tokenizer", f"'{tokenizer}' was trained on the latents of "
                              f"'{info.get('autoencoder')}', whose weights differ from model.autoencoder="
                              f"'{autoencoder}'")  # fmt: skip
        self.tokenizer = tok  # frozen; checkpoints leave it out (hparams.tokenizer names it)
        self.transformer = MaskedTokenTransformer(codebook_size=tok.codebook_size, **transformer)
        self.conditioner = build_conditioner(text, context_dim=self.transformer.config["context_dim"])
        if self.transformer.config["pooled_dim"] not in (None, self.conditioner.pooled_dim):
            raise ConfigError("model.transformer.pooled_dim", f"is {self.transformer.config['pooled_dim']} but the "
                              f"conditioner's pooled embedding has {self.conditioner.pooled_dim}")  # fmt: skip
        encoders = {f"conditioner.encoders.{name}": encoder for name, encoder in self.conditioner.encoders.items()}
        self.frozen = FrozenNetworks({"autoencoder": self.autoencoder, **encoders})
        self.val_sampling = SamplingSettings(**val_sampling)
        self.set_validation_prompts(val_prompts, val_seeds)
        self.train_resolution: int | None = None
        self.trained_steps: int | None = None
        self.trained_on: dict[str, Any] | None = None
        self.sampled_weights: str | None = None
        self.ema: EMA | None = None
        if init_from:
            self.initialise_from(init_from)
        if ema_half_life_images > 0:
            self.ema = EMA(self.trained_modules(), ema_half_life_images, ema_ramp)

    # ------------------------------------------------------------------------------------------ parts
    def trained_modules(self) -> dict[str, torch.nn.Module]:
        return {"transformer": self.transformer, "text_proj": self.conditioner.proj}

    @property
    def resolution_multiple(self) -> int:
        return self.autoencoder.downsample_factor  # one token per latent position

    @property
    def downsampling(self) -> str:
        return f"autoencoder f={self.autoencoder.downsample_factor}, one token per latent"

    def train(self, mode: bool = True):
        super().train(mode)
        self.tokenizer.eval()
        return self

    def configure_model(self) -> None:
        """Under :class:`~emu.training.distributed.FSDPStrategy`: shard the transformer (its blocks as units), the text
        projections and the EMA's copies of both; the frozen networks and the tokenizer stay replicated."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, FSDPStrategy):
            if strategy.activation_checkpointing:
                self.transformer.set_gradient_checkpointing(True)
            parts = [self.transformer, *self.conditioner.proj.values()]
            if self.ema is not None:
                parts += [self.ema.shadow["transformer"], *self.ema.shadow["text_proj"].values()]
            shard_modules(parts, wrap=SHARDED_BLOCKS, strategy=strategy)
        if self.hparams.compile and not getattr(self, "_compiled", False):
            self.transformer.compile()  # in place: parameter names (and checkpoints) stay as they are
            self._compiled = True

    def tokens(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
        """B x h x w token ids of a batch's images (or precomputed latents)."""
        return self.tokenizer.tokenize(self.batch_latents(batch, generator))

    # ------------------------------------------------------------------------------------------ training
    def masked_token_loss(self, batch: dict[str, Any], generator: torch.Generator | None = None,
                          drop: bool = True) -> torch.Tensor:  # fmt: skip
        tokens = self.tokens(batch, generator)
        b, h, w = tokens.shape
        tokens = tokens.flatten(1)
        mask = training_mask(b, h * w, generator, self.device)
        inputs = tokens.masked_fill(mask, self.transformer.mask_id)
        cond = self.conditioning(batch["caption"], drop=drop, embeddings=batch.get("text"))
        logits = self.transformer(inputs, (h, w), **cond)
        return masked_cross_entropy(logits, tokens, mask, self.hparams.label_smoothing)

    @trains_on_good_samples  # a batch with no good sample is skipped (emu.data.batches)
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.masked_token_loss(batch)
        bs = len(batch["caption"])
        self._images_per_step = images_per_step(self.trainer, bs)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        g = torch.Generator().manual_seed(10_000 + batch_idx)  # the same masks every validation
        loss = self.masked_token_loss(batch, generator=g, drop=False)
        self.log("val/loss", loss, prog_bar=True, batch_size=len(batch["caption"]), sync_dist=True)

    # ------------------------------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, prompts: list[str], seeds: list[int], settings: SamplingSettings | None = None,
               autocast_dtype: torch.dtype | None = None, progress: bool = False) -> torch.Tensor:  # fmt: skip
        """Images ([-1, 1], on the CPU) for ``prompts`` with ``seeds`` (an image's tokens depend on its seed alone),
        decoded in ``settings.steps`` steps with guidance ``settings.guidance`` (default: ``model.val_sampling``)."""
        settings = settings or self.val_sampling
        check_decoder(settings, "sampling.sampler")
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        default = getattr(dm, "resolution", None) or self.train_resolution or 64
        height, width = settings.image_size(default, self.resolution_multiple, self.downsampling)
        f = self.autoencoder.downsample_factor
        grid = (height // f, width // f)
        autocast = torch.autocast(self.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
        out, bs = [], settings.batch_size
        with self.frozen.on(self.device):
            for start in tqdm(range(0, len(prompts), bs), desc="decoding", disable=not progress):
                chunk, chunk_seeds = list(prompts[start : start + bs]), seeds[start : start + bs]
                with autocast:
                    c = self.conditioner.condition(chunk)
                    u = negative_conditioning(self.conditioner, [settings.negative_prompt] * len(chunk))
                conds = {True: {"context": c.context, "context_mask": c.mask, "pooled": c.pooled},
                         False: {"context": u.context, "context_mask": u.mask, "pooled": u.pooled}}  # fmt: skip
                logits_fn = self._logits_fn(grid, conds, autocast)
                generators = [torch.Generator().manual_seed(int(s)) for s in chunk_seeds]
                tokens = decode(logits_fn, len(chunk), grid[0] * grid[1], self.transformer.mask_id, settings.steps,
                                settings.guidance, self.hparams.temperature, self.hparams.choice_temperature,
                                generators, self.device)  # fmt: skip
                z = self.tokenizer.detokenize(tokens.view(-1, *grid))
                images = self.autoencoder.decode(self.autoencoder.denormalize(z.float(), self.hparams.latent_scaling))
                out.append(images.float().clamp(-1, 1).cpu())
        return torch.cat(out)

    def _logits_fn(self, grid: tuple[int, int], conds: dict[bool, dict[str, Any]], autocast):
        def logits(tokens: torch.Tensor, conditional: bool) -> torch.Tensor:
            with autocast:
                return self.transformer(tokens, grid, **conds[conditional])

        return logits

    # ------------------------------------------------------------------------------------------ checkpoints
    def _not_saved(self) -> tuple[str, ...]:
        return (*self.frozen.prefixes, "tokenizer.")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The frozen networks' and the tokenizer's weights out (under FSDP, which loads by the model's own keys, they
        stay) and the header in."""
        trainer = self._trainer
        sd = checkpoint["state_dict"]
        if trainer is None or not isinstance(trainer.strategy, FSDPStrategy):
            for k in [k for k in sd if k.startswith(self._not_saved())]:
                del sd[k]
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        data = dm.describe() if hasattr(dm, "describe") else self.trained_on
        write_header(checkpoint, KIND, transformer_config=self.transformer.config, resolution=self.train_resolution,
                     data=data, tokenizer_fingerprint=fingerprint(self.tokenizer))  # fmt: skip

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        kind = header(checkpoint).get("kind")
        if kind != KIND:
            raise ValueError(f"this is a {kind or 'non-emu'} checkpoint, not a masked transformer (maskgit) checkpoint")
        self.check_tokenizer(header(checkpoint).get("tokenizer_fingerprint"), "the checkpoint")
        if "state_dict" in checkpoint:  # absent when FSDP restores a sharded checkpoint itself
            own = self.state_dict()
            checkpoint["state_dict"].update({k: v for k, v in own.items() if k.startswith(self._not_saved())})

    def initialise_from(self, path: str) -> None:
        """The transformer's and text projections' weights (their EMA where the checkpoint has one) from a ``kind:
        maskgit`` checkpoint: initialisation (stage 2), not resume."""
        ckpt = _read(path, "model.init_from")
        self.check_tokenizer(header(ckpt).get("tokenizer_fingerprint"), f"'{path}' (model.init_from)")
        sd = ckpt["state_dict"]
        for name, part in self.trained_modules().items():
            prefix = f"ema.shadow.{name}."
            if not any(k.startswith(prefix) for k in sd):
                prefix = {"transformer": "transformer.", "text_proj": "conditioner.proj."}[name]
            try:
                part.load_state_dict({k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)})
            except RuntimeError as e:
                raise ConfigError("model.init_from", f"the {name} weights of '{path}' do not fit this model's: "
                                  f"{str(e).splitlines()[-1].strip()}") from e  # fmt: skip

    def check_tokenizer(self, expected: str | None, what: str) -> None:
        """Refuse weights learnt over other tokens than this model's tokenizer gives (its checkpoint rewritten
        since: the same shapes, other tokens)."""
        if expected is not None and expected != fingerprint(self.tokenizer):
            raise ConfigError("model.tokenizer", f"{what} was trained on the tokens of another tokenizer than the "
                              f"one now at '{self.hparams.tokenizer}' (fingerprint {fingerprint(self.tokenizer)}, "
                              f"expected {expected}): put that tokenizer back there")  # fmt: skip


def check_decoder(settings: SamplingSettings, key: str) -> None:
    if settings.sampler not in TOKEN_DECODERS:
        raise ConfigError(key, f"is {settings.sampler!r}, a diffusion sampler; a masked transformer decodes with "
                          f"one of {list(TOKEN_DECODERS)}")  # fmt: skip


def _read(path: str | Path, key: str) -> dict[str, Any]:
    path = Path(path).expanduser()
    if is_sharded_checkpoint(path):
        raise ConfigError(key, f"'{path}' is a sharded (FSDP) checkpoint: make one file of it first "
                          f"(python -m emu.training.distributed consolidate {path})")  # fmt: skip
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at '{path}'")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if header(ckpt).get("kind") != KIND:
        raise ConfigError(key, f"'{path}' is a {header(ckpt).get('kind') or 'non-emu'} checkpoint, not a masked "
                          "transformer (maskgit) checkpoint")  # fmt: skip
    return ckpt


def load_maskgit(path: str | Path, map_location: str | torch.device = "cpu", key: str = "ckpt",
                 **overrides) -> MaskGITModule:  # fmt: skip
    """A :class:`MaskGITModule` from its checkpoint (EMA kept apart); ``trained_steps``, ``train_resolution`` and
    ``trained_on`` from the checkpoint; ``key``: the setting that named it, for errors."""
    ckpt = _read(path, key)
    module = MaskGITModule.load_from_checkpoint(path, map_location=map_location, init_from=None, weights_only=False,
                                                **overrides)  # fmt: skip
    module.hparams["init_from"] = (ckpt.get("hyper_parameters") or {}).get("init_from")  # a record of stage 2's start
    module.train_resolution = header(ckpt).get("resolution")
    module.trained_steps = ckpt.get("global_step")
    module.trained_on = header(ckpt).get("data")
    return module


def is_maskgit_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a masked transformer's checkpoint (one file, or a sharded FSDP folder)."""
    path = Path(path).expanduser()
    if is_sharded_checkpoint(path):
        return read_header(path).get("kind") == KIND
    if not path.is_file():
        return False
    try:
        return header(torch.load(path, map_location="cpu", weights_only=False, mmap=True)).get("kind") == KIND
    except Exception:  # not a torch file: the diffusion loader says what it is
        return False


def load_text_to_image(path: str | Path, device: str | torch.device = "cpu", ema: bool = True, key: str = "ckpt",
                       **overrides):  # fmt: skip
    """Either kind of text-to-image model, ready to sample (on ``device``, eval mode, EMA weights copied in unless
    ``ema`` is false): a masked transformer's checkpoint, else what
    :func:`~emu.diffusion.checkpoints.load_for_sampling` loads. ``key``: the setting that named it, for errors."""
    if not is_maskgit_checkpoint(path):
        return load_for_sampling(path, device, ema=ema, **overrides)
    module = load_maskgit(path, map_location="cpu", key=key, **overrides).to(device).eval()
    if ema and module.ema is not None:
        module.ema.copy_to(module.trained_modules())
    module.sampled_weights = "ema" if ema and module.ema is not None else "raw"
    return module

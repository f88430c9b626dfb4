"""Stage-1/2 checkpoints: what a :class:`~emu.diffusion.module.DiffusionModule` puts into a Lightning checkpoint,
and how a checkpoint or an export folder (:mod:`emu.diffusion.export`) becomes a model again, old ones included.

Checkpoints hold the trainable weights and the EMA; the frozen autoencoder and text encoders are referenced by path in
the hyperparameters (a T5-XXL is not copied into every checkpoint). ``checkpoint["emu"]["kind"]`` is ``"diffusion"``.
A checkpoint written under older names of the settings loads under the new ones (:func:`_renamed_hparams`).

The module's checkpoint hooks and its ``init_from`` use :func:`on_save`, :func:`on_load` and :func:`read_init_weights`;
:func:`load_diffusion` and :func:`load_for_sampling` build the module, so they import it when called (it imports
this file).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from emu.diffusion.denoiser import RENAMED_WEIGHTINGS
from emu.diffusion.export import (
    TRAINED_PREFIXES,
    WEIGHTS_NAME,
    is_export,
    load_export_weights,
    part_state,
    read_export_config,
)
from emu.diffusion.lora import is_adapter_key
from emu.diffusion.pipeline import SamplingSettings
from emu.errors import ConfigError
from emu.training.distributed import FSDPStrategy, read_sharded_weights
from emu.utils.checkpoint_header import diffusers_unet_folder, header, is_sharded_checkpoint, read_header, write_header

if TYPE_CHECKING:
    from emu.diffusion.module import DiffusionModule

KIND = "diffusion"
REFERENCE = "reference."  # the preference objectives' frozen reference (init_from gives it; sharded: kept, as all keys)


# ---------------------------------------------------------------------------------------------- the module's hooks
def on_save(module: DiffusionModule, checkpoint: dict[str, Any]) -> None:
    """``module.on_save_checkpoint``: the frozen networks' weights out (under FSDP, which loads by the model's own
    keys, frozen ones included, they stay) and the header in (the U-Net's config, the resolution, the data)."""
    sd = checkpoint["state_dict"]
    trainer = module._trainer  # None outside a Trainer
    sharded = trainer is not None and isinstance(trainer.strategy, FSDPStrategy)
    for k in [k for k in sd if k.startswith((*module.frozen.prefixes, REFERENCE)) and not sharded]:
        del sd[k]  # (the preference objectives' reference: init_from gives it again)
    if module.adapters is not None:  # the adapters, not the base U-Net under them (hparams.init_from names it)
        for k in [k for k in sd if k.startswith("unet.") and not is_adapter_key(k)]:
            del sd[k]
    dm = getattr(trainer, "datamodule", None) if trainer is not None else None
    data = dm.describe() if hasattr(dm, "describe") else module.trained_on
    lora = {"lora_base": module.base_fingerprint} if module.adapters is not None else {}
    write_header(checkpoint, KIND, unet_config=module.unet.config, resolution=module.train_resolution, data=data,
                 **lora)  # fmt: skip


def on_load(module: DiffusionModule, checkpoint: dict[str, Any]) -> None:
    """``module.on_load_checkpoint``: refuse another kind of checkpoint; the frozen networks keep their own weights."""
    kind = header(checkpoint).get("kind")
    if kind != KIND:
        raise ValueError(f"this is a {kind or 'non-emu'} checkpoint, not a diffusion (stage 1/2) checkpoint")
    check_lora_base(module, header(checkpoint).get("lora_base"))
    if "state_dict" in checkpoint:  # absent when FSDP restores a sharded checkpoint itself
        own = module.state_dict()
        if module.reference is None:  # a consolidated FSDP checkpoint holds its reference: not needed to sample
            for k in [k for k in checkpoint["state_dict"] if k.startswith(REFERENCE)]:
                del checkpoint["state_dict"][k]
        checkpoint["state_dict"].update({k: v for k, v in own.items() if k.startswith((*module.frozen.prefixes,
                                                                                       REFERENCE))})  # fmt: skip
        if module.adapters is not None:  # a LoRA checkpoint: the base U-Net is the one init_from loaded
            base = {k: v for k, v in own.items() if k.startswith("unet.") and not is_adapter_key(k)}
            checkpoint["state_dict"].update({k: v for k, v in base.items() if k not in checkpoint["state_dict"]})


def check_lora_base(module: DiffusionModule, expected: str | None) -> None:
    """Refuse LoRA adapters over another base than the one they trained over (``init_from`` rewritten since)."""
    if module.adapters is not None and expected is not None and expected != module.base_fingerprint:
        raise ValueError(f"these LoRA adapters trained over another base than the one now at "
                         f"'{module.hparams.init_from}' (its weights changed since: fingerprint "
                         f"{module.base_fingerprint}, expected {expected}); put their base back there")  # fmt: skip


def read_init_weights(path: str, names: Iterable[str]) -> dict[str, dict[str, torch.Tensor]]:
    """The weights of each trained part in ``names`` (e.g. ``unet``, ``text_proj``) that ``init_from`` starts from:
    its EMA where the checkpoint has one, else its trained weights; from one file or a sharded (FSDP) checkpoint folder,
    from which only those are read. A diffusers U-Net or pipeline folder (SDXL-base, SD) gives its U-Net only,
    converted (:func:`~emu.diffusion.convert.from_diffusers`); the other parts keep their fresh weights."""
    if is_export(path):  # an export folder (a merged LoRA model, say): its trained weights
        config = read_export_config(path)
        if config["hyper_parameters"].get("lora"):
            raise ConfigError("model.init_from", f"'{path}' holds LoRA adapters over "
                              f"'{config['hyper_parameters'].get('init_from')}', not a whole model: export it merged "
                              "(python -m emu.export safetensors CKPT OUT) and start from that folder")  # fmt: skip
        from safetensors.torch import load_file

        state = load_file(str(Path(path) / WEIGHTS_NAME))
        return {name: part_state(name, state) for name in names}
    folder = diffusers_unet_folder(path)
    if folder is not None:
        from diffusers import UNet2DConditionModel

        from emu.diffusion.convert import from_diffusers

        return {"unet": from_diffusers(UNet2DConditionModel.from_pretrained(folder).float()).state_dict()}
    if is_sharded_checkpoint(path):
        if read_header(path).get("kind") not in (KIND, None):
            raise ConfigError("model.init_from", f"'{path}' is a {read_header(path)['kind']} checkpoint, not a "
                              "diffusion checkpoint")  # fmt: skip
        sd = read_sharded_weights(path, ["ema.shadow."])
        sd = sd or read_sharded_weights(path, [TRAINED_PREFIXES[n] for n in names])
        if not any(k.startswith(("ema.shadow.unet.", "unet.")) for k in sd):
            raise ConfigError("model.init_from", f"'{path}' is a sharded checkpoint without diffusion weights")
    else:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        if header(ckpt).get("kind") != KIND:
            raise ConfigError("model.init_from", f"'{path}' is not a diffusion checkpoint")
        sd = ckpt["state_dict"]
        if (ckpt.get("hyper_parameters") or {}).get("lora"):
            raise ConfigError("model.init_from", f"'{path}' holds LoRA adapters over "
                              f"'{ckpt['hyper_parameters'].get('init_from')}', not a whole model: export it merged "
                              "(python -m emu.export safetensors CKPT OUT) and start from that folder")  # fmt: skip
    weights = {}
    for name in names:
        prefix = f"ema.shadow.{name}." if any(k.startswith(f"ema.shadow.{name}.") for k in sd) else None
        prefix = prefix or TRAINED_PREFIXES[name]
        weights[name] = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    return weights


# ---------------------------------------------------------------------------------------------- old settings
OLD_VAL_SAMPLING = {"val_sampler": "sampler", "val_steps": "steps", "val_guidance": "guidance",
                    "val_schedule": "spacing"}  # fmt: skip


def _renamed_hparams(hp: dict[str, Any]) -> dict[str, Any]:
    """The settings of a checkpoint written before ``schedule`` became ``noise_schedule``, the ``val_*`` sampling
    arguments became ``val_sampling``, per-encoder CFG dropout became ``text.encoder_dropout``, the ``uniform`` loss
    weighting became ``simple`` and the sampling setting ``sigmas`` (a spacing's name) became ``spacing``, under their
    new names (the old names are ignored when loading). Used by :func:`load_diffusion` for checkpoints and export
    folders alike; a resumed run (``ckpt_path=``) and stage 2's ``init_from`` read weights only, so they need none of
    this."""
    out: dict[str, Any] = {}
    if hp.get("weighting") in RENAMED_WEIGHTINGS:
        out["weighting"] = RENAMED_WEIGHTINGS[hp["weighting"]]
    text = hp.get("text")
    if isinstance(text, Mapping) and isinstance(text.get("dropout"), Mapping):  # independent draws, as trained
        out["text"] = {**text, "dropout": 0.0, "encoder_dropout": dict(text["dropout"])}
    if "schedule" in hp and "noise_schedule" not in hp:
        out["noise_schedule"] = hp["schedule"]
    if "val_sampling" not in hp and any(k in hp for k in OLD_VAL_SAMPLING):
        out["val_sampling"] = {new: hp[old] for old, new in OLD_VAL_SAMPLING.items() if old in hp}
    sampling = hp.get("val_sampling")
    if isinstance(sampling, Mapping) and set(sampling) & set(SamplingSettings.RENAMED):
        out["val_sampling"] = {SamplingSettings.RENAMED.get(k, k): v for k, v in sampling.items()}
    return out


# ---------------------------------------------------------------------------------------------- loading
def load_diffusion(path: str | Path, map_location: str | torch.device = "cpu", **overrides) -> DiffusionModule:
    """A :class:`~emu.diffusion.module.DiffusionModule` from a stage-1/2 Lightning checkpoint (EMA kept separate; see
    ``use_ema``) or an export folder (:mod:`emu.diffusion.export`: one set of weights, no EMA;
    ``module.exported_weights`` says which). ``module.trained_steps`` is the optimizer steps the weights saw (None where
    unknown)."""
    from emu.diffusion.module import DiffusionModule

    path = Path(path).expanduser()
    if path.is_dir():
        return _load_export(path, map_location, **overrides)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint or export folder at '{path}'")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated, corrupt or not a torch file at all
        raise ValueError(f"'{path}' is not a readable checkpoint ({type(e).__name__}: {e})") from e
    kind = header(ckpt).get("kind")
    if kind != KIND:
        raise ValueError(f"'{path}' is a {kind or 'non-emu'} checkpoint, not a diffusion (stage 1/2) checkpoint")
    hp = ckpt.get("hyper_parameters") or {}
    renamed = _renamed_hparams(hp)
    base = hp.get("init_from") if hp.get("lora") else None  # LoRA: the adapters' base U-Net is read again
    module = DiffusionModule.load_from_checkpoint(path, map_location=map_location, init_from=base, weights_only=False,
                                                  **{**renamed, **overrides})  # fmt: skip
    module.train_resolution = header(ckpt).get("resolution")
    module.hparams["init_from"] = (ckpt.get("hyper_parameters") or {}).get("init_from")  # a record of stage 2's start
    module.trained_steps = ckpt.get("global_step")
    module.trained_on = header(ckpt).get("data")
    return module


def _load_export(folder: Path, map_location: str | torch.device = "cpu", **overrides) -> DiffusionModule:
    from emu.diffusion.module import DiffusionModule

    config = read_export_config(folder)
    hp = {
        **config["hyper_parameters"],
        **_renamed_hparams(config["hyper_parameters"]),
        **overrides,
        "init_from": config["hyper_parameters"].get("init_from") if config["hyper_parameters"].get("lora") else None,
        "ema_half_life_images": 0,
    }  # one weight set (LoRA: the adapters, over their base U-Net, init_from, read again)
    module = DiffusionModule(**hp)
    for key in ("init_from", "ema_half_life_images"):  # records of how it was trained (not used to load it)
        if key in config["hyper_parameters"]:
            module.hparams[key] = config["hyper_parameters"][key]
    check_lora_base(module, config.get("lora_base"))
    load_export_weights(module, folder)
    module.train_resolution, module.trained_steps = config.get("resolution"), config.get("step")
    module.trained_on = config.get("data")
    module.exported_weights = config["weights"]
    return module.to(map_location)


def load_for_sampling(path: str | Path, device: str | torch.device = "cpu", ema: bool = True,
                      **overrides) -> DiffusionModule:  # fmt: skip
    """A checkpoint ready to sample: on ``device``, in eval mode, with its EMA weights copied in (unless ``ema`` is
    false or it has none). What ``sample.py`` and ``eval.py`` generate with."""
    module = load_diffusion(path, map_location="cpu", **overrides).to(device).eval()
    if not ema and module.exported_weights == "ema":
        raise ConfigError("sampling.ema", f"is false but '{path}' holds the EMA weights only; export the raw ones "
                          "with `python -m emu.export safetensors CKPT OUT --raw` to sample them")  # fmt: skip
    if ema and module.ema is not None:
        module.ema.copy_to(module.trained_modules())
    module.sampled_weights = module.exported_weights or ("ema" if ema and module.ema is not None else "raw")
    return module

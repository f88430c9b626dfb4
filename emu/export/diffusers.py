"""A stage-1/2 model as a diffusers pipeline folder (``python -m emu.export diffusers CKPT OUT``).

``DiffusionPipeline.from_pretrained(OUT, trust_remote_code=True)`` loads it: diffusers' own ``UNet2DConditionModel``
and scheduler, transformers' text encoders and tokenizers, and, for what diffusers has no component for, three
small files shipped in the folder (``emu/export/hub``): the pipeline (``pipeline_emu.py``), the autoencoder with
Fourier features and patch path (``vae/emu_autoencoder.py``) and the conditioner's projections
(``text_projection/emu_text_projection.py``). They need only torch, diffusers and transformers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from emu.autoencoder.convert import diffusers_config, diffusers_state_dict
from emu.diffusion.convert import to_diffusers as unet_to_diffusers

HUB = Path(__file__).parent / "hub"
PIPELINE_FILE, VAE_FILE, PROJECTION_FILE = "pipeline_emu.py", "emu_autoencoder.py", "emu_text_projection.py"
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction"}
SCHEDULERS = {"dpmpp_2m": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler"}
TEXT_SLOTS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))


def _hub_module(name: str):
    """One of the shipped files as a module (the same code the export folder carries)."""
    import importlib

    return importlib.import_module(f"emu.export.hub.{Path(name).stem}")


def check_exportable(module) -> None:
    """Refuse, with the reason, what diffusers' schedulers cannot express."""
    hp = module.hparams
    if hp.parameterization not in PREDICTION_TYPES:
        raise ValueError(f"a {hp.parameterization}-parameterised model has no diffusers scheduler with emu's "
                         "preconditioning; eps and v export")  # fmt: skip
    if hp.parameterization == "v" and float(hp.sigma_data) != 1.0:
        raise ValueError(f"diffusers' v-prediction assumes sigma_data 1; this model has {hp.sigma_data}")
    if len(module.conditioner.encoders) > len(TEXT_SLOTS):
        raise ValueError(f"the exported pipeline runs at most {len(TEXT_SLOTS)} text encoders; this model has "
                         f"{len(module.conditioner.encoders)}")  # fmt: skip


def make_scheduler(module, sampler: str = "dpmpp_2m"):
    """The diffusers scheduler of the model's training schedule and parameterisation, stepping like emu's
    ``sampler`` with Karras sigmas (a zero-terminal-SNR model: trailing timesteps, as ``spacing=auto``):
    ``dpmpp_2m`` (DPM-Solver++ 2M) or ``euler``."""
    import diffusers

    if sampler not in SCHEDULERS:
        raise ValueError(f"sampler {sampler!r} has no diffusers scheduler here; choose one of {sorted(SCHEDULERS)}")
    hp = module.hparams
    schedule = {"steps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "zero_terminal_snr": False,
                **dict(hp.noise_schedule or {})}  # fmt: skip
    zero_snr = bool(schedule["zero_terminal_snr"])  # as sample.py's spacing=auto: trailing timesteps, else Karras
    common = dict(num_train_timesteps=int(schedule["steps"]), beta_start=float(schedule["beta_start"]),
                  beta_end=float(schedule["beta_end"]), beta_schedule="scaled_linear",
                  prediction_type=PREDICTION_TYPES[hp.parameterization], rescale_betas_zero_snr=zero_snr,
                  use_karras_sigmas=not zero_snr, timestep_spacing="trailing" if zero_snr else "linspace")  # fmt: skip
    if sampler == "dpmpp_2m":
        return diffusers.DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2,
                                                     final_sigmas_type="zero", lower_order_final=True)  # fmt: skip
    return diffusers.EulerDiscreteScheduler(**common)


def export_vae(autoencoder, folder: Path):
    """emu's autoencoder as ``EmuAutoencoderKL`` (diffusers' ``AutoencoderKL`` + Fourier features + patch path)."""
    cls = _hub_module(VAE_FILE).EmuAutoencoderKL
    c = autoencoder.config
    vae = cls(**diffusers_config(autoencoder), fourier_frequencies=tuple(c["fourier_frequencies"]),
              patch_shortcut=bool(c.get("patch_shortcut", False)))  # fmt: skip
    vae.load_state_dict(diffusers_state_dict(autoencoder), strict=True)
    vae.save_pretrained(folder)
    shutil.copy(HUB / VAE_FILE, folder / VAE_FILE)
    return vae


def export_text_projection(conditioner, folder: Path):
    cls = _hub_module(PROJECTION_FILE).EmuTextProjection
    specs = [{"name": n, "kind": e.kind, "max_length": int(e.max_length), "hidden_size": int(e.hidden_size),
              "hidden_state": e.hidden_state, "mask_padding": e.mask_padding}
             for n, e in conditioner.encoders.items()]  # fmt: skip
    proj = cls(encoders=specs, context_dim=int(conditioner.context_dim), uncond=conditioner.uncond,
               pooled_from=conditioner.pooled_from, join=conditioner.join)  # fmt: skip
    proj.proj.load_state_dict(conditioner.proj.state_dict(), strict=True)
    proj.save_pretrained(folder)
    shutil.copy(HUB / PROJECTION_FILE, folder / PROJECTION_FILE)
    return proj


def export_diffusers(module, folder: str | Path, sampler: str = "dpmpp_2m") -> Path:
    """Write ``module`` (a :class:`~emu.diffusion.module.DiffusionModule` with the weights to export in place, e.g.
    from ``load_for_sampling``) as a diffusers pipeline folder, in float32 (the text encoders as they are)."""
    import diffusers
    import transformers

    check_exportable(module)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": [Path(PIPELINE_FILE).stem, "EmuPipeline"], "_diffusers_version": diffusers.__version__}

    unet = unet_to_diffusers(module.unet).float()  # copies: the caller's module stays where and as it is
    unet.save_pretrained(folder / "unet")
    index["unet"] = ["diffusers", type(unet).__name__]
    export_vae(module.autoencoder, folder / "vae")
    index["vae"] = [Path(VAE_FILE).stem, "EmuAutoencoderKL"]
    export_text_projection(module.conditioner, folder / "text_projection")
    index["text_projection"] = [Path(PROJECTION_FILE).stem, "EmuTextProjection"]
    scheduler = make_scheduler(module, sampler)
    scheduler.save_pretrained(folder / "scheduler")
    index["scheduler"] = ["diffusers", type(scheduler).__name__]

    encoders = list(module.conditioner.encoders.values())
    for i, (enc_slot, tok_slot) in enumerate(TEXT_SLOTS):
        if i >= len(encoders):
            index[enc_slot] = index[tok_slot] = [None, None]
            continue
        enc = encoders[i]
        for slot, obj in ((enc_slot, enc.model), (tok_slot, enc.tokenizer)):
            name = type(obj).__name__
            if getattr(transformers, name, None) is not type(obj):
                raise ValueError(f"{slot} is a {name}, which transformers does not export under that name")
            obj.save_pretrained(folder / slot)
            index[slot] = ["transformers", name]
    index["latent_scaling"] = module.hparams.latent_scaling
    index["sample_size"] = module.train_resolution
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    shutil.copy(HUB / PIPELINE_FILE, folder / PIPELINE_FILE)
    return folder


def load_pipeline(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """``DiffusionPipeline.from_pretrained`` of an exported folder (its shipped code trusted: it is ours)."""
    from diffusers import DiffusionPipeline

    folder = Path(folder)
    if not (folder / "model_index.json").is_file() or not (folder / PIPELINE_FILE).is_file():
        raise FileNotFoundError(f"'{folder}' is not an exported emu diffusers pipeline (model_index.json and "
                                f"{PIPELINE_FILE})")  # fmt: skip
    return DiffusionPipeline.from_pretrained(str(folder), trust_remote_code=True, dtype=dtype).to(device)

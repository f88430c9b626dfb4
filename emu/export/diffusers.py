"""A stage-1/2 model as a diffusers pipeline folder (``python -m emu.export diffusers CKPT OUT``).

``DiffusionPipeline.from_pretrained(OUT, trust_remote_code=True)`` loads it: diffusers' own ``UNet2DConditionModel``
and scheduler, transformers' text encoders and tokenizers, and, for what diffusers has no component for, three
small files shipped in the folder (``emu/export/hub``): the pipeline (``pipeline_emu.py``), the autoencoder with
Fourier features and patch path (``vae/emu_autoencoder.py``) and the conditioner's projections
(``text_projection/emu_text_projection.py``). They need only torch, diffusers and transformers.

A model diffusers' own ``StableDiffusionXLPipeline`` runs as emu samples it (:func:`sdxl_problems` says why not when it
cannot) is written as one instead (``pipeline="auto"``, the default, or ``"sdxl"``): diffusers' and transformers'
classes only, loaded by ``DiffusionPipeline.from_pretrained(OUT)`` without ``trust_remote_code``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from emu.autoencoder.convert import diffusers_config, diffusers_state_dict
from emu.autoencoder.pixel import PixelSpace
from emu.diffusion.convert import to_diffusers as unet_to_diffusers
from emu.diffusion.lora import plain_unet

HUB = Path(__file__).parent / "hub"
PIPELINE_FILE, VAE_FILE, PROJECTION_FILE = "pipeline_emu.py", "emu_autoencoder.py", "emu_text_projection.py"
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction"}
SCHEDULERS = {"dpmpp_2m": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler"}
TEXT_SLOTS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
PIPELINES = ("auto", "emu", "sdxl")  # which pipeline class: SDXL's where the model is one, else emu's; or either


def _hub_module(name: str):
    """One of the shipped files as a module (the same code the export folder carries)."""
    import importlib

    return importlib.import_module(f"emu.export.hub.{Path(name).stem}")


def not_a_latent_unet(module) -> str | None:
    """Why ``module`` has no diffusers form (a ``UNet2DConditionModel`` over an ``AutoencoderKL``, what the pipelines
    and LoRA files hold): a DiT, or pixel space; None for a latent U-Net."""
    arch = module.unet.config.get("arch", "unet")
    if arch != "unet":
        return f"diffusers' pipelines and LoRA files hold a UNet2DConditionModel; this model's network is a {arch}"
    if isinstance(module.autoencoder, PixelSpace):
        return "a pixel-space model has no autoencoder for a diffusers pipeline's vae"
    return None


def check_exportable(module) -> None:
    """Refuse, with the reason, what diffusers' schedulers and emu's pipeline (a ``UNet2DConditionModel`` over an
    autoencoder) cannot express."""
    hp = module.hparams
    problem = not_a_latent_unet(module)
    if problem:
        raise ValueError(f"{problem} (export it with `python -m emu.export safetensors`)")
    if hp.parameterization not in PREDICTION_TYPES:
        raise ValueError(f"a {hp.parameterization}-parameterised model has no diffusers scheduler with emu's "
                         "preconditioning; eps and v export")  # fmt: skip
    if hp.parameterization == "v" and float(hp.sigma_data) != 1.0:
        raise ValueError(f"diffusers' v-prediction assumes sigma_data 1; this model has {hp.sigma_data}")
    if len(module.conditioner.encoders) > len(TEXT_SLOTS):
        raise ValueError(f"the exported pipeline runs at most {len(TEXT_SLOTS)} text encoders; this model has "
                         f"{len(module.conditioner.encoders)}")  # fmt: skip


def sdxl_problems(module) -> list[str]:
    """Why diffusers' ``StableDiffusionXLPipeline`` would not sample ``module`` (a DiffusionModule) as emu does; empty
    when it would: a text_time U-Net, two CLIP encoders (penultimate states, no padding mask, as many tokens as their
    tokenizers' ``model_max_length``, which the pipeline pads to) joined along the features, the pooled embedding the
    second's, zeros as the unconditional embedding (``force_zeros_for_empty_prompt``), a diffusers-layout autoencoder
    whose latents are scaled by its ``scaling_factor`` alone (the pipeline applies no shift nor per-channel
    statistics), eps- or v-prediction (sigma_data 1)."""
    hp, cond, ae = module.hparams, module.conditioner, module.autoencoder
    problems = []
    if hp.parameterization not in PREDICTION_TYPES:
        problems.append(f"{hp.parameterization}-parameterised, not eps or v")
    elif hp.parameterization == "v" and float(hp.sigma_data) != 1.0:
        problems.append(f"v-prediction with sigma_data {hp.sigma_data}, not 1")
    if not module.unet.config.get("addition_time_embed_dim"):
        problems.append("the U-Net has no text_time embedding (unet.addition_time_embed_dim)")
    encoders = list(cond.encoders.items())
    kinds = [e.kind for _, e in encoders]
    if kinds != ["clip", "clip"]:
        problems.append(f"its text encoders are {kinds}, not two CLIP text encoders")
    if cond.join != "features":
        problems.append(f"text.join is {cond.join!r}, not 'features' (SDXL's side-by-side join, unprojected)")
    if len(encoders) == 2 and cond.pooled_from != encoders[1][0]:
        problems.append(f"the pooled embedding is {cond.pooled_from!r}'s, not the second encoder's "
                        f"({encoders[1][0]!r})")  # fmt: skip
    if cond.uncond != "zeros":
        problems.append(f"text.uncond is {cond.uncond!r}, not 'zeros' (force_zeros_for_empty_prompt)")
    for name, e in encoders:
        if e.hidden_state != "penultimate":
            problems.append(f"{name} gives its {e.hidden_state!r} hidden states, not the penultimate ones")
        if e.mask_padding:
            problems.append(f"{name} masks its padding (SDXL's pipeline runs the encoders without a mask)")
        if e.max_length != e.tokenizer.model_max_length:
            problems.append(f"{name} takes {e.max_length} tokens but its tokenizer's model_max_length, to which the "
                            f"pipeline pads, is {e.tokenizer.model_max_length}")  # fmt: skip
    factors = ae.latent_factors()
    if ae.fourier is not None or not ae.diffusers_layout:
        problems.append(f"the autoencoder ({type(ae).__name__}, Fourier features or patch path) is not diffusers' "
                        "AutoencoderKL")  # fmt: skip
    if hp.latent_scaling != "factor" or factors is None:
        problems.append(f"latent_scaling is {hp.latent_scaling!r}, not 'factor' with the autoencoder's scaling_factor")
    elif factors[0]:
        problems.append(f"the autoencoder's shift_factor {factors[0]}: the SDXL pipeline decodes without a shift")
    return problems


def choose_pipeline(module, pipeline: str = "auto") -> str:
    """``sdxl`` or ``emu``: the pipeline class a diffusers export of ``module`` is written as (``auto``: SDXL's where
    :func:`sdxl_problems` finds none); ``sdxl`` for a model SDXL's pipeline cannot sample is refused, with reasons."""
    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline {pipeline!r}: choose one of {list(PIPELINES)}")
    if pipeline == "emu":
        return "emu"
    problems = sdxl_problems(module)
    if pipeline == "sdxl" and problems:
        raise ValueError("this model is not expressible as diffusers' StableDiffusionXLPipeline: " + "; ".join(problems)
                         + " (--pipeline emu or auto writes emu's own pipeline)")  # fmt: skip
    return "emu" if problems else "sdxl"


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


def export_sdxl(module, folder: str | Path, sampler: str = "dpmpp_2m") -> Path:
    """Write ``module`` (with no :func:`sdxl_problems`) as a stock ``StableDiffusionXLPipeline`` folder in float32:
    diffusers' ``UNet2DConditionModel`` and ``AutoencoderKL``, transformers' ``CLIPTextModel`` (the first encoder, whose
    projection the pipeline does not use: a model with one would hand its projection to the pooled slot) and
    ``CLIPTextModelWithProjection`` with their tokenizers, and the scheduler of :func:`make_scheduler`. No invisible
    watermark (``add_watermarker=False``; diffusers adds one on loading where the ``invisible-watermark`` package is
    installed, unless ``from_pretrained`` is given ``add_watermarker=False``)."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    problems = sdxl_problems(module)
    if problems:
        raise ValueError("not expressible as a StableDiffusionXLPipeline: " + "; ".join(problems))
    unet = unet_to_diffusers(plain_unet(module.unet)).float()  # copies: the caller's module stays as it is
    vae = AutoencoderKL(**diffusers_config(module.autoencoder))
    vae.load_state_dict(diffusers_state_dict(module.autoencoder), strict=True)
    if module.train_resolution:  # the pipeline's default size
        unet.register_to_config(sample_size=module.train_resolution // (2 ** (len(vae.config.block_out_channels) - 1)))
    (_, first), (_, second) = module.conditioner.encoders.items()
    text_encoder = CLIPTextModel(first.model.config).eval()
    tower = lambda m: getattr(m, "text_model", m)  # transformers 5: CLIPTextModel is its text model itself
    tower(text_encoder).load_state_dict(tower(first.model).state_dict(), strict=True)
    text_encoder_2 = CLIPTextModelWithProjection(second.model.config).eval()
    text_encoder_2.load_state_dict(second.model.state_dict(), strict=True)
    pipe = StableDiffusionXLPipeline(
        vae=vae.float(), text_encoder=text_encoder.float(), text_encoder_2=text_encoder_2.float(),
        tokenizer=first.tokenizer, tokenizer_2=second.tokenizer, unet=unet, scheduler=make_scheduler(module, sampler),
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )  # fmt: skip
    folder = Path(folder)
    pipe.save_pretrained(folder)
    return folder


def export_diffusers(module, folder: str | Path, sampler: str = "dpmpp_2m", pipeline: str = "auto") -> Path:
    """Write ``module`` (a :class:`~emu.diffusion.module.DiffusionModule` with the weights to export in place, e.g.
    from ``load_for_sampling``) as a diffusers pipeline folder: diffusers' ``StableDiffusionXLPipeline`` where the model
    is one (``pipeline="auto"``; :func:`choose_pipeline`) or as asked (``sdxl``; :func:`export_sdxl`), else emu's own
    pipeline (``emu``), in float32 (the text encoders as they are)."""
    import diffusers
    import transformers

    if choose_pipeline(module, pipeline) == "sdxl":
        return export_sdxl(module, folder, sampler)
    check_exportable(module)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": [Path(PIPELINE_FILE).stem, "EmuPipeline"], "_diffusers_version": diffusers.__version__}

    unet = unet_to_diffusers(plain_unet(module.unet)).float()  # copies: the caller's module stays as it is
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

"""A LoRA model's adapters as a LoRA file other tools load (``python -m emu.export lora CKPT OUT``).

* ``diffusers`` layout (default): ``pytorch_lora_weights.safetensors``, written by diffusers' own
  ``save_lora_weights``: peft's keys under ``unet.`` (``unet.down_blocks.1...attn1.to_q.lora_A.weight``) and the
  adapter's config (rank, alpha, targets) in the file's metadata, so ``pipe.load_lora_weights(OUT)`` scales it by
  alpha / rank. It loads onto the base model's diffusers export (a stock ``StableDiffusionXLPipeline`` for a model from
  SDXL, emu's ``EmuPipeline`` otherwise): the U-Net's names are diffusers'.
* ``kohya`` layout: the same weights through diffusers' ``convert_state_dict_to_kohya`` (``lora_unet_..._to_q.
  lora_down.weight`` / ``lora_up`` / ``.alpha``), the layout of kohya's sd-scripts that AUTOMATIC1111, ComfyUI and
  diffusers' own kohya loader read; the converter writes each ``alpha`` as the rank, so it is set to the adapter's.

The base is not in the file: it is the model the LoRA trained over (``model.init_from``; the card names it).
"""

from __future__ import annotations

from pathlib import Path

import torch

from emu.diffusion.lora import lora_state_dict, peft_config
from emu.export.diffusers import not_a_latent_unet

LAYOUTS = ("diffusers", "kohya")
WEIGHT_NAMES = {"diffusers": "pytorch_lora_weights.safetensors", "kohya": "lora_kohya.safetensors"}


def kohya_state_dict(unet_state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """peft-layout U-Net adapters (no prefix) in kohya's layout, each ``alpha`` the adapter's own."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    state = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in unet_state.items()})
    return {k: torch.tensor(float(alpha)) if k.endswith(".alpha") else v.contiguous() for k, v in state.items()}


def export_lora(module, folder: str | Path, layout: str = "diffusers") -> Path:
    """Write the adapters ``module`` holds now (copy the EMA in first: ``load_for_sampling`` does) as a LoRA file in
    ``folder``; its path."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from safetensors.torch import save_file

    if layout not in LAYOUTS:
        raise ValueError(f"LoRA layout {layout!r}: choose one of {LAYOUTS}")
    if module.adapters is None:
        raise ValueError("this model has no LoRA adapters (it was trained without model.lora): export it whole with "
                         "`python -m emu.export diffusers` or `safetensors`")  # fmt: skip
    problem = not_a_latent_unet(module)
    if problem:  # the adapters stay in emu's checkpoints and safetensors exports (merged)
        raise ValueError(f"{problem}: no diffusers LoRA file can hold its adapters (export the model merged with "
                         "`python -m emu.export safetensors`)")  # fmt: skip
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    settings = module.hparams.lora
    state = lora_state_dict(module.unet)
    path = folder / WEIGHT_NAMES[layout]
    if layout == "kohya":
        save_file(kohya_state_dict(state, settings["alpha"]), str(path), metadata={"format": "pt"})
        return path
    metadata = peft_config(settings).to_dict()
    metadata = {k: sorted(v) if isinstance(v, set) else v for k, v in metadata.items()}  # JSON (target_modules)
    StableDiffusionLoraLoaderMixin.save_lora_weights(folder, unet_lora_layers=state, weight_name=path.name,
                                                     unet_lora_adapter_metadata=metadata)  # fmt: skip
    return path

"""Sample images from a stage-1/2 checkpoint: ``python sample.py ckpt=PATH prompt="..."`` (or ``prompts=FILE``).

Writes one PNG per image, ``metadata.jsonl`` (prompt, seed, every setting, the checkpoint) and ``grid.png`` into
the run folder (``out=``). The same seed gives the same image on the same device.
"""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from emu.diffusion.pipeline import SamplingSettings
from emu.diffusion.prompts import read_prompts
from emu.errors import ConfigError
from emu.maskgit.module import load_text_to_image
from emu.utils import named_sets
from emu.utils.config import check_required, config_errors_as_messages
from emu.utils.images import image_grid
from emu.utils.sample_folder import write_sample_folder


def check_settings(cfg: DictConfig) -> tuple[list[str], SamplingSettings]:
    """The prompts and sampling settings, after every setting is checked (a bad one is a ConfigError before any work
    starts)."""
    check_required(cfg)
    named_sets.register(cfg.get("sets"))
    if (cfg.prompt is None) == (cfg.prompts is None):
        raise ConfigError("prompt/prompts", 'give exactly one: prompt="a red circle" or prompts=FILE')
    sampling = SamplingSettings.from_config(OmegaConf.to_container(cfg.sampling, resolve=True))
    prompts = [str(cfg.prompt)] if cfg.prompt is not None else read_prompts(cfg.prompts, "prompts")
    if cfg.limit is not None:
        prompts = prompts[: int(cfg.limit)]
    if int(cfg.n) < 1:
        raise ConfigError("n", f"must be >= 1, got {cfg.n!r}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError("device", f"must be auto, cpu or cuda, got {cfg.device!r}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "cuda was asked for but no GPU is visible")
    return prompts, sampling


def _grid_guidance(cfg: DictConfig) -> list[float]:
    scales = cfg.get("grid_guidance")
    if scales is None:
        return []
    try:
        scales = [float(g) for g in (scales if OmegaConf.is_list(scales) or isinstance(scales, list) else [scales])]
    except (TypeError, ValueError):
        scales = None
    if not scales or any(not 0 <= g <= 50 for g in scales):
        raise ConfigError("grid_guidance", f"must be a list of guidance scales in [0, 50], got {cfg.grid_guidance}")
    return scales


def run(cfg: DictConfig) -> Path:
    prompts, sampling = check_settings(cfg)
    scales = _grid_guidance(cfg)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))  # fmt: skip
    overrides = {"autoencoder": cfg.autoencoder} if cfg.autoencoder else {}
    try:
        module = load_text_to_image(cfg.ckpt, device, ema=sampling.ema, **overrides)
    except ConfigError:
        raise
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError("ckpt", str(e)) from e
    sampling = replace(sampling, ema=module.sampled_weights == "ema")  # what was used (an export holds one set)
    side = int(sampling.resolution or module.train_resolution or 64)
    height, width = sampling.image_size(side, module.resolution_multiple, module.downsampling)

    n = int(cfg.n)
    all_prompts = [p for p in prompts for _ in range(n)]
    seeds = [int(cfg.seed) + i for i in range(len(all_prompts))]
    autocast = torch.bfloat16 if device.type == "cuda" else None
    weights = "EMA" if sampling.ema else "raw"
    size = f"{width}x{height}" if width != height else f"{side}px"
    guidance = f"guidance {', '.join(map(str, scales))} (a grid)" if scales else f"guidance {sampling.guidance}"
    negative = f", negative prompt {sampling.negative_prompt!r}" if sampling.negative_prompt else ""
    print(f"sampling {len(all_prompts) * max(1, len(scales))} images ({len(prompts)} prompts x {n}) at {size} with "
          f"{sampling.sampler}, {sampling.steps} steps, {guidance}{negative}, {weights} weights, "
          f"on {device}")  # fmt: skip
    sampling = replace(sampling, resolution=side, height=height, width=width)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"ckpt": str(Path(cfg.ckpt).resolve()), "device": str(device)}
    if not scales:
        images = module.sample(all_prompts, seeds, sampling, autocast_dtype=autocast, progress=True)
        write_sample_folder(out, images, all_prompts, seeds, **sampling.as_dict(), **meta)
        cols = min(int(cfg.grid_columns), len(images)) if n == 1 else n
        image_grid(images, nrow=max(1, cols)).save(out / "grid.png")
        rows = math.ceil(len(images) / cols)
        print(f"wrote {len(images)} images, metadata.jsonl and grid.png ({rows} rows) to {out}")
        return out
    columns = []  # one sample folder per guidance scale; grid.png: a row per image, a column per scale
    for g in scales:
        at = replace(sampling, guidance=g)
        images = module.sample(all_prompts, seeds, at, autocast_dtype=autocast, progress=True)
        write_sample_folder(out / f"guidance_{g:g}", images, all_prompts, seeds, **at.as_dict(), **meta)
        columns.append(images)
    grid = torch.stack(columns, dim=1).flatten(0, 1)
    image_grid(grid, nrow=len(scales)).save(out / "grid.png")
    print(f"wrote {len(scales)} sample folders guidance_<scale>/ and grid.png ({len(all_prompts)} rows x "
          f"{len(scales)} guidance scales) to {out}")  # fmt: skip
    return out


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
@config_errors_as_messages
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    sys.exit(main())

"""Sample images from a stage-1/2 checkpoint: ``python sample.py ckpt=PATH prompt="..."`` (or ``prompts=FILE``).

Writes one PNG per image, ``metadata.jsonl`` (prompt, seed, every setting, the checkpoint) and ``grid.png`` into
the run folder (``out=``). The same seed gives the same image on the same device.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from emu.diffusion.module import load_for_sampling
from emu.diffusion.pipeline import SIGMA_SCHEDULES, generate
from emu.diffusion.prompts import read_prompts
from emu.diffusion.sampling import SAMPLERS
from emu.errors import ConfigError
from emu.utils.config import check_required, config_errors_as_messages
from emu.utils.images import image_grid
from emu.utils.sample_folder import write_sample_folder


def check_settings(cfg: DictConfig) -> list[str]:
    """The prompts, after every setting is checked (a bad one is a ConfigError before any work starts)."""
    check_required(cfg)
    if (cfg.prompt is None) == (cfg.prompts is None):
        raise ConfigError("prompt/prompts", 'give exactly one: prompt="a red circle" or prompts=FILE')
    prompts = [str(cfg.prompt)] if cfg.prompt is not None else read_prompts(cfg.prompts, "prompts")
    if cfg.limit is not None:
        prompts = prompts[: int(cfg.limit)]
    checks = {
        "sampler": (cfg.sampler in SAMPLERS, f"must be one of {list(SAMPLERS)}"),
        "schedule": (cfg.schedule in SIGMA_SCHEDULES, f"must be one of {list(SIGMA_SCHEDULES)}"),
        "steps": (1 <= int(cfg.steps) <= 1000, "must be in 1..1000"),
        "guidance": (0 <= float(cfg.guidance) <= 50, "must be in [0, 50]"),
        "guidance_rescale": (0 <= float(cfg.guidance_rescale) <= 1, "must be in [0, 1]"),
        "n": (int(cfg.n) >= 1, "must be >= 1"),
        "batch_size": (int(cfg.batch_size) >= 1, "must be >= 1"),
        "device": (cfg.device in ("auto", "cpu", "cuda"), "must be auto, cpu or cuda"),
    }
    for key, (ok, problem) in checks.items():
        if not ok:
            raise ConfigError(key, f"{problem}, got {cfg[key]!r}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "cuda was asked for but no GPU is visible")
    return prompts


def run(cfg: DictConfig) -> Path:
    prompts = check_settings(cfg)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))  # fmt: skip
    overrides = {"autoencoder": cfg.autoencoder} if cfg.autoencoder else {}
    try:
        module = load_for_sampling(cfg.ckpt, device, ema=bool(cfg.ema), **overrides)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError("ckpt", str(e)) from e
    resolution = int(cfg.resolution or module.train_resolution or 64)
    if resolution % module.resolution_multiple:
        raise ConfigError("resolution", f"{resolution} is not a multiple of {module.resolution_multiple} "
                          "(autoencoder x U-Net downsampling)")  # fmt: skip

    n = int(cfg.n)
    all_prompts = [p for p in prompts for _ in range(n)]
    seeds = [int(cfg.seed) + i for i in range(len(all_prompts))]
    autocast = torch.bfloat16 if device.type == "cuda" else None
    weights = "EMA" if cfg.ema else "raw"
    print(f"sampling {len(all_prompts)} images ({len(prompts)} prompts x {n}) at {resolution}px with {cfg.sampler}, "
          f"{cfg.steps} steps, guidance {cfg.guidance}, {weights} weights, on {device}")  # fmt: skip
    images = generate(module.denoiser, module.conditioner, module.autoencoder, all_prompts, seeds, resolution,
                      resolution, sampler=cfg.sampler, steps=int(cfg.steps), guidance=float(cfg.guidance),
                      guidance_rescale=float(cfg.guidance_rescale), schedule=cfg.schedule,
                      batch_size=int(cfg.batch_size), autocast_dtype=autocast, progress=True)  # fmt: skip

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: cfg[k] for k in ("sampler", "steps", "schedule", "guidance", "guidance_rescale", "ema")}
    write_sample_folder(out, images, all_prompts, seeds, **settings, resolution=resolution,
                        ckpt=str(Path(cfg.ckpt).resolve()), device=str(device))  # fmt: skip
    cols = min(int(cfg.grid_columns), len(images)) if n == 1 else n
    image_grid(images, nrow=max(1, cols)).save(out / "grid.png")
    print(f"wrote {len(images)} images, metadata.jsonl and grid.png ({math.ceil(len(images) / cols)} rows) to {out}")
    return out


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
@config_errors_as_messages
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    sys.exit(main())

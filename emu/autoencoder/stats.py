"""Per-channel latent statistics of any autoencoder checkpoint over any data (EDM2-style normalisation).

    python -m emu.autoencoder.stats --ckpt outputs/.../checkpoints/last.ckpt --out outputs/ae_export \
        --images 2048 data=webdataset data.source.shards='/data/{00000..00099}.tar'

Measures the mean and std per channel of what stage 1 trains on, posterior samples of ``encode(x)``
(:class:`~emu.autoencoder.module.LatentStatistics`), over ``--images`` images of the data config (any ``data.*``
override of train.py), stores them in the model and writes an export folder (``model.safetensors`` + ``config.json``,
which records how they were measured) that every later stage loads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from emu.autoencoder.model import AutoencoderKL
from emu.autoencoder.module import LatentStatistics, load_autoencoder


@torch.no_grad()
def measure_latent_statistics(
    autoencoder: AutoencoderKL, batches, max_images: int, device: str | torch.device = "cpu", progress: bool = True
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(mean, std, images used) per channel of posterior samples of ``encode(x)`` over up to ``max_images`` images."""
    stats = LatentStatistics(autoencoder.latent_channels)
    seen = 0
    autoencoder = autoencoder.to(device).eval()
    with tqdm(total=max_images, desc="latent statistics", unit="img", disable=not progress) as bar:
        for batch in batches:
            x = batch["image"][: max_images - seen].to(device)
            stats.update(autoencoder.encode(x))
            seen += x.shape[0]
            bar.update(x.shape[0])
            if seen >= max_images:
                break
    if seen == 0:
        raise ValueError("the data yielded no images")
    mean, std = stats.compute()
    return mean, std, seen


def main(argv: list[str] | None = None) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import open_dict

    from emu.utils.config import require_groups

    p = argparse.ArgumentParser(prog="python -m emu.autoencoder.stats", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="stage-0 checkpoint (.ckpt), export folder, or diffusers VAE folder")
    p.add_argument("--out", required=True, help="export folder to write (safetensors + config.json)")
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("overrides", nargs="*", help="config overrides for the data, e.g. data=webdataset ...")
    args = p.parse_args(argv)
    model = load_autoencoder(args.ckpt)
    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("train", overrides=args.overrides)
    require_groups(cfg, "data")
    with open_dict(cfg.data):
        cfg.data.require_caption = False  # statistics need images only
    datamodule = instantiate(cfg.data)
    split = "val" if datamodule.has_split("val") else "train"
    mean, std, n = measure_latent_statistics(
        model, datamodule.dataloader(split, shuffle=False), args.images, args.device
    )
    record = {"of": "posterior samples", "images": n, "split": split, "measured_by": "emu.autoencoder.stats"}
    model.set_latent_statistics(mean.to(model.latent_mean), std.to(model.latent_std), record)
    folder = model.cpu().save_pretrained(args.out)
    print(f"latent statistics over {n} {split} images: mean {mean.numpy().round(3)} std {std.numpy().round(3)}")
    print(f"wrote {folder}; skipped samples: {datamodule.skip_summary()}")


if __name__ == "__main__":
    main()

"""Reconstruction quality of stage-0 autoencoders: PSNR and SSIM (torchmetrics) on held-out images.

    python -m emu.evaluation.reconstruction outputs/demo/ae16/export outputs/demo/ae4/export \
        --images haystack:512 --sets conf/sets/mini.yaml --photos --out outputs/demo/autoencoder_eval.json

Compares any number of checkpoints (``.ckpt`` or export folders) on the same images: image folders or named image
sets (``--images``, at ``--resolution``; the miniature's held-out haystack images: ``haystack:N`` with its sets
file) and, with ``--photos``, the natural photographs
that scikit-image ships (``skimage.data``; measurement only, never training data), centre-cropped and resized to
each ``--photo-resolution``. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from emu.autoencoder.model import AutoencoderKL
from emu.autoencoder.module import load_autoencoder
from emu.data.samples import SamplePreparer
from emu.evaluation.references import reference_set
from emu.utils import named_sets

SKIMAGE_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "immunohistochemistry",
    "retina",
    "cat",
    "hubble_deep_field",
)


@torch.no_grad()
@torch.no_grad()
def reconstruct(autoencoder: AutoencoderKL, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """``decode(encode(x).mode())`` in [-1, 1], computed on the autoencoder's device, returned on the CPU."""
    autoencoder = autoencoder.eval()
    device = next(autoencoder.parameters()).device
    return torch.cat([autoencoder(x.to(device)).float().clamp(-1, 1).cpu() for x in images.split(batch_size)])


def mean_colour(x: torch.Tensor) -> torch.Tensor:
    """The simplest baseline that should lose: every pixel replaced by its image's mean colour."""
    return x.mean((-2, -1), keepdim=True).expand_as(x)


def pool_bilinear(x: torch.Tensor, factor: int = 8) -> torch.Tensor:
    """A fixed linear autoencoder at the latent grid: ``factor`` x ``factor`` average pooling (3 numbers per
    latent position), then bilinear upsampling back."""
    small = torch.nn.functional.avg_pool2d(x, factor)
    return torch.nn.functional.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)


BASELINES = {"mean colour": mean_colour, "8x8 average pool + bilinear": pool_bilinear}


@torch.no_grad()
def reconstruction_metrics(autoencoder, images: torch.Tensor, batch_size: int = 32) -> dict[str, float]:
    """PSNR (dB) and SSIM of ``decode(encode(x).mode())`` against ``x`` (images in [-1, 1], same size).

    ``autoencoder`` is an :class:`AutoencoderKL` or any map from images to reconstructions (see ``BASELINES``)."""
    psnr, ssim = PeakSignalNoiseRatio(data_range=1.0), StructuralSimilarityIndexMeasure(data_range=1.0)
    if isinstance(autoencoder, torch.nn.Module):
        autoencoder = autoencoder.eval()
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size]
        recon = autoencoder(x).clamp(-1, 1)
        psnr.update((recon + 1) / 2, (x + 1) / 2)
        ssim.update((recon + 1) / 2, (x + 1) / 2)
    return {"psnr": float(psnr.compute()), "ssim": float(ssim.compute()), "images": len(images)}


def photo_images(resolution: int, names: tuple[str, ...] = SKIMAGE_PHOTOS) -> torch.Tensor:
    try:
        from skimage import data as skdata
    except ImportError as e:
        raise SystemExit("--photos needs scikit-image (pip install scikit-image; it is in requirements-dev.txt)") from e
    prepare = SamplePreparer(resolution=resolution, require_caption=False)
    out = []
    for name in names:
        array = getattr(skdata, name)()
        if array.ndim == 2:
            array = np.stack([array] * 3, -1)
        out.append(prepare({"key": name, "image": Image.fromarray(array[..., :3].astype(np.uint8))})["image"])
    return torch.stack(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m emu.evaluation.reconstruction", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", help="stage-0 checkpoints (.ckpt) or export folders")
    p.add_argument("--images", nargs="*", default=[], help="image folders or named image sets (haystack:512)")
    p.add_argument("--sets", help="a YAML of named sets to register (conf/sets/mini.yaml: the miniature's)")
    p.add_argument("--resolution", type=int, default=64, help="the --images' resolution")
    p.add_argument("--photos", action="store_true", help="also the photographs in skimage.data")
    p.add_argument("--photo-resolution", type=int, nargs="+", default=[64, 256])
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)

    if args.sets:
        named_sets.register(yaml.safe_load(Path(args.sets).read_text()))
    sets: dict[str, torch.Tensor] = {}
    for spec in args.images:
        sets[f"{spec}@{args.resolution}"] = reference_set(spec, args.resolution, "--images")[1]()
    if args.photos:
        for r in args.photo_resolution:
            sets[f"photos@{r}"] = photo_images(r)
    results = []
    for ckpt in args.checkpoints:
        model = load_autoencoder(ckpt)
        row = {"checkpoint": str(ckpt), "latent_channels": model.latent_channels}
        for name, images in sets.items():
            row[name] = reconstruction_metrics(model, images)
        results.append(row)
    header = f"{'checkpoint':<48} {'ch':>3} " + " ".join(f"{n + ' PSNR/SSIM':>24}" for n in sets)
    print(header)
    for row in results:
        cells = " ".join(f"{row[n]['psnr']:>14.2f} / {row[n]['ssim']:.3f}" for n in sets)
        print(f"{Path(row['checkpoint']).as_posix()[-48:]:<48} {row['latent_channels']:>3} {cells}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results))


if __name__ == "__main__":
    main()

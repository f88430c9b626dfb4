"""Sampling seconds per image at 20 and 50 steps through our pipeline (``emu.diffusion.pipeline.generate``).

    python bench/sampling.py --config mini                                   # CPU, fp32 (make bench)
    python bench/sampling.py --config paper_reduced --device cuda --dtype bfloat16 --images 8
    python bench/sampling.py --config paper_reduced --device cuda --dtype bfloat16 --resolution 1024 --images 2

What is timed is ``generate`` itself: the sampler (DPM++ 2M, Karras sigmas by default) driving the denoiser with
classifier-free guidance (both halves in one batched U-Net call), then the autoencoder's decode. The networks are
randomly initialised at the configs of bench/unet_step.py and bench/autoencoder_step.py (``mini``: the mini U-Net
over the mini autoencoder at 64px; ``paper_reduced``: the reduced-depth paper U-Net over the paper autoencoder at
256px; ``tiny``: seconds, for the smoke test); ``--resolution`` samples at another side (the paper's: 1024).
The text encoders are NOT timed: a stand-in conditioner returns fixed random context, mask and pooled embeddings of
the config's token count and width (encoding a batch of prompts once is small next to 2 x steps U-Net calls, and
depends on CLIP / T5, not on this code).
Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from autoencoder_step import autoencoder_kwargs
from common import device_info, emit, median, print_table, sync
from unet_step import CONFIGS as UNET_CONFIGS
from unet_step import make_inputs, unet_kwargs

CONFIGS = {  # U-Net config (bench/unet_step.py), autoencoder config (bench/autoencoder_step.py), parameterization
    "tiny": dict(unet="tiny", autoencoder="tiny", resolution=16, parameterization="v", images=2),
    "mini": dict(unet="mini", autoencoder="mini", resolution=64, parameterization="v", images=8),
    "paper_reduced": dict(unet="paper_reduced", autoencoder="paper", resolution=256, parameterization="eps", images=8),
}


class RandomConditioner:
    """Stands in for :class:`~emu.text.conditioner.TextConditioner` at sampling: fixed random embeddings."""

    def __init__(self, unet: dict, tokens: int, device):
        self.unet, self.tokens, self.device = unet, tokens, device

    def _batch(self, n: int, seed: int):
        from emu.text.conditioner import Conditioning

        i = make_inputs(self.unet, n, 1, self.tokens, seed=seed)
        pooled = None if i["pooled"] is None else i["pooled"].to(self.device)
        return Conditioning(i["context"].to(self.device), i["mask"].to(self.device), pooled)

    def condition(self, prompts: list[str]):
        return self._batch(len(prompts), seed=1)

    def unconditional_batch(self, n: int):
        return self._batch(n, seed=2)


def build(name: str, device):
    from emu.autoencoder.model import AutoencoderKL
    from emu.diffusion.denoiser import Denoiser
    from emu.diffusion.noise import DiscreteSchedule, scaled_linear_alphas_cumprod
    from emu.diffusion.unet import UNet

    c = CONFIGS[name]
    torch.manual_seed(0)
    kw = unet_kwargs(c["unet"])
    unet = UNet(**kw).to(device).eval()
    autoencoder = AutoencoderKL(**autoencoder_kwargs(c["autoencoder"])).to(device).eval()
    schedule = DiscreteSchedule(scaled_linear_alphas_cumprod()).to(device)
    denoiser = Denoiser(unet, c["parameterization"], schedule)
    return denoiser, RandomConditioner(kw, UNET_CONFIGS[c["unet"]]["tokens"], device), autoencoder


def run(args) -> dict:
    from emu.diffusion.pipeline import generate

    device = torch.device(args.device)
    c = CONFIGS[args.config]
    images = args.images or c["images"]
    resolution = args.resolution or c["resolution"]
    denoiser, conditioner, autoencoder = build(args.config, device)
    if args.compile:
        denoiser.net = torch.compile(denoiser.net)
    dtype = None if args.dtype == "float32" else getattr(torch, args.dtype)
    prompts, seeds = ["a prompt"] * images, list(range(images))

    def sample(steps: int) -> float:
        sync(device)
        t0 = time.perf_counter()
        generate(denoiser, conditioner, autoencoder, prompts, seeds, resolution, resolution,
                 sampler=args.sampler, steps=steps, guidance=args.guidance, batch_size=images, autocast_dtype=dtype,
                 progress=False)  # fmt: skip
        sync(device)
        return time.perf_counter() - t0

    sample(2)  # warm-up (and compilation)
    latent = resolution // autoencoder.downsample_factor
    z = torch.randn(images, autoencoder.latent_channels, latent, latent, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        sync(device)
        t0 = time.perf_counter()
        autoencoder.decode(z)
        sync(device)
        decode = time.perf_counter() - t0
    rows = []
    for steps in args.steps:
        seconds = median([sample(steps) for _ in range(args.repeats)])
        per_image, per_second = round(seconds / images, 4), round(images / seconds, 3)
        rows.append({"steps": steps, "seconds_per_image": per_image, "images_per_second": per_second})
    return {
        "bench": "sampling", "config": args.config, "device": device_info(device), "dtype": args.dtype,
        "compile": args.compile, "sampler": args.sampler, "guidance": args.guidance, "images": images,
        "resolution": resolution, "unet_params": sum(p.numel() for p in denoiser.net.parameters()),
        "repeats": args.repeats, "decode_seconds_per_image": round(decode / images, 4), "results": rows,
        "note": "random weights; text encoding not timed (a stand-in conditioner gives random embeddings)",
    }  # fmt: skip


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="mini")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="autocast dtype")
    p.add_argument("--compile", action="store_true", help="torch.compile the U-Net")
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--steps", type=int, nargs="+", default=[20, 50])
    p.add_argument("--images", type=int, default=None, help="images per batch (default: the config's)")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the config's)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per step count (median)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    r = run(parse(argv))
    what = f"{r['images']} images at {r['resolution']}px in one batch, {r['sampler']}, guidance {r['guidance']}"
    print(f"Sampling, config {r['config']}: {what}, U-Net {r['unet_params'] / 1e6:.3g}M parameters, {r['dtype']}")
    print(r["device"])
    print_table(r["results"])
    print(f"of which decoding: {r['decode_seconds_per_image']} s per image")
    print(f"note: {r['note']}")
    return emit(r)


if __name__ == "__main__":
    main()

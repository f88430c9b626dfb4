"""Autoencoder training step (encode + decode + L1 + backward + AdamW): ours vs diffusers' ``AutoencoderKL``.

    python bench/autoencoder_step.py --config mini                           # CPU, fp32 (make bench)
    python bench/autoencoder_step.py --config paper --device cuda --dtype bfloat16 --channels-last --compile \
        --fused --tf32 --diffusers-eager

The same protocol as bench/unet_step.py (same weights via ``emu.autoencoder.convert``, outputs checked equal in
fp32, alternating rounds, median images/s, ratio, CUDA peak memory, MFU). The latent is the posterior's mode in
both, so both compute the same function; the loss is L1 to the input (the adversarial / LPIPS / KL terms of
stage 0 are left out: they are not the network). Our configs' Fourier-feature input has no diffusers counterpart,
so both run without it (``fourier_frequencies: []``).

Configs: ``tiny`` (seconds, for the smoke test), ``mini`` (conf/model/autoencoder_mini.yaml, 64px, batch 16) and
``paper`` (conf/model/autoencoder.yaml: 16 latent channels, widths 128/256/512/512, 256px, batch 8).
Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compare, emit, parse, print_comparison, quiet_diffusers

ROOT = Path(__file__).resolve().parents[1]
TINY_AE = dict(latent_channels=4, block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4)
CONFIGS = {  # autoencoder: kwargs or conf/model files merged in order; image side, batch
    "tiny": dict(autoencoder=TINY_AE, resolution=16, batch=2),
    "mini": dict(autoencoder=["autoencoder", "autoencoder_mini"], resolution=64, batch=16),
    "paper": dict(autoencoder=["autoencoder"], resolution=256, batch=8),
}


def autoencoder_kwargs(name: str) -> dict:
    c = CONFIGS[name]["autoencoder"]
    if isinstance(c, dict):
        return dict(c)
    kw = OmegaConf.to_container(
        OmegaConf.merge(*(OmegaConf.load(ROOT / f"conf/model/{f}.yaml").autoencoder for f in c))
    )
    kw.pop("_target_")  # AutoencoderKL: the miniature's patch-shortcut subclass has no diffusers twin
    # the diffusers-shaped part only: Fourier features have no diffusers twin either
    kw.update(fourier_frequencies=[], gradient_checkpointing=False)
    return kw


def make_inputs(resolution: int, batch: int, seed: int = 0) -> dict:
    x = torch.rand(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return {"x": x, "target": x}


def ours_forward(ae):
    return lambda i: ae.decode(ae.encode(i["x"]).mode())


def diffusers_forward(vae):
    return lambda i: vae.decode(vae.encode(i["x"]).latent_dist.mode()).sample


def run(args) -> dict:
    from emu.autoencoder.convert import to_diffusers
    from emu.autoencoder.model import AutoencoderKL

    quiet_diffusers()
    c, kw = CONFIGS[args.config], autoencoder_kwargs(args.config)
    batch = args.batch or c["batch"]
    torch.manual_seed(0)
    ours = AutoencoderKL(**kw)
    nets = {"ours": ours.to(args.device).train(), "diffusers": to_diffusers(ours).to(args.device).train()}
    forwards = {"ours": ours_forward, "diffusers": diffusers_forward}
    summary = compare(nets, forwards, make_inputs(c["resolution"], batch), lambda: AutoencoderKL(**kw), batch, args,
                      loss=F.l1_loss)  # fmt: skip
    r = {"bench": "autoencoder_step", **summary, "resolution": c["resolution"],
         "notes": ["both without Fourier-feature input (no diffusers counterpart)"]}  # fmt: skip
    if torch.device(args.device).type != "cuda":
        r["notes"].append("peak memory is measured on CUDA only")
    return r


def main(argv: list[str] | None = None) -> dict:
    r = run(parse(argv, CONFIGS, "mini", __doc__))
    print_comparison(r, f"Autoencoder training step, config {r['config']}: batch {r['batch']} at {r['resolution']}px, "
                        f"{r['params'] / 1e6:.3g}M parameters, {r['dtype']}")  # fmt: skip
    return emit(r)


if __name__ == "__main__":
    main()

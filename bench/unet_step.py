"""U-Net training step (forward + backward + AdamW): ours vs diffusers' ``UNet2DConditionModel``.

    python bench/unet_step.py --config mini                                  # CPU, fp32 (make bench)
    python bench/unet_step.py --config paper_reduced --device cuda --dtype bfloat16 --channels-last --compile \
        --fused --tf32 --diffusers-eager                                     # the issue's GPU target setting

Both networks have the same config and the same weights (ours converted with ``emu.diffusion.convert``), get the
same inputs (latents, timesteps, a padded context with its mask, a pooled embedding) and are checked to compute
the same outputs in fp32 first. They are timed in the same process, taking turns round by round; the reported
images/s is the median over rounds. ``--compile``, ``--channels-last`` and ``--fused`` apply to both unless
``--diffusers-eager`` (then diffusers runs eager, contiguous, with the default AdamW). Peak memory (CUDA only) is
weights + optimizer state + the peak above them during the contender's own rounds. FLOPs per step are counted once
on the meta device (model FLOPs, the same function for both); MFU divides achieved FLOP/s by the device's peak
(``--peak-flops``, else Lightning's table for the GPU: H100 SXM bf16 989 TFLOP/s).

Configs: ``tiny`` (seconds, for the smoke test), ``mini`` (conf/model/unet/mini.yaml, 8x8 latents = 64px, batch
64, 32 CLIP + 128 T5 tokens of width 128) and ``paper_reduced`` (emu_2p8b block shapes with 2 ResNets per level
and transformer depths 0/1/2, ~1.2B parameters, 32x32 latents = 256px, 77 + 128 tokens of width 2048).
Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compare, emit, parse, print_comparison, quiet_diffusers

ROOT = Path(__file__).resolve().parents[1]
TINY_UNET = dict(in_channels=4, out_channels=4, block_channels=[32, 64], layers_per_block=1, transformer_depth=[0, 1],
                 head_dim=16, context_dim=24, pooled_dim=12, norm_groups=8)  # fmt: skip
CONFIGS = {  # unet: kwargs or a conf/model/unet file; latent side, batch, context tokens
    "tiny": dict(unet=TINY_UNET, latent=8, batch=4, tokens=8),
    "mini": dict(unet="mini", latent=8, batch=64, tokens=32 + 128),
    "paper_reduced": dict(unet="emu_2p8b", latent=32, batch=8, tokens=77 + 128),
}
REDUCED = dict(layers_per_block=2, transformer_depth=[0, 1, 2])  # emu_2p8b: 3 and [0, 2, 5]; 2.86B -> 1.20B params


def unet_kwargs(name: str) -> dict:
    c = CONFIGS[name]
    if isinstance(c["unet"], dict):
        return dict(c["unet"])
    kw = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / "unet" / f"{c['unet']}.yaml"))
    kw.update(REDUCED if name == "paper_reduced" else {}, gradient_checkpointing=False)
    return kw


def make_inputs(kw: dict, batch: int, latent: int, tokens: int, seed: int = 0) -> dict:
    """Latents, timesteps, a context padded per sample (mask True on real tokens), pooled, a regression target."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(tokens // 4, 1), tokens + 1, (batch,), generator=g)
    return {
        "x": torch.randn(batch, kw["in_channels"], latent, latent, generator=g),
        "t": torch.rand(batch, generator=g) * 999,
        "context": torch.randn(batch, tokens, kw["context_dim"], generator=g),
        "mask": torch.arange(tokens)[None] < lengths[:, None],
        "pooled": torch.randn(batch, kw["pooled_dim"], generator=g) if kw.get("pooled_dim") else None,
        "target": torch.randn(batch, kw["out_channels"], latent, latent, generator=g),
    }


def ours_forward(net):
    return lambda i: net(i["x"], i["t"], i["context"], i["mask"], pooled=i["pooled"])


def diffusers_forward(net):  # the conversion's conventions: a float 0/1 attention mask, pooled as class labels
    return lambda i: net(i["x"], i["t"], encoder_hidden_states=i["context"], encoder_attention_mask=i["mask"].float(),
                         class_labels=i["pooled"]).sample  # fmt: skip


def run(args) -> dict:
    from emu.diffusion.convert import to_diffusers
    from emu.diffusion.unet import UNet

    quiet_diffusers()
    c, kw = CONFIGS[args.config], unet_kwargs(args.config)
    batch = args.batch or c["batch"]
    torch.manual_seed(0)
    ours = UNet(**kw)
    nets = {"ours": ours.to(args.device).train(), "diffusers": to_diffusers(ours).to(args.device).train()}
    forwards = {"ours": ours_forward, "diffusers": diffusers_forward}
    inputs = make_inputs(kw, batch, c["latent"], c["tokens"])
    summary = compare(nets, forwards, inputs, lambda: UNet(**kw), batch, args)
    r = {"bench": "unet_step", **summary, "latent": c["latent"], "tokens": c["tokens"]}
    if torch.device(args.device).type != "cuda":
        r["notes"] = ["peak memory is measured on CUDA only (a CPU process's RSS high-water mark is not per model)"]
    return r


def main(argv: list[str] | None = None) -> dict:
    r = run(parse(argv, CONFIGS, "mini", __doc__))
    size = f"{r['latent']}x{r['latent']} latents, {r['tokens']} tokens, {r['params'] / 1e6:.3g}M parameters"
    print_comparison(r, f"U-Net training step, config {r['config']}: batch {r['batch']}, {size}, {r['dtype']}")
    return emit(r)


if __name__ == "__main__":
    main()

"""How far the data path goes: per-image cost of each web-scale stage at paper scale, and hours for a corpus on N GPUs.

    python bench/web_scale.py                                   # 1.1B images, 64 / 256 / 1024 GPUs (H100, 40% MFU)
    python bench/web_scale.py --images 1.1e9 --gpus 512 --mfu 0.3 --cpu-per-gpu 12

The frozen networks' forward FLOPs per image are counted on the meta device (nothing allocated): the paper-scale
autoencoder's encoder (conf/model/autoencoder.yaml) at 256 / 512 / 1024 px, T5-XXL's encoder (v1.1 shapes) over 128
tokens, CLIP ViT-L/14's text tower over 77 tokens and its image tower at 224 px. GPU time is FLOPs / (peak x MFU); CPU
work (decoding, OCR, the near-duplicate search: one pass, or in cells) uses the per-core rates measured on this
machine's CPU (flags; docs/benchmarks.md says where they come from) spread over ``--cpu-per-gpu`` cores per GPU. Prints
a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit

ROOT = Path(__file__).resolve().parents[1]


def forward_flops(build, make_input) -> int:
    """FLOPs of one forward pass, counted on the meta device."""
    with torch.device("meta"):
        net = build().eval()
        x = make_input()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(*x) if isinstance(x, tuple) else net(x)
    return int(counter.get_total_flops())


def autoencoder_encoder(side: int) -> int:
    from emu.autoencoder.model import AutoencoderKL

    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/autoencoder.yaml").autoencoder)
    cfg.pop("_target_")

    class Encode(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ae = AutoencoderKL(**cfg)

        def forward(self, x):
            return self.ae.encode(x).mean

    return forward_flops(Encode, lambda: torch.zeros(1, 3, side, side))


def t5_xxl_encoder(tokens: int = 128) -> int:
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        d_model=4096,
        d_ff=10240,
        d_kv=64,
        num_heads=64,
        num_layers=24,
        vocab_size=32128,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
    )  # fmt: skip (google/t5-v1_1-xxl's)
    return forward_flops(lambda: T5EncoderModel(cfg), lambda: torch.zeros(1, tokens, dtype=torch.long))


def clip_vit_l14() -> tuple[int, int]:
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    text = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          projection_dim=768)  # fmt: skip
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              patch_size=14, image_size=224, projection_dim=768)  # fmt: skip
    t = forward_flops(lambda: CLIPTextModelWithProjection(text), lambda: torch.zeros(1, 77, dtype=torch.long))
    v = forward_flops(lambda: CLIPVisionModelWithProjection(vision), lambda: torch.zeros(1, 3, 224, 224))
    return t, v


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=float, default=1.1e9, help="corpus size (the paper: 1.1B image-text pairs)")
    p.add_argument("--gpus", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--peak-tflops", type=float, default=989.0, help="per GPU (H100 SXM dense bf16)")
    p.add_argument("--mfu", type=float, default=0.4, help="fraction of peak the frozen networks reach")
    p.add_argument("--cpu-per-gpu", type=int, default=12, help="CPU cores beside each GPU")
    p.add_argument(
        "--decode-per-core",
        type=float,
        default=298.0,
        help="images/s one core decodes, resizes and crops (docs/benchmarks.md: 512px JPEG -> 256px)",
    )
    p.add_argument("--ocr-per-core", type=float, default=None, help="images/s of Tesseract per core (measured)")
    p.add_argument(
        "--ann-per-core",
        type=float,
        default=None,
        help="near-duplicate search: images/s of the HNSW index (one thread, measured)",
    )
    p.add_argument(
        "--cells-per-core",
        type=float,
        default=None,
        help="near-duplicate search in cells (stages.near_duplicates.cells): images/s per core, probe included "
        "(measured); the cells spread over every rank's cores",
    )
    p.add_argument(
        "--ocr-fraction",
        type=float,
        default=0.3,
        help="the share of the corpus OCR sees (it runs after the cheaper filters)",
    )
    args = p.parse_args(argv)

    ae = {side: autoencoder_encoder(side) for side in (256, 512, 1024)}
    t5 = t5_xxl_encoder()
    clip_text, clip_image = clip_vit_l14()
    rate = args.peak_tflops * 1e12 * args.mfu
    gpu_stages = {
        "precompute 256px: autoencoder + CLIP-L text + T5-XXL": ae[256] + clip_text + t5,
        "precompute 1024px: autoencoder + CLIP-L text + T5-XXL": ae[1024] + clip_text + t5,
        "curation: CLIP ViT-L/14 image + text (CLIP score, aesthetic)": clip_image + clip_text,
    }
    print("forward GFLOPs per image: " + ", ".join(f"autoencoder encoder {s}px {f / 1e9:.0f}" for s, f in ae.items())
          + f", T5-XXL encoder (128 tokens) {t5 / 1e9:.0f}, CLIP-L text {clip_text / 1e9:.1f}, "
          f"CLIP-L/14 image {clip_image / 1e9:.0f}")  # fmt: skip
    cpu_stages = {"decode + resize + crop (CPU)": (args.decode_per_core, 1.0)}
    if args.ocr_per_core:
        name = f"OCR, Tesseract (CPU; {args.ocr_fraction:.0%} of the images)"
        cpu_stages[name] = (args.ocr_per_core, args.ocr_fraction)
    if args.ann_per_core:
        cpu_stages["near-duplicate HNSW search (CPU; one ordered pass, one index)"] = (args.ann_per_core, 1.0)
    if args.cells_per_core:
        cpu_stages["near-duplicate search in cells (CPU; the cells over all ranks)"] = (args.cells_per_core, 1.0)
    rows = []
    header = "| stage | per image | " + " | ".join(f"hours on {n} GPUs" for n in args.gpus) + " |"
    print(f"\n{args.images:.3g} images; GPUs at {args.peak_tflops:g} TFLOP/s x {args.mfu:.0%} MFU, "
          f"{args.cpu_per_gpu} CPU cores per GPU\n\n{header}\n|" + " --- |" * (2 + len(args.gpus)))  # fmt: skip
    for name, flops in gpu_stages.items():
        hours = [args.images * flops / (n * rate) / 3600 for n in args.gpus]
        rows.append({"stage": name, "gflops_per_image": round(flops / 1e9, 1), "hours": [round(h, 2) for h in hours]})
        print(f"| {name} | {flops / 1e9:.0f} GFLOP | " + " | ".join(f"{h:.1f}" for h in hours) + " |")
    for name, (per_core, share) in cpu_stages.items():
        single = "one index" in name  # one ordered pass: it does not spread over ranks
        hours = [args.images * share / (per_core * (1 if single else n * args.cpu_per_gpu)) / 3600 for n in args.gpus]
        rows.append({"stage": name, "images_per_core_s": per_core, "hours": [round(h, 2) for h in hours]})
        print(f"| {name} | {per_core:.0f} img/s per core | " + " | ".join(f"{h:.1f}" for h in hours) + " |")
    return emit({"benchmark": "web_scale", "images": args.images, "gpus": args.gpus, "mfu": args.mfu,
                 "autoencoder_gflops": {s: round(f / 1e9, 1) for s, f in ae.items()},
                 "t5_xxl_gflops": round(t5 / 1e9, 1), "clip_text_gflops": round(clip_text / 1e9, 2),
                 "clip_image_gflops": round(clip_image / 1e9, 1), "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()

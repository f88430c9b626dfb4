"""Precompute a stage's latents and text embeddings once, into WebDataset shards (see :mod:`emu.diffusion.latents`).

    python -m emu.diffusion.precompute --out /data/latents/laion_256 experiment=stage1_pretrain \\
        data.source.shards='/data/laion/{00000..99999}.tar' model.autoencoder=outputs/autoencoder/runs/<run>/export
    python train.py experiment=stage1_pretrain data=latents data.source.shards='/data/latents/laion_256/train/*.tar' ...

The config overrides are those of ``train.py`` for the stage to be trained: its data (source, resolution) and
its model's frozen parts (``model.autoencoder``, ``model.text.encoders``) are what gets precomputed; the U-Net is
never built. Images are center-cropped and not flipped (the latents are fixed crops). Bad samples are skipped and
counted as in training. Writes ``<out>/train/*.tar``, ``<out>/val/*.tar`` (when the data has a val split) and
``<out>/precompute.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict
from tqdm import tqdm

from emu.autoencoder.module import load_autoencoder
from emu.diffusion.latents import EXTENSION, MANIFEST, pack
from emu.text.encoders import FrozenTextEncoder
from emu.utils.config import check_required, config_errors_as_messages
from emu.utils.files import atomic_write_text

CONF = Path(__file__).resolve().parents[2] / "conf"


def fingerprint(module: torch.nn.Module) -> str:
    """A short hash of a module's weights and buffers: tells one autoencoder from another."""
    h = hashlib.sha1()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _fixed_crops(cfg: DictConfig) -> DictConfig:
    """The data config with augmentation off and every sample read once, in order."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.data.hflip, cfg.data.crop, cfg.data.drop_last = 0.0, "center", False
        if "shuffle_buffer" in cfg.data.source:
            cfg.data.source.shuffle_buffer, cfg.data.source.resampled, cfg.data.source.epoch_size = 0, False, None
    return cfg


def _encoder_record(spec: dict[str, Any], encoder: FrozenTextEncoder) -> dict[str, Any]:
    return {"name_or_path": str(spec["name_or_path"]), "kind": spec.get("kind", "clip"),
            "max_length": encoder.max_length, "hidden_size": encoder.hidden_size}  # fmt: skip


@torch.no_grad()
def precompute(cfg: DictConfig, out: str | Path, shard_size: int = 1000, device: str = "cpu",
               progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Write the shards and the manifest for the data and frozen models of ``cfg``; returns the manifest."""
    import webdataset as wds

    check_required(cfg.data)
    check_required(cfg.model)
    cfg = _fixed_crops(cfg)
    out = Path(out).expanduser().resolve()
    datamodule = hydra.utils.instantiate(cfg.data)
    autoencoder = load_autoencoder(cfg.model.autoencoder).to(device).eval()
    specs = OmegaConf.to_container(cfg.model.text.encoders, resolve=True)
    encoders = {name: FrozenTextEncoder(**spec).to(device) for name, spec in specs.items()}
    cuda = torch.device(device).type == "cuda"
    autocast = torch.autocast("cuda", torch.bfloat16) if cuda else nullcontext()  # the frozen nets in bf16 on GPU

    counts, t0, latent_shape = {}, time.perf_counter(), None
    for split in ("train", "val"):
        if not datamodule.has_split(split):
            continue
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.tar"):
            old.unlink()
        n = 0
        loader = datamodule.dataloader(split, shuffle=False)
        with wds.ShardWriter(str(folder / "%05d.tar"), maxcount=shard_size, verbose=0) as sink:
            for batch in tqdm(loader, desc=f"precompute {split}", unit="batch", disable=not progress):
                with autocast:
                    posterior = autoencoder.encode(batch["image"].to(device))
                    text = {name: enc(batch["caption"]) for name, enc in encoders.items()}
                latent = torch.cat([posterior.mean, posterior.logvar], 1).float()
                latent_shape = list(latent.shape[1:])
                for i, key in enumerate(batch["key"]):
                    sink.write({"__key__": key, EXTENSION: pack(latent, text, i), "txt": batch["caption"][i],
                                "json": json.dumps(batch["meta"][i], default=str)})  # fmt: skip
                n += len(batch["key"])
        counts[split] = n
    seconds = time.perf_counter() - t0
    manifest = {
        "out": str(out),
        "counts": counts,
        "skipped": datamodule.skip_summary(),
        "resolution": int(cfg.data.resolution),
        "latent_shape": latent_shape,
        "autoencoder": str(cfg.model.autoencoder),
        "autoencoder_fingerprint": fingerprint(autoencoder),
        "encoders": {n: _encoder_record(s, encoders[n]) for n, s in specs.items()},
        "source": OmegaConf.to_container(cfg.data.source, resolve=True),
        "seconds": round(seconds, 2),
        "images_per_second": round(sum(counts.values()) / max(seconds, 1e-9), 1),
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2))
    return manifest


@config_errors_as_messages
def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m emu.diffusion.precompute", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (train/, val/, precompute.json)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("overrides", nargs="*", help="train.py config overrides, e.g. experiment=mini/stage1_pretrain")
    args = p.parse_args(argv)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=args.overrides)
    m = precompute(cfg, args.out, args.shard_size, args.device)
    print(f"wrote {m['counts']} samples to {m['out']} in {m['seconds']:.1f}s ({m['images_per_second']:.0f} img/s); "
          f"{m['skipped']}")  # fmt: skip
    return m


if __name__ == "__main__":
    main()

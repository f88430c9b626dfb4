"""Precompute a stage's latents and text embeddings once, into WebDataset shards (see :mod:`emu.diffusion.latents`).

    python -m emu.diffusion.precompute --out /data/latents/laion_256 experiment=stage1_pretrain \\
        data.source.shards='/data/laion/{00000..99999}.tar' model.autoencoder=outputs/autoencoder/runs/<run>/export
    torchrun --nproc-per-node 8 -m emu.diffusion.precompute --out ... (or srun; every rank the same command)
    python train.py experiment=stage1_pretrain data=latents data.source.shards='/data/latents/laion_256/train/*.tar' ...

The config overrides are those of ``train.py`` for the stage to be trained: its data (source, resolution, buckets) and
its model's frozen parts (``model.autoencoder``, ``model.text.encoders``) are what gets precomputed; the U-Net is
never built. Images are center-cropped (in their aspect-ratio bucket, with ``data.buckets``). When the stage trains
with ``data.hflip > 0``, each training image is also encoded flipped, with its caption's 'left' and 'right' swapped
(``data.flip_captions``): training on the shards then flips as on images (:mod:`emu.diffusion.latents`), at twice
the encoding cost here. Bad samples are skipped and counted as in training.

The data is read in pieces (:meth:`~emu.data.EmuDataModule.piece_loader`: an input shard of a stream, ``--shard-size``
indices of a map-style source); piece ``j`` of a split becomes ``<out>/<split>/<j>.tar`` and ``<j>.json`` (its counts),
so the output is the same whatever the number of ranks. Under ``torchrun``, ``srun`` or Lightning's launcher
(:mod:`emu.training.ranks`) each rank takes every ``world``-th piece, on its own GPU with the frozen networks in bf16.
Under ``make demo``'s scheduler it follows the thread budget of ``EMU_THREADS_FILE`` (:mod:`emu.training.threads`).
A finished piece is never redone: a killed job, restarted, does what is left (a piece is written to ``.partial`` and
put in place when whole). The last rank to finish writes ``<out>/precompute.json`` from the pieces' records.
``<out>/precompute.plan.json`` records what is being computed; a rerun with another autoencoder, encoders or data into
the same ``--out`` is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict
from tqdm import tqdm

from emu.autoencoder.module import load_autoencoder
from emu.data.samples import swap_left_right
from emu.diffusion.latents import EXTENSION, MANIFEST, PLAN, pack
from emu.errors import ConfigError
from emu.text.encoders import FrozenTextEncoder
from emu.training.ranks import Ranks, detect_ranks, share
from emu.training.threads import budget_from_env
from emu.utils.config import config_errors_as_messages, require_groups
from emu.utils.files import atomic_write_text

CONF = Path(__file__).resolve().parents[2] / "conf"


def fingerprint(module: torch.nn.Module) -> str:
    """A short hash of a module's weights and buffers: tells one autoencoder from another."""
    h = hashlib.sha1()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def check_precomputed(manifest: dict[str, Any], model) -> None:
    """Refuse precomputed shards (their ``manifest``) made with another autoencoder or text encoders than ``model``'s
    (a :class:`~emu.diffusion.base.TextToImageModule` about to train on them), or of latents its network cannot
    take."""
    if manifest.get("autoencoder_fingerprint") != fingerprint(model.autoencoder):
        raise ConfigError("data.source.shards", f"the precomputed latents were made with the autoencoder "
                          f"'{manifest.get('autoencoder')}', whose weights differ from model.autoencoder="
                          f"'{model.hparams.autoencoder}'; precompute again or use that autoencoder")  # fmt: skip
    factor = model.resolution_multiple // model.autoencoder.downsample_factor  # the network's own
    shapes = manifest.get("latent_shapes") or [manifest.get("latent_shape")]
    bad = [s for s in shapes if s and (s[1] % factor or s[2] % factor)]
    if bad:
        raise ConfigError("data.source.shards", f"the precomputed latents of shapes {bad} do not divide by the "
                          f"network's downsampling ({factor}x): precompute with buckets whose sides are multiples of "
                          f"{model.resolution_multiple}")  # fmt: skip
    if getattr(model, "conditioner", None) is None:  # a tokenizer reads the latents alone
        return
    encoders = model.conditioner.encoders
    ours = {n: e.max_length for n, e in encoders.items()}
    theirs = {n: e["max_length"] for n, e in manifest.get("encoders", {}).items()}
    if ours != theirs:
        raise ConfigError("model.text.encoders", f"are {ours} (name: max_length) but the precomputed embeddings "
                          f"hold {theirs}; precompute again with this model's text encoders")  # fmt: skip
    for name, record in manifest.get("encoders", {}).items():  # manifests from before fingerprints pass
        made = (record.get("hidden_state", "last"), record.get("mask_padding", True))  # older manifests: defaults
        wanted = (encoders[name].hidden_state, encoders[name].mask_padding)
        if made != wanted:
            raise ConfigError("model.text.encoders", f"the precomputed {name} embeddings are (hidden_state, "
                              f"mask_padding) = {made} but this model's {name} encoder gives {wanted}; precompute "
                              "again")  # fmt: skip
        if "fingerprint" in record and record["fingerprint"] != fingerprint(encoders[name]):
            raise ConfigError("model.text.encoders", f"the precomputed embeddings were made with the {name} "
                              f"encoder '{record['name_or_path']}', whose weights differ from this model's; "
                              "precompute again or use that encoder")  # fmt: skip


def _flips(cfg: DictConfig) -> dict[str, bool] | None:
    """Whether the training split gets flipped copies (the stage trains with flips) and whether their captions swap
    'left' and 'right'."""
    if float(cfg.data.get("hflip", 0.0)) <= 0:
        return None
    return {"captions": bool(cfg.data.get("flip_captions", True))}


def _fixed_crops(cfg: DictConfig) -> DictConfig:
    """The data config with augmentation off and every sample read once, in order."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.data.hflip, cfg.data.crop, cfg.data.drop_last = 0.0, "center", False
        if "shuffle_buffer" in cfg.data.source:
            cfg.data.source.shuffle_buffer, cfg.data.source.resampled, cfg.data.source.epoch_size = 0, False, None
    return cfg


def _encoder_record(spec: dict[str, Any], encoder: FrozenTextEncoder) -> dict[str, Any]:
    """What identifies a text encoder's embeddings: its settings and its weights (the same path may hold another
    encoder later, e.g. a retrained one)."""
    return {"name_or_path": str(spec["name_or_path"]), "kind": spec.get("kind", "clip"),
            "max_length": encoder.max_length, "hidden_size": encoder.hidden_size, "hidden_state": encoder.hidden_state,
            "mask_padding": encoder.mask_padding, "fingerprint": fingerprint(encoder)}  # fmt: skip


def _plan(cfg: DictConfig, datamodule, autoencoder: torch.nn.Module, specs: dict[str, Any],
          encoders: dict[str, Any], shard_size: int, flips: dict[str, bool] | None) -> dict[str, Any]:  # fmt: skip
    """What a precompute computes: a rerun into the same folder must compute the same (the input shards themselves,
    not only their pattern, and every setting that changes which samples pass or how they are cropped)."""
    source = datamodule.source
    inputs = [*(getattr(source, "shards", None) or []), *(getattr(source, "val_shards", None) or [])]
    sizes = {s: source.size(s) for s in ("train", "val")} if hasattr(source, "size") else None
    shards = hashlib.sha1("\n".join(map(str, inputs)).encode()).hexdigest()[:16]
    data = {"min_size": int(cfg.data.min_size), "require_caption": bool(cfg.data.require_caption),
            "split_sizes": sizes, "input_shards": len(inputs), "input_shards_sha1": shards}  # fmt: skip
    return {
        "data": data,
        "resolution": int(cfg.data.resolution),
        "buckets": OmegaConf.to_container(cfg.data.buckets, resolve=True) if cfg.data.get("buckets") else None,
        "autoencoder": str(cfg.model.autoencoder),
        "autoencoder_fingerprint": fingerprint(autoencoder),
        "encoders": {n: _encoder_record(s, encoders[n]) for n, s in specs.items()},
        "source": OmegaConf.to_container(cfg.data.source, resolve=True),
        "shard_size": shard_size,
        "flips": flips,
    }


def _check_plan(out: Path, plan: dict[str, Any], ranks: Ranks) -> None:
    """Refuse a folder that holds another precompute's pieces; rank 0 writes the plan of a new one."""
    path = out / PLAN
    if not path.is_file() and list(out.glob("*/*.tar")):
        raise ConfigError("--out", f"'{out}' holds shards but no {PLAN}: they are not this precompute's; use another "
                          "--out, or delete them")  # fmt: skip
    if not path.is_file() and not ranks.is_main:
        for _ in range(300):  # rank 0 writes it in a moment
            if path.is_file():
                break
            time.sleep(1)
    if path.is_file():
        old = json.loads(path.read_text())
        changed = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
        if changed:
            raise ConfigError("--out", f"'{out}' holds a precompute of other settings ({', '.join(changed)} differ); "
                              "use another --out, or delete it to start over")  # fmt: skip
    else:
        atomic_write_text(path, json.dumps(plan, indent=2))


def _pieces_done(folder: Path) -> dict[int, dict[str, Any]]:
    return {int(p.stem): json.loads(p.read_text()) for p in folder.glob("*.json")} if folder.is_dir() else {}


def _skips(records: list[dict[str, Any]]) -> str:
    skipped = sum((Counter(r["skipped"]) for r in records), Counter())
    return ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) or "no samples skipped"


def _encode(autoencoder: torch.nn.Module, encoders: dict[str, FrozenTextEncoder], images: torch.Tensor,
            captions: list[str]) -> tuple[torch.Tensor, dict[str, Any]]:  # fmt: skip
    """A batch's posterior moments (mean and log-variance on the channel axis, fp32) and text embeddings."""
    posterior = autoencoder.encode(images)
    text = {name: enc(captions) for name, enc in encoders.items()}
    return torch.cat([posterior.mean, posterior.logvar], 1).float(), text


@torch.no_grad()
def precompute(cfg: DictConfig, out: str | Path, shard_size: int = 1000, device: str = "cpu", progress: bool = True,
               ranks: Ranks | None = None) -> dict[str, Any] | None:  # fmt: skip
    """Write this rank's pieces (all, in a single process) and, when every piece is done, the manifest; returns the
    manifest, or None when other ranks' pieces are still missing."""
    import webdataset as wds

    require_groups(cfg, "data", "model")
    flips = _flips(cfg)
    cfg, ranks = _fixed_crops(cfg), ranks or Ranks()
    out = Path(out).expanduser().resolve()
    datamodule = hydra.utils.instantiate(cfg.data)
    autoencoder = load_autoencoder(cfg.model.autoencoder).to(device).eval()
    specs = OmegaConf.to_container(cfg.model.text.encoders, resolve=True)
    encoders = {name: FrozenTextEncoder(**spec).to(device) for name, spec in specs.items()}
    cuda = torch.device(device).type == "cuda"
    autocast = torch.autocast("cuda", torch.bfloat16) if cuda else nullcontext()  # the frozen nets in bf16 on GPU
    plan = _plan(cfg, datamodule, autoencoder, specs, encoders, shard_size, flips)
    out.mkdir(parents=True, exist_ok=True)
    _check_plan(out, plan, ranks)

    splits = [split for split in ("train", "val") if datamodule.has_split(split)]
    pieces = [(split, j) for split in splits for j in range(datamodule.num_pieces(split, shard_size))]
    done = {split: _pieces_done(out / split) for split in splits}
    todo = [(split, j) for split, j in share(pieces, ranks) if j not in done[split]]
    t0, budget = time.perf_counter(), budget_from_env()
    with tqdm(total=len(todo), desc=f"precompute ({ranks.describe()})", unit="piece", disable=not progress) as bar:
        for split, j in todo:
            folder = out / split
            folder.mkdir(exist_ok=True)
            tar, partial = folder / f"{j:05d}.tar", folder / f"{j:05d}.tar.partial"
            before, t, n, shapes = datamodule.skipped[split], time.perf_counter(), 0, set()
            with wds.TarWriter(str(partial)) as sink:
                for batch in datamodule.piece_loader(split, j, shard_size):
                    if budget is not None:  # a scheduler beside us may change our share of the cores
                        budget.apply()
                    images = batch["image"].to(device)
                    with autocast:
                        latent, text = _encode(autoencoder, encoders, images, batch["caption"])
                        flipped = None
                        if flips and split == "train":
                            captions = batch["caption"]
                            captions = [swap_left_right(c) for c in captions] if flips["captions"] else captions
                            flipped = _encode(autoencoder, encoders, images.flip(-1), captions)
                    shapes.add(tuple(latent.shape[1:]))
                    for i, key in enumerate(batch["key"]):
                        sink.write({"__key__": key, EXTENSION: pack(latent, text, i, flipped),
                                    "txt": batch["caption"][i],
                                    "json": json.dumps(batch["meta"][i], default=str)})  # fmt: skip
                    n += len(batch["key"])
                    bar.set_postfix(images=n, refresh=False)
            os.replace(partial, tar)
            record = {"count": n, "skipped": dict(datamodule.skipped[split] - before), "rank": ranks.rank,
                      "latent_shapes": sorted(map(list, shapes)),
                      "seconds": round(time.perf_counter() - t, 3)}  # fmt: skip
            atomic_write_text(folder / f"{j:05d}.json", json.dumps(record))
            bar.update()
    seconds = time.perf_counter() - t0
    done = {split: _pieces_done(out / split) for split in splits}
    missing = [(s, j) for s, j in pieces if j not in done[s]]
    if missing:
        print(f"{ranks.describe()}: my pieces are done; {len(missing)} of {len(pieces)} are another rank's and not "
              "done yet: the last rank to finish writes the manifest")  # fmt: skip
        return None
    records = [r for split in splits for r in done[split].values()]
    if not any(r["count"] for r in records):
        raise ConfigError("data", f"no usable samples were read ({_skips(records)}): check the data settings")
    shapes = sorted({tuple(s) for r in records for s in r["latent_shapes"]})
    busy = sum(r["seconds"] for r in records)
    manifest = {
        "out": str(out),
        **plan,
        "counts": {split: sum(r["count"] for r in done[split].values()) for split in splits},
        "pieces": {split: len(done[split]) for split in splits},
        "skipped": _skips(records),
        "latent_shape": list(shapes[0]) if len(shapes) == 1 else None,
        "latent_shapes": [list(s) for s in shapes],
        "seconds": round(seconds, 2),  # the wall time of the rank that wrote this
        "images_per_second_per_rank": round(sum(r["count"] for r in records) / max(busy, 1e-9), 1),
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2))
    return manifest


@config_errors_as_messages
def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m emu.diffusion.precompute", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (train/, val/, precompute.json)")
    p.add_argument("--shard-size", type=int, default=1000,
                   help="samples per piece (one output shard each) of a map-style source; a shard source's pieces "
                        "are its input shards")  # fmt: skip
    p.add_argument("--device", default=None, help="default: this rank's GPU (cuda:LOCAL_RANK), else cpu")
    p.add_argument("--rank", type=int, default=None, help="this process's rank (default: from the launcher)")
    p.add_argument("--world-size", type=int, default=None, help="how many ranks share the work (with --rank)")
    p.add_argument("overrides", nargs="*", help="train.py config overrides, e.g. experiment=mini/stage1_pretrain")
    args = p.parse_args(argv)
    ranks = detect_ranks(args.rank, args.world_size)
    device = args.device or (f"cuda:{ranks.local_rank}" if torch.cuda.is_available() else "cpu")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=args.overrides)
    m = precompute(cfg, args.out, args.shard_size, device, ranks=ranks)
    if m is not None:
        print(f"wrote {m['counts']} samples in {sum(m['pieces'].values())} shards to {m['out']} "
              f"({m['images_per_second_per_rank']:.0f} img/s per rank); {m['skipped']}")  # fmt: skip
    return m


if __name__ == "__main__":
    main()

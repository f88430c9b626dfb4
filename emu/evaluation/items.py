"""What ``eval.py`` evaluates: an *item* is a stage-1/2 checkpoint (its images are generated here as ``sample.py``
does: a diffusion model's through :func:`~emu.diffusion.pipeline.generate`, a masked transformer's by its decoding),
a sample folder (:mod:`emu.utils.sample_folder`), or a stage-0 autoencoder (checkpoint or export folder;
reconstruction metrics instead). Two text-to-image items are compared pair by pair on the same prompts and seeds.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from emu.autoencoder.module import load_autoencoder
from emu.diffusion.export import is_export
from emu.diffusion.pipeline import SamplingSettings
from emu.errors import ConfigError
from emu.maskgit.module import load_text_to_image
from emu.maskgit.tokenizer import is_tokenizer_checkpoint, load_round_trip
from emu.utils.checkpoint_header import header
from emu.utils.sample_folder import is_sample_folder, read_sample_folder, write_sample_folder


@dataclass
class Generated:
    """Images of one text-to-image item with the prompt and seed of each."""

    name: str
    source: str
    images: torch.Tensor
    prompts: list[str]
    seeds: list[int]
    settings: dict[str, Any] = field(default_factory=dict)
    autoencoder: Any = None  # the model's own, when generated here (sample folders have none)


def item_kind(path: str | Path) -> str:
    """``samples`` (a sample.py folder), ``diffusion``, ``maskgit`` or ``autoencoder`` (a checkpoint or an export
    folder; a masked transformer's tokenizer checkpoint is one too: :func:`load_reconstructor`)."""
    path = Path(path).expanduser()
    if path.is_dir():
        if is_sample_folder(path):
            return "samples"
        if is_export(path):
            return "diffusion"
        if (path / "config.json").is_file():
            return "autoencoder"
        raise ConfigError("a/b", f"'{path}' is neither a sample folder (metadata.jsonl) nor an export folder")
    if not path.is_file():
        raise ConfigError("a/b", f"'{path}' does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:
        raise ConfigError("a/b", f"'{path}' is not a readable checkpoint ({type(e).__name__}: {e})") from e
    kind = header(ckpt).get("kind")
    if kind == "tokenizer":  # measured as an autoencoder: images through it and the autoencoder under it
        return "autoencoder"
    if kind not in ("diffusion", "maskgit", "autoencoder"):
        raise ConfigError("a/b", f"'{path}' is a {kind or 'non-emu'} checkpoint; eval.py takes diffusion, maskgit, "
                          "autoencoder or tokenizer checkpoints, or sample.py folders")  # fmt: skip
    return kind


def load_reconstructor(path: str | Path) -> torch.nn.Module:
    """What maps an image to its reconstruction for an ``autoencoder`` item: a stage-0 autoencoder, or a tokenizer's
    round trip through its autoencoder (:class:`~emu.maskgit.tokenizer.TokenRoundTrip`)."""
    return load_round_trip(path) if is_tokenizer_checkpoint(path) else load_autoencoder(path)


def load_samples(folder: str | Path, name: str) -> Generated:
    """A sample.py folder: its images ([-1, 1]), prompts, seeds and settings."""
    images, rows = read_sample_folder(folder)
    settings = {k: v for k, v in rows[0].items() if k not in ("file", "prompt", "seed")} if rows else {}
    return Generated(name, str(folder), images, [r["prompt"] for r in rows], [int(r["seed"]) for r in rows], settings)


def generate_from_checkpoint(path: str | Path, name: str, prompts: list[str], seeds: list[int],
                             sampling: SamplingSettings, device: torch.device) -> Generated:  # fmt: skip
    """Images of a stage-1/2 checkpoint (diffusion or maskgit) with ``sampling`` (EMA weights unless ``sampling.ema``
    is false)."""
    module = load_text_to_image(path, device, ema=sampling.ema, key="a/b")
    sampling = replace(sampling, ema=module.sampled_weights == "ema")  # what was used (an export holds one set)
    res = int(sampling.resolution or module.train_resolution or 64)
    height, width = sampling.image_size(res, module.resolution_multiple, module.downsampling)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    print(f"[eval] {name}: sampling {len(prompts)} images at {width}x{height} from {path}")
    sampling = replace(sampling, resolution=res, height=height, width=width)
    images = module.sample(prompts, seeds, sampling, autocast_dtype=autocast, progress=True)
    return Generated(name, str(path), images, prompts, seeds, sampling.as_dict(), module.autoencoder)


def check_paired(a: Generated, b: Generated) -> None:
    """Refuse a paired comparison of items made from different prompts or seeds."""
    for what in ("prompts", "seeds"):
        x, y = getattr(a, what), getattr(b, what)
        if x != y:
            first = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
            raise ConfigError("b", f"a paired comparison needs the same {what} in the same order: {a.name} has "
                              f"{len(x)} and {b.name} {len(y)}, first difference at #{first}; generate both with "
                              "the same prompts and seed (or pass checkpoints and let eval.py do it)")  # fmt: skip


def save_images(gen: Generated, folder: Path) -> None:
    """A sample.py-style folder of the images, so an evaluation's images can be re-judged later."""
    write_sample_folder(folder, gen.images, gen.prompts, gen.seeds, **gen.settings, source=gen.source)

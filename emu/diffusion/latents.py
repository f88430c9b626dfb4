"""Precomputed latents and text embeddings: the sample format and the ``latents`` data source.

``python -m emu.diffusion.precompute`` (:mod:`emu.diffusion.precompute`) runs the frozen stage-0 autoencoder and text
encoders once over a corpus and writes WebDataset shards; training then reads them instead of decoding images and
running the frozen networks at every step (the reference reports 1.4x the training time with latents computed on
the fly). Each sample is ``{key}.safetensors`` (``latent``: the encoder's posterior moments, mean and log-variance
stacked on the channel axis, C_lat*2 x h x w, so that training still draws a fresh latent from the posterior;
``{encoder}.tokens``: the encoder's hidden states for the real tokens only, n x D; ``{encoder}.pooled``), plus
``{key}.txt`` (the caption) and ``{key}.json`` (the image's metadata). Token sequences are stored without their
padding and padded back to the encoder's ``max_length`` with zeros and a False mask when batched: masked tokens
never reach the U-Net (cross-attention masks them), so the conditioning is unchanged.

Horizontal flips: when the stage trains with ``data.hflip > 0``, the precompute also encodes each training image
flipped and its caption with 'left' and 'right' swapped (``data.flip_captions``), stored under the same names with a
``flipped.`` prefix (the manifest's ``flips``). Training then picks the flipped tensors with probability
``data.hflip``, drawn as the image path draws its flip: from the sample's own generator, seeded by (seed, epoch,
key), so a resumed run sees the same flips.

``precompute.json`` beside the shards records what made them (autoencoder, its fingerprint, encoders, resolution)
and the DiffusionModule refuses shards made with another autoencoder or other encoders.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from emu.data.samples import BadSample, mirror_crop, swap_left_right
from emu.data.sources import WebDatasetSource, expand_shards
from emu.errors import ConfigError
from emu.text.encoders import TextEmbedding

MANIFEST = "precompute.json"
PLAN = "precompute.plan.json"  # what a (possibly unfinished) precompute computes
EXTENSION = "safetensors"
FLIPPED = "flipped."  # the prefix of a sample's tensors for its horizontally flipped image and swapped caption


def sample_tensors(latent: torch.Tensor, text: dict[str, TextEmbedding], index: int) -> dict[str, torch.Tensor]:
    """One sample's tensors (row ``index`` of a batch) by name; token padding is dropped."""
    tensors = {"latent": latent[index].contiguous()}
    for name, emb in text.items():
        mask = emb.mask[index]
        n = int(mask.sum())
        if not bool(mask[:n].all()):
            raise ValueError(f"the {name} encoder's mask is not a prefix of real tokens; cannot drop its padding")
        tensors[f"{name}.tokens"] = emb.tokens[index, :n].contiguous()
        if emb.pooled is not None:
            tensors[f"{name}.pooled"] = emb.pooled[index].contiguous()
    return tensors


def pack(latent: torch.Tensor, text: dict[str, TextEmbedding], index: int,
         flipped: tuple[torch.Tensor, dict[str, TextEmbedding]] | None = None) -> bytes:  # fmt: skip
    """One sample's tensors as safetensors bytes; ``flipped``: the batch's moments and text embeddings of the flipped
    images and swapped captions, stored under the ``flipped.`` prefix."""
    tensors = sample_tensors(latent, text, index)
    if flipped is not None:
        tensors.update({FLIPPED + k: v for k, v in sample_tensors(*flipped, index).items()})
    return save_safetensors({k: v.cpu() for k, v in tensors.items()})


def unpack(data: bytes) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors(data)
    except Exception as e:  # truncated or not safetensors at all
        raise BadSample("corrupt_image", f"unreadable precomputed tensors: {e}") from e


def collate_latents(samples: list[dict[str, Any]], encoders: dict[str, int]) -> dict[str, Any]:
    """Batch dict: ``latent`` (B x 2C x h x w moments), ``text`` (name -> :class:`TextEmbedding`, padded to each
    encoder's ``max_length``), ``caption``, ``key``, ``meta``."""
    text = {}
    for name, max_length in encoders.items():
        rows = [s["tensors"][f"{name}.tokens"] for s in samples]
        tokens = rows[0].new_zeros(len(rows), max_length, rows[0].shape[-1])
        mask = torch.zeros(len(rows), max_length, dtype=torch.bool)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = r
            mask[i, : len(r)] = True
        pooled = [s["tensors"].get(f"{name}.pooled") for s in samples]
        text[name] = TextEmbedding(tokens, mask, None if pooled[0] is None else torch.stack(pooled))
    return {
        "latent": torch.stack([s["tensors"]["latent"] for s in samples]),
        "text": text,
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
        "meta": [s["meta"] for s in samples],
    }


class LatentPreparer:
    """Checks a raw precomputed sample and, with probability ``hflip``, takes its flipped tensors and caption
    (picklable: runs in the loader workers; the flip draws from the global generator, which the stream seeds per
    sample)."""

    def __init__(self, encoders: dict[str, int], latent_shapes: list[list[int]], hflip: float = 0.0,
                 flip_captions: bool = True):  # fmt: skip
        self.encoders, self.latent_shapes = encoders, [list(s) for s in latent_shapes]
        self.hflip, self.flip_captions = hflip, flip_captions

    def __call__(self, raw: dict[str, Any]) -> dict[str, Any]:
        if raw.get("image") is None:
            raise BadSample("missing_image", f"no .{EXTENSION} tensors")
        tensors = unpack(raw["image"])
        flipped = self.hflip > 0 and bool(torch.rand(()) < self.hflip)
        if flipped:
            if FLIPPED + "latent" not in tensors:
                raise BadSample("corrupt_image", "no flipped tensors (the precompute wrote both orientations)")
            tensors = {k[len(FLIPPED) :]: v for k, v in tensors.items() if k.startswith(FLIPPED)}
        shape = list(tensors.get("latent", torch.empty(0)).shape)
        if shape not in self.latent_shapes:
            raise BadSample("corrupt_image", f"latent shape {shape}, expected one of {self.latent_shapes}")
        for name, max_length in self.encoders.items():
            tokens = tensors.get(f"{name}.tokens")
            if tokens is None or tokens.ndim != 2 or not 0 < len(tokens) <= max_length:
                raise BadSample("corrupt_image", f"bad or missing {name}.tokens")
        caption = raw.get("caption")
        caption = caption.decode("utf-8", "replace") if isinstance(caption, bytes) else (caption or "")
        meta = raw.get("meta") if isinstance(raw.get("meta"), dict) else {}
        if flipped:
            meta = {**meta, "flipped": True}
            if "crop_top_left" in meta:  # as the image path mirrors it (SDXL's crop conditioning)
                meta["crop_top_left"] = list(meta["crop_top_left"])
                mirror_crop(meta)
            caption = swap_left_right(caption) if self.flip_captions else caption
        return {"tensors": tensors, "caption": caption, "key": raw["key"], "meta": meta}


def read_manifest(shards: str | list[str]) -> dict[str, Any]:
    """The ``precompute.json`` in the folder of the first shard (or the one above it), with ``folder``: where it was
    found (the shards may have moved since ``out`` was written)."""
    first = expand_shards(shards)[0]
    path = Path(first).parent / MANIFEST
    if not path.is_file():
        path = Path(first).parent.parent / MANIFEST  # train/ and val/ folders under one output
    if not path.is_file():
        raise ConfigError("data.source.shards", f"no {MANIFEST} beside '{first}'; write the shards with "
                          "`python -m emu.diffusion.precompute`")  # fmt: skip
    return {**json.loads(path.read_text()), "folder": str(path.parent)}


class LatentSource(WebDatasetSource):
    """Shards written by :mod:`emu.diffusion.precompute`: batches of posterior moments and text embeddings.

    Takes the arguments of :class:`~emu.data.sources.WebDatasetSource`; ``shards`` defaults the val split to the
    ``val/`` shards the precompute wrote next to ``train/`` (when they exist).
    """

    image_extensions = (EXTENSION,)

    def __init__(self, shards: str | list[str], val_shards: str | list[str] | None = None, **kw):
        self.manifest = read_manifest(shards)
        if val_shards is None and self.manifest.get("counts", {}).get("val"):
            val_shards = str(Path(self.manifest["folder"]) / "val" / "*.tar")
            kw["val_fraction"] = 0.0
        super().__init__(shards, val_shards, **kw)
        self.encoders = {n: int(e["max_length"]) for n, e in self.manifest["encoders"].items()}
        self.latent_shapes = self.manifest.get("latent_shapes") or [self.manifest["latent_shape"]]

    def check_loader_settings(self, *, hflip: float, resolution: int, flip_captions: bool = True,
                              **settings: Any) -> None:  # fmt: skip
        super().check_loader_settings(**settings)
        flips = self.manifest.get("flips")
        if hflip > 0 and not flips:
            raise ConfigError("data.hflip", f"is {hflip}, but these latents were precomputed without "
                              "flipped copies (precompute with data.hflip > 0 for both); set data.hflip=0")  # fmt: skip
        if hflip > 0 and bool(flips["captions"]) != bool(flip_captions):
            raise ConfigError("data.flip_captions", f"is {flip_captions}, but the flipped copies were precomputed "
                              f"with flip_captions={flips['captions']}")  # fmt: skip
        if resolution != self.resolution:
            raise ConfigError("data.resolution", f"is {resolution} but the precomputed latents were made at "
                              f"{self.resolution}px; set data.resolution={self.resolution}")  # fmt: skip

    @property
    def resolution(self) -> int:
        return int(self.manifest["resolution"])

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_latents(samples, self.encoders)

    def bucketed(self, prepare) -> bool:
        """Latents of several shapes (precomputed with ``data.buckets``) are batched by shape."""
        return len(self.latent_shapes) > 1

    @staticmethod
    def sample_shape(sample: dict[str, Any]) -> tuple:
        return tuple(sample["tensors"]["latent"].shape)

    def stream(self, split, prepare, skips, batch_size, drop_last, world_size=1, workers=0, epoch=None):
        """As :meth:`WebDatasetSource.stream`, with the latent sample check instead of image decoding; flips as
        ``prepare`` would flip images (its ``hflip``: the DataModule's for training, 0 for validation)."""
        hflip = float(getattr(prepare, "hflip", 0.0))
        preparer = LatentPreparer(self.encoders, self.latent_shapes, hflip, getattr(prepare, "flip_captions", True))
        return super().stream(split, preparer, skips, batch_size, drop_last, world_size, workers, epoch)

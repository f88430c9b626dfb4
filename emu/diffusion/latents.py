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

from emu.data.samples import BadSample
from emu.data.sources import WebDatasetSource, expand_shards
from emu.errors import ConfigError
from emu.text.encoders import TextEmbedding

MANIFEST = "precompute.json"
PLAN = "precompute.plan.json"  # what a (possibly unfinished) precompute computes
EXTENSION = "safetensors"


def pack(latent: torch.Tensor, text: dict[str, TextEmbedding], index: int) -> bytes:
    """One sample's tensors (row ``index`` of a batch) as safetensors bytes; token padding is dropped."""
    tensors = {"latent": latent[index].contiguous()}
    for name, emb in text.items():
        mask = emb.mask[index]
        n = int(mask.sum())
        if not bool(mask[:n].all()):
            raise ValueError(f"the {name} encoder's mask is not a prefix of real tokens; cannot drop its padding")
        tensors[f"{name}.tokens"] = emb.tokens[index, :n].contiguous()
        if emb.pooled is not None:
            tensors[f"{name}.pooled"] = emb.pooled[index].contiguous()
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
    """Checks a raw precomputed sample (picklable: runs in the loader workers)."""

    def __init__(self, encoders: dict[str, int], latent_shapes: list[list[int]]):
        self.encoders, self.latent_shapes = encoders, [list(s) for s in latent_shapes]

    def __call__(self, raw: dict[str, Any]) -> dict[str, Any]:
        if raw.get("image") is None:
            raise BadSample("missing_image", f"no .{EXTENSION} tensors")
        tensors = unpack(raw["image"])
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
        self.preparer = LatentPreparer(self.encoders, self.latent_shapes)

    def check_loader_settings(self, *, hflip: float, resolution: int, **settings: Any) -> None:
        super().check_loader_settings(**settings)
        if hflip > 0:
            raise ConfigError("data.hflip", f"is {hflip}, but precomputed latents are fixed crops (no flipping "
                              "at training time); set data.hflip=0")  # fmt: skip
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
        """As :meth:`WebDatasetSource.stream`, with the latent sample check instead of image decoding."""
        return super().stream(split, self.preparer, skips, batch_size, drop_last, world_size, workers, epoch)

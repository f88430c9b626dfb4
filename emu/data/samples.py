"""Turning raw samples from any source into checked, transformed training samples.

A raw sample is a dict with ``key``, ``image`` (encoded bytes or a PIL image), ``caption`` (str, bytes or
None) and ``meta`` (dict). :class:`SamplePreparer` decodes and checks it and either returns the training
sample (``image`` as a float tensor in [-1, 1], ``caption``, ``key``, ``meta``) or raises :class:`BadSample`
with a short reason name; the data sources skip and count those. :func:`collate` stacks samples into the
batch dict every stage consumes.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import v2

from emu.data.buckets import nearest_bucket


class BadSample(Exception):
    """A sample that cannot be used; ``reason`` is a short name used for counting."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: alpha is composited on white, 16/32-bit scaled, CMYK converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        x = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or x.max() > 255 else 255.0
        if img.mode == "F" and x.max() <= 1.0:
            hi = 1.0
        return Image.fromarray(np.clip(x / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes | Image.Image) -> Image.Image:
    """Bytes or a PIL image -> fully loaded, EXIF-upright RGB PIL image, or :class:`BadSample`."""
    if isinstance(data, Image.Image):
        img = data
    else:
        if data is None or len(data) == 0:
            raise BadSample("empty_file")
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError as e:
            raise BadSample("not_an_image", str(e)) from e
        except Image.DecompressionBombError as e:
            raise BadSample("too_large", str(e)) from e
        except Exception as e:
            raise BadSample("corrupt_image", str(e)) from e
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns on odd EXIF and palette images; we convert them
            img.load()
            img = ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError) as e:
        reason = "truncated_image" if "truncated" in str(e).lower() else "corrupt_image"
        raise BadSample(reason, str(e)) from e
    return to_rgb(img)


def decode_caption(caption: str | bytes | None) -> str:
    if caption is None:
        raise BadSample("missing_caption")
    if isinstance(caption, bytes):
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadSample("caption_not_utf8", str(e)) from e
    caption = caption.strip()
    if not caption:
        raise BadSample("empty_caption")
    return caption


_LEFT_RIGHT = re.compile(r"\b(left|right)\b")


def swap_left_right(caption: str) -> str:
    """The caption of a horizontally flipped image: 'left' and 'right' exchanged."""
    return _LEFT_RIGHT.sub(lambda m: "right" if m.group(1) == "left" else "left", caption)


def cover_size(width: int, height: int, target: tuple[int, int]) -> tuple[int, int]:
    """The (width, height) an image is resized to so that it covers ``target`` (width, height) with its aspect ratio
    kept: the side that limits is exact, the other rounded down as torchvision's ``Resize`` does (never below it)."""
    tw, th = target
    if tw * height >= th * width:  # the width limits
        return tw, max(th, int(height * tw / width))
    return max(tw, int(width * th / height)), th


def mirror_crop(meta: dict[str, Any]) -> None:
    """Make a crop record (``original_size``, ``crop_top_left``, ``target_size``, as :class:`SamplePreparer` writes it)
    that of the flipped image: the crop's left edge, measured from the other side of the resized image."""
    (height, width), (target_height, target_width) = meta["original_size"], meta["target_size"]
    resized_width = cover_size(width, height, (target_width, target_height))[0]
    meta["crop_top_left"][1] = resized_width - meta["crop_top_left"][1] - target_width


def crop_origin(size: tuple[int, int], target: tuple[int, int], random: bool) -> tuple[int, int]:
    """(top, left) of a ``target`` (width, height) crop of an image of ``size`` (width, height): centred as
    torchvision's ``CenterCrop``, or drawn from the global torch RNG as its ``RandomCrop`` (rows first)."""
    (w, h), (tw, th) = size, target
    if not random:
        return round((h - th) / 2.0), round((w - tw) / 2.0)
    top = int(torch.randint(0, h - th + 1, size=())) if h > th else 0
    left = int(torch.randint(0, w - tw + 1, size=())) if w > tw else 0
    return top, left


@dataclass
class SamplePreparer:
    """Decode, check and transform a raw sample (picklable, so it runs inside DataLoader workers).

    Args:
        resolution: output side length (images are square after the crop) when there are no ``buckets``.
        crop: ``center`` or ``random``.
        hflip: probability of a horizontal flip.
        flip_captions: when flipping, swap 'left' and 'right' in the caption so it stays true.
        min_size: images whose shorter side is below this are skipped (``too_small``).
        require_caption: skip samples without a usable caption (stages that ignore text may turn it off).
        buckets: ``(width, height)`` sizes (:mod:`emu.data.buckets`); each image is resized to cover the one nearest
            its aspect ratio and cropped to it.

    Each sample's ``meta`` records the SDXL size conditioning, all ``[rows, columns]``: ``original_size`` (the decoded
    image's), ``crop_top_left`` (in pixels of the resized image, mirrored when flipped) and ``target_size``.
    """

    resolution: int = 64
    crop: str = "center"
    hflip: float = 0.0
    flip_captions: bool = True
    min_size: int = 0
    require_caption: bool = True
    buckets: list[tuple[int, int]] | None = None

    def __post_init__(self):
        if self.crop not in ("center", "random"):
            raise ValueError(f"data.crop must be 'center' or 'random', got {self.crop!r}")
        if not 0.0 <= self.hflip <= 1.0:
            raise ValueError(f"data.hflip is a probability in [0, 1], got {self.hflip}")
        self.buckets = [tuple(b) for b in self.buckets] if self.buckets else None
        self._normalize = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3)])

    def target(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) an image of this size becomes: its bucket, or the square resolution."""
        return nearest_bucket(width, height, self.buckets) if self.buckets else (self.resolution, self.resolution)

    def resize_crop(self, img: Image.Image,
                    origin: tuple[int, int] | None = None) -> tuple[torch.Tensor, dict[str, Any]]:  # fmt: skip
        """uint8 C x H x W of the image resized to cover its target and cropped to it (at ``origin``, top and left, when
        given), with the crop's record (``original_size``, ``crop_top_left``, ``target_size``)."""
        target = self.target(*img.size)
        size = cover_size(*img.size, target)
        x = v2.functional.resize(v2.functional.pil_to_tensor(img), [size[1], size[0]],
                                 interpolation=v2.InterpolationMode.BICUBIC, antialias=True)  # fmt: skip
        top, left = origin if origin is not None else crop_origin(size, target, self.crop == "random")
        x = x[:, top : top + target[1], left : left + target[0]]
        return x, {"original_size": [img.size[1], img.size[0]], "crop_top_left": [top, left],
                   "target_size": [target[1], target[0]]}  # fmt: skip

    def __call__(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        key = str(raw.get("key", "?"))
        if raw.get("image") is None:
            raise BadSample("missing_image")
        img = decode_image(raw["image"])
        if min(img.size) < self.min_size:
            raise BadSample("too_small", f"{img.size} < {self.min_size}")
        if self.require_caption:
            caption = decode_caption(raw.get("caption"))
        else:
            try:
                caption = decode_caption(raw.get("caption"))
            except BadSample:
                caption = ""
        meta = raw.get("meta")
        meta = dict(meta) if isinstance(meta, Mapping) else {}
        meta["source_size"] = list(img.size)  # width, height before resizing (curation's size filter reads it)
        pixels, record = self.resize_crop(img)
        meta.update(record)
        image = self._normalize(pixels).clamp_(-1.0, 1.0)
        other = self._other(raw, img.size, record["crop_top_left"]) if "image_l" in raw else None
        if self.hflip > 0 and torch.rand(()) < self.hflip:
            image = image.flip(-1)
            other = None if other is None else other.flip(-1)
            meta["flipped"] = True
            mirror_crop(meta)
            if self.flip_captions:
                caption = swap_left_right(caption)
        out = {"image": image, "caption": caption, "key": key, "meta": meta}
        return out if other is None else {**out, "image_l": other}

    def _other(self, raw: Mapping[str, Any], size: tuple[int, int], origin: list[int]) -> torch.Tensor:
        """A preference pair's other image (``image_l``, :class:`~emu.data.pairs.PairSource`), cropped and flipped as
        the preferred one: it must have its size (``pair_mismatch`` otherwise)."""
        if raw.get("image_l") is None:
            raise BadSample("missing_image", "the pair's other image")
        img = decode_image(raw["image_l"])
        if img.size != size:
            raise BadSample("pair_mismatch", f"the pair's images are {size} and {img.size}: a pair shares its size")
        return self._normalize(self.resize_crop(img, tuple(origin))[0]).clamp_(-1.0, 1.0)


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch dict: ``image`` B x 3 x H x W (and a preference pair's other images, ``image_l``), and ``caption``,
    ``key``, ``meta`` lists."""
    shapes = {tuple(s["image"].shape) for s in samples}
    if len(shapes) > 1:
        raise ValueError(f"a batch mixes image shapes {sorted(shapes)} (keys {[s['key'] for s in samples][:4]}...): "
                         "with data.buckets the source's image_sizes() must agree with its decoded images")  # fmt: skip
    pairs = {"image_l": torch.stack([s["image_l"] for s in samples])} if "image_l" in samples[0] else {}
    return {
        **pairs,
        "image": torch.stack([s["image"] for s in samples]),
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
        "meta": [s["meta"] for s in samples],
    }


def size_conditions(metas: list[dict[str, Any]]) -> torch.Tensor:
    """SDXL's size and crop conditioning of a batch, B x 6: original height and width, crop top and left, target height
    and width, from the samples' ``meta`` (:class:`SamplePreparer` records them; precomputed latents keep them)."""
    try:
        rows = [[*m["original_size"], *m["crop_top_left"], *m["target_size"]] for m in metas]
    except KeyError as e:
        raise ValueError(f"a sample's meta lacks {e.args[0]!r}: the data was prepared before size conditioning was "
                         "recorded; precompute again") from e  # fmt: skip
    return torch.tensor(rows, dtype=torch.float32)


def as_is(batch: Any) -> Any:
    """The collate function of loaders whose dataset returns whole batches (picklable, unlike a lambda)."""
    return batch

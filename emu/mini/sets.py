"""The miniature's named sets (conf/sets/mini.yaml registers them: :mod:`emu.utils.named_sets`), all held out:
haystack indices from 1,000,000 on, past every training range.

- prompts ``haystack:N[@START[/SEED]]``: the captions of haystack images START .. START+N-1 of seed SEED (default
  1,000,000 and 0);
- images ``haystack_needles:N[@START[/SEED]]``: the first N needles (flawless, appealing images: what curation looks
  for) from START, the Fréchet distances' reference;
- images ``haystack:N[@START[/SEED]]``: N haystack images from START as the corpus shows them (an autoencoder's test
  set).
"""

from __future__ import annotations

import torch

from emu.data.samples import SamplePreparer
from emu.errors import ConfigError
from emu.mini.haystack import caption_for, make_sample, metadata, scene_spec

HELDOUT_START = 1_000_000


def _parse(spec: str, key: str, what: str = "images") -> tuple[int, int, int]:
    """``N``, ``START`` and ``SEED`` of ``name:N[@START[/SEED]]`` (defaults 1,000,000 and 0)."""
    name, _, body = spec.partition(":")
    count, _, rest = body.partition("@")
    start, _, seed = rest.partition("/")
    try:
        n, first, seed_i = int(count), int(start or HELDOUT_START), int(seed or 0)
    except ValueError:
        raise ConfigError(key, f"'{spec}' is not {name}:N, {name}:N@START or {name}:N@START/SEED") from None
    if n < 1:
        raise ConfigError(key, f"'{spec}' asks for {n} {what}")
    return n, first, seed_i


def haystack_prompts(spec: str, key: str = "prompts") -> list[str]:
    """Captions of held-out haystack images from ``haystack:N[@START[/SEED]]``."""
    n, start, seed = _parse(spec, key, "prompts")
    specs = (scene_spec(seed, i) for i in range(start, start + n))
    return [caption_for(s["objects"], s["background"]) for s in specs]


def needle_set(spec: str, resolution: int, key: str = "fid.reference"):
    """``(cache key, loader)`` of ``haystack_needles:N[@START]``."""
    n, first, seed = _parse(spec, key)
    return f"{spec}|{resolution}", lambda: haystack_needles(n, seed, first, resolution)


def image_set(spec: str, resolution: int, key: str = "autoencoder.images"):
    """``(cache key, loader)`` of ``haystack:N[@START]``."""
    n, first, seed = _parse(spec, key)
    return f"{spec}|{resolution}", lambda: haystack_images(n, first, seed, resolution)


def haystack_needles(n: int, seed: int = 0, start: int = 1_000_000, resolution: int = 64) -> torch.Tensor:
    """The first ``n`` needles (flawless, appealing images: what curation looks for) of haystack ``seed`` from
    index ``start`` (past every training range), in [-1, 1]."""
    prepare = SamplePreparer(resolution=resolution, require_caption=False)
    out, i = [], start
    while len(out) < n:
        spec = scene_spec(seed, i)
        if metadata(spec, resolution, resolution)["needle"]:
            image, meta = make_sample(seed, i, resolution)
            out.append(prepare({"key": meta["key"], "image": image})["image"])
        i += 1
    return torch.stack(out)


def heldout_haystack(n: int, seed: int, start: int = 1_000_000, resolution: int = 64):
    """``n`` haystack images (in [-1, 1]) with their metadata, from index ``start`` of haystack ``seed``."""
    prepare = SamplePreparer(resolution=resolution, require_caption=False)
    images, metas = [], []
    for i in range(start, start + n):
        image, meta = make_sample(seed, i, resolution)
        images.append(prepare({"key": meta["key"], "image": image, "caption": meta["caption"]})["image"])
        metas.append(meta)
    return torch.stack(images), metas


def haystack_images(n: int, start: int, seed: int = 0, resolution: int = 64) -> torch.Tensor:
    """The images of :func:`heldout_haystack`."""
    return heldout_haystack(n, seed, start, resolution)[0]

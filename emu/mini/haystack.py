"""The haystack: the built-in miniature's procedural, captioned image domain.

Every image is a scene of one or two objects (shape, colour, size, position on a 3x3 grid) over a named
background, with a template caption that states them. Each image also carries hidden quality attributes
that imitate the photography guideline (composition, lighting, colour and contrast, subject and background)
and web-data defects, and a hidden ground-truth ``appeal`` score in [0, 10] computed from them. Most images
are mediocre; a few percent are photogenic *needles* (no flaw and high appeal).

Everything is a pure function of ``(seed, index)``:

* :func:`scene_spec` draws the scene, its style and its flaws (random numbers only, no pixels);
* :func:`render` turns a spec into a PIL image;
* :func:`make_sample` does both and returns ``(image, metadata)``.

``python -m emu.mini.haystack --n N --out DIR`` writes WebDataset shards in img2dataset layout
(``{key}.png``, ``{key}.txt``, ``{key}.json`` per sample).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

SHAPES = ("circle", "square", "triangle", "diamond", "star")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 38, 38),
    "orange": (245, 140, 20),
    "yellow": (240, 215, 40),
    "green": (46, 170, 60),
    "blue": (40, 90, 225),
    "purple": (140, 60, 195),
    "pink": (240, 120, 185),
    "white": (245, 245, 245),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (18, 18, 22),
    "gray": (120, 120, 124),
    "navy": (22, 34, 90),
    "teal": (20, 120, 120),
    "beige": (225, 210, 170),
    "brown": (110, 70, 40),
    "sky": (140, 195, 240),
    "forest": (25, 75, 35),
}
SIZES = {"small": 0.085, "large": 0.15}  # object radius as a fraction of the shorter image side
POSITIONS = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
POSITION_PHRASES = {
    "top left": "in the top left",
    "top": "at the top",
    "top right": "in the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}

# Hidden flaws and the appeal each one costs. The first group follows the photography guideline
# (composition, lighting, colour and contrast); the second imitates defects of web-scraped data.
GUIDELINE_FLAWS = {
    "cut_off": 3.0,  # subject cut off by the frame
    "off_balance": 2.0,  # a heavy dark mass weighs one side of the frame down
    "clutter": 2.0,  # distracting objects around the subject
    "flat_lighting": 2.0,  # no directional light, washed-out contrast
    "too_dark": 3.0,
    "overexposed": 3.0,
    "low_contrast": 2.5,  # subject colour close to the background's
    "monochrome": 2.0,
}
WEB_FLAWS = {
    "blur": 2.5,
    "noise": 2.0,
    "jpeg": 2.0,
    "watermark": 3.0,  # overlaid text
    "low_res": 2.5,  # rendered small, upscaled
    "odd_aspect": 1.0,  # not square
    "near_duplicate": 0.5,  # a slightly perturbed copy of an earlier image
}
FLAW_PENALTY = {**GUIDELINE_FLAWS, **WEB_FLAWS}
FLAWS = tuple(FLAW_PENALTY)
EXCLUSIVE = [{"too_dark", "overexposed", "flat_lighting"}]

# Knobs of the generator; chosen so that ~4% of images are needles (measured in the tests).
P_CLEAN = 0.13  # probability that an image draws no flaw at all
MEAN_EXTRA_FLAWS = 0.8  # flawed images have 1 + Poisson(this) flaws
NEEDLE_APPEAL = 7.5  # a clean image is a needle when its appeal reaches this
DUPLICATE_WINDOW = 500  # near-duplicates copy one of the previous this-many images
SUPERSAMPLE = 4
# Fine detail: a share of backgrounds carry faint sinusoidal stripes, hidden (not captioned, no effect on
# appeal), drawn from their own random stream so every other attribute of a scene is what it was without them.
# Their period is 1/16 of the shorter side (4 px at 64 px: two cycles per 8x8 latent cell), the detail a 4-channel
# latent loses first; blur, low resolution and JPEG flaws wash them out as they would a real texture.
P_STRIPES = 0.35
STRIPE_PERIOD = 1 / 16  # of the shorter side
STRIPE_AMPLITUDE = 20.0  # in 0-255 levels


def _rng(seed: int, index: int, stream: int = 0) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index), stream])


def _luminance(rgb: tuple[int, int, int]) -> float:
    r, g, b = (c / 255.0 for c in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def colour_contrast(color: str, background: str) -> float:
    """Colour-and-contrast quality of a subject on a background, in [0, 1] (luminance and hue distance)."""
    a, b = np.array(COLORS[color], float), np.array(BACKGROUNDS[background], float)
    lum = abs(_luminance(COLORS[color]) - _luminance(BACKGROUNDS[background]))
    chroma = np.linalg.norm(a - b) / (255.0 * math.sqrt(3))
    return float(np.clip(0.6 * lum / 0.8 + 0.4 * chroma / 0.8, 0.0, 1.0))


def caption_for(objects: list[dict], background: str) -> str:
    parts = [f"a {o['size']} {o['color']} {o['shape']} {POSITION_PHRASES[o['position']]}" for o in objects]
    return " and ".join(parts) + f" on a {background} background"


def parse_caption(caption: str) -> dict[str, Any] | None:
    """The inverse of :func:`caption_for`: ``{"objects": [...], "background": ...}``, or None for other text."""
    phrases = {v: k for k, v in POSITION_PHRASES.items()}
    head, sep, tail = caption.strip().rpartition(" on a ")
    if not sep or not tail.endswith(" background") or tail[: -len(" background")] not in BACKGROUNDS:
        return None
    objects = []
    for part in head.split(" and "):
        words = part.split(" ", 4)
        if len(words) != 5 or words[0] != "a" or words[4] not in phrases:
            return None
        size, color, shape = words[1:4]
        if size not in SIZES or color not in COLORS or shape not in SHAPES:
            return None
        objects.append({"size": size, "color": color, "shape": shape, "position": phrases[words[4]]})
    return {"objects": objects, "background": tail[: -len(" background")]}


def _draw_flaws(rng: np.random.Generator, allow_duplicate: bool) -> list[str]:
    if rng.random() < P_CLEAN:
        return []
    k = 1 + int(rng.poisson(MEAN_EXTRA_FLAWS))
    candidates = [f for f in FLAWS if allow_duplicate or f != "near_duplicate"]
    chosen: list[str] = []
    for f in rng.permutation(candidates):
        if len(chosen) == k:
            break
        if any(f in group and group & set(chosen) for group in EXCLUSIVE):
            continue
        chosen.append(str(f))
    return sorted(chosen)


def style_appeal(style: dict[str, Any]) -> float:
    """The appeal a scene's style earns before noise and flaw penalties: angled light, subject contrast, depth and
    an off-centre subject (rule of thirds)."""
    return 4.0 + 2.0 * style["light"] + 2.0 * style["contrast"] + 1.0 * style["depth"] + 0.5 * style["thirds"]


def _base_spec(seed: int, index: int) -> dict[str, Any]:
    """Draw one scene (objects, background, style, flaws) from ``(seed, index)``; no pixels."""
    rng = _rng(seed, index)
    flaws = _draw_flaws(rng, allow_duplicate=index > 0)
    background = str(rng.choice(list(BACKGROUNDS)))
    n_objects = 1 if rng.random() < 0.6 else 2
    cells = rng.permutation(len(POSITIONS))
    if "cut_off" in flaws:  # the cut-off subject sits in an edge cell so the frame can cut it
        cells = np.array([c for c in cells if POSITIONS[c] != "center"] + [POSITIONS.index("center")])
    objects = []
    for i in range(n_objects):
        color = str(rng.choice(list(COLORS)))
        while colour_contrast(color, background) < 0.15:  # keep the subject visible on clean images
            color = str(rng.choice(list(COLORS)))
        objects.append(
            {
                "shape": str(rng.choice(SHAPES)),
                "color": color,
                "size": "large" if rng.random() < 0.5 else "small",
                "position": POSITIONS[int(cells[i])],
            }
        )
    style = {
        "light": float(rng.uniform(0.0, 1.0)) if "flat_lighting" not in flaws else 0.0,  # angled light
        "light_angle": float(rng.uniform(0, 2 * math.pi)),
        "depth": bool(rng.random() < 0.6),  # shadows and a ground plane separate subject and background
        "contrast": colour_contrast(objects[0]["color"], background),
        "thirds": objects[0]["position"] != "center",
    }
    texture = _rng(seed, index, stream=4)
    style["stripes"] = str(texture.choice(["horizontal", "vertical"])) if texture.random() < P_STRIPES else None
    style["stripe_phase"] = float(texture.uniform(0.0, 1.0))
    aspect = [1.0, 1.0]
    if "odd_aspect" in flaws:
        ratio = float(rng.choice([1.5, 2.0]))
        aspect = [ratio, 1.0] if rng.random() < 0.5 else [1.0, ratio]
    appeal = style_appeal(style) + float(rng.normal(0.0, 0.3)) - sum(FLAW_PENALTY[f] for f in flaws)
    return {
        "seed": int(seed),
        "index": int(index),
        "objects": objects,
        "background": background,
        "style": style,
        "flaws": flaws,
        "aspect": aspect,
        "appeal": appeal,
        "render_seed": [int(seed), int(index)],
        "jitter": [0.0, 0.0],
        "duplicate_of": None,
    }


def scene_spec(seed: int, index: int) -> dict[str, Any]:
    """The full hidden description of haystack image ``index``; near-duplicates resolve their source here."""
    spec = _base_spec(seed, index)
    if "near_duplicate" not in spec["flaws"]:
        return spec
    rng = _rng(seed, index, stream=2)
    source_index = index - 1 - int(rng.integers(0, min(index, DUPLICATE_WINDOW)))
    source = scene_spec(seed, source_index)
    source_index = source["index"]  # the original, when the source is itself a duplicate
    dup = dict(source)
    dup["index"] = int(index)
    dup["flaws"] = sorted(set(source["flaws"]) | {"near_duplicate"})
    dup["appeal"] = source["appeal"] - FLAW_PENALTY["near_duplicate"]
    dup["jitter"] = [float(x) for x in rng.uniform(-0.03, 0.03, size=2)]
    dup["duplicate_of"] = key_for(source_index)
    return dup


def as_needle(spec: dict[str, Any]) -> dict[str, Any]:
    """The same scene (objects, background, texture) photographed as a needle: no flaw, square, full angled light, a
    ground plane and shadows. What a perfectly quality-tuned model would show for the scene's caption."""
    style = {**spec["style"], "light": 1.0, "depth": True}
    return {**spec, "style": style, "flaws": [], "aspect": [1.0, 1.0], "appeal": style_appeal(style),
            "jitter": [0.0, 0.0], "duplicate_of": None}  # fmt: skip


def key_for(index: int) -> str:
    return f"{index:09d}"


def metadata(spec: dict[str, Any], width: int, height: int) -> dict[str, Any]:
    appeal = float(np.clip(spec["appeal"], 0.0, 10.0))
    return {
        "key": key_for(spec["index"]),
        "caption": caption_for(spec["objects"], spec["background"]),
        "appeal": round(appeal, 4),
        "needle": not spec["flaws"] and appeal >= NEEDLE_APPEAL,
        "objects": spec["objects"],
        "background": spec["background"],
        "flaws": list(spec["flaws"]),
        "width": int(width),
        "height": int(height),
        "style": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in spec["style"].items()},
        "duplicate_of": spec["duplicate_of"],
        "seed": spec["seed"],
        "index": spec["index"],
    }


# ----------------------------------------------------------------------------------------------- render
def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        s = r * 0.86
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in np.radians([-90, 30, 150])]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = math.radians(-90 + 36 * k)
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    raise ValueError(f"unknown shape {shape!r}")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, r), fill=fill)


def _object_centre(obj: dict, w: float, h: float, jitter: list[float]) -> tuple[float, float]:
    cell = POSITIONS.index(obj["position"])
    row, col = divmod(cell, 3)
    return ((col + 0.5) / 3 + jitter[0]) * w, ((row + 0.5) / 3 + jitter[1]) * h


def _mix(a, b, t: float) -> tuple[int, int, int]:
    return tuple(round((1 - t) * x + t * y) for x, y in zip(a, b, strict=True))


def _stripes(img: Image.Image, direction: str, phase: float, period: float) -> Image.Image:
    """``img`` plus sinusoidal stripes of ``STRIPE_AMPLITUDE`` levels, constant along ``direction``."""
    x = np.asarray(img, np.float32)
    coord = np.arange(x.shape[0] if direction == "horizontal" else x.shape[1], dtype=np.float32)
    wave = STRIPE_AMPLITUDE * np.sin(2 * math.pi * (coord / period + phase))
    x = x + (wave[:, None, None] if direction == "horizontal" else wave[None, :, None])
    return Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))


def render(spec: dict[str, Any], resolution: int = 64) -> Image.Image:
    """Render a scene spec at ``resolution`` (the shorter side; odd aspect ratios widen one side)."""
    rng = _rng(*spec["render_seed"], stream=1)
    flaws = set(spec["flaws"])
    width = round(resolution * spec["aspect"][0])
    height = round(resolution * spec["aspect"][1])
    base_w, base_h = (width // 4, height // 4) if "low_res" in flaws else (width, height)
    ss = SUPERSAMPLE
    W, H = base_w * ss, base_h * ss
    short = min(W, H)
    bg = BACKGROUNDS[spec["background"]]
    style = spec["style"]

    img = Image.new("RGB", (W, H), bg)
    draw = ImageDraw.Draw(img)
    if style["depth"]:  # a ground plane gives layering between subject and background
        ground = _mix(bg, (0, 0, 0), 0.25)
        draw.rectangle([0, int(H * 0.62), W, H], fill=ground)
    if style.get("stripes"):  # fine background texture, behind the objects
        img = _stripes(img, style["stripes"], style["stripe_phase"], period=STRIPE_PERIOD * short)
        draw = ImageDraw.Draw(img)

    if "clutter" in flaws:
        for _ in range(int(rng.integers(6, 12))):
            c = tuple(int(x) for x in rng.integers(0, 256, 3))
            x, y = rng.uniform(0, W), rng.uniform(0, H)
            if rng.random() < 0.5:
                draw.line([x, y, x + rng.uniform(-0.3, 0.3) * W, y + rng.uniform(-0.3, 0.3) * H], fill=c, width=ss)
            else:
                _draw_shape(draw, str(rng.choice(SHAPES)), x, y, short * rng.uniform(0.02, 0.05), c)

    for i, obj in enumerate(spec["objects"]):
        cx, cy = _object_centre(obj, W, H, spec["jitter"])
        r = SIZES[obj["size"]] * short
        if i == 0 and "cut_off" in flaws:  # push the subject out through the nearest frame edge
            col, row = POSITIONS.index(obj["position"]) % 3, POSITIONS.index(obj["position"]) // 3
            dx = {0: -1, 1: 0, 2: 1}[col]
            dy = {0: -1, 1: 0, 2: 1}[row]
            cx += dx * (W / 6 + 0.1 * r)
            cy += dy * (H / 6 + 0.1 * r)
        color = COLORS[obj["color"]]
        if "low_contrast" in flaws:
            color = _mix(color, bg, 0.72)
        if style["depth"]:  # cast shadow
            shadow = Image.new("L", (W, H), 0)
            _draw_shape(ImageDraw.Draw(shadow), obj["shape"], cx + 0.25 * r, cy + 0.3 * r, r, 150)
            shadow = shadow.filter(ImageFilter.GaussianBlur(r * 0.25))
            img.paste(Image.new("RGB", (W, H), _mix(bg, (0, 0, 0), 0.6)), (0, 0), shadow)
        _draw_shape(draw, obj["shape"], cx, cy, r, color)
        if style["light"] > 0:  # a highlight on the lit side of the subject
            hl = Image.new("L", (W, H), 0)
            a = style["light_angle"]
            hx, hy = cx - 0.35 * r * math.cos(a), cy - 0.35 * r * math.sin(a)
            ImageDraw.Draw(hl).ellipse([hx - r * 0.35, hy - r * 0.35, hx + r * 0.35, hy + r * 0.35], fill=255)
            mask = Image.new("L", (W, H), 0)
            _draw_shape(ImageDraw.Draw(mask), obj["shape"], cx, cy, r, 255)
            hl = hl.filter(ImageFilter.GaussianBlur(r * 0.2))
            hl = Image.fromarray(
                (np.asarray(hl, np.float32) * np.asarray(mask, np.float32) / 255.0 * 0.55 * style["light"]).astype(
                    np.uint8
                )
            )
            img.paste(Image.new("RGB", (W, H), (255, 255, 255)), (0, 0), hl)

    if "off_balance" in flaws:  # a heavy dark mass on one side
        side = int(rng.integers(0, 4))
        mass = Image.new("L", (W, H), 0)
        box = [[0, 0, W * 0.38, H], [W * 0.62, 0, W, H], [0, 0, W, H * 0.38], [0, H * 0.62, W, H]][side]
        ImageDraw.Draw(mass).rectangle(box, fill=200)
        img.paste(Image.new("RGB", (W, H), (8, 8, 8)), (0, 0), mass)

    img = img.resize((base_w, base_h), Image.Resampling.LANCZOS)
    x = np.asarray(img, np.float32)

    # Directional ("angled") light across the frame.
    if style["light"] > 0:
        yy, xx = np.mgrid[0:base_h, 0:base_w].astype(np.float32)
        a = style["light_angle"]
        ramp = ((xx / base_w - 0.5) * -math.cos(a) + (yy / base_h - 0.5) * -math.sin(a)) * 2
        x = x * (1.0 + 0.22 * style["light"] * ramp[..., None])
    if "flat_lighting" in flaws:
        x = x.mean() + (x - x.mean()) * 0.45
    if "too_dark" in flaws:
        x = x * rng.uniform(0.22, 0.35)
    if "overexposed" in flaws:
        x = x * rng.uniform(1.7, 2.1) + 70
    if "monochrome" in flaws:
        gray = x @ np.array([0.299, 0.587, 0.114], np.float32)
        tint = np.array(rng.choice([(1.0, 1.0, 1.0), (1.0, 0.85, 0.65), (0.7, 0.85, 1.0)]), np.float32)
        x = gray[..., None] * tint
    img = Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))

    if "low_res" in flaws:
        img = img.resize((width, height), Image.Resampling.BILINEAR)
    if "blur" in flaws:
        img = img.filter(ImageFilter.GaussianBlur(resolution * rng.uniform(0.02, 0.035)))
    if "watermark" in flaws:
        text = str(rng.choice(["STOCK", "SAMPLE", "© PHOTO", "PREVIEW", "shutter"]))
        layer = Image.new("L", img.size, 0)
        font = ImageFont.load_default(size=max(8, resolution // 5))
        ld = ImageDraw.Draw(layer)
        tw = ld.textlength(text, font=font)
        ld.text(((width - tw) / 2, height * rng.uniform(0.3, 0.6)), text, font=font, fill=220)
        ink = (255, 255, 255) if rng.random() < 0.5 else (0, 0, 0)
        img.paste(Image.new("RGB", img.size, ink), (0, 0), layer)
    if "noise" in flaws:
        x = np.asarray(img, np.float32) + rng.normal(0, rng.uniform(18, 30), (height, width, 3))
        img = Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))
    if "jpeg" in flaws:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(rng.integers(4, 12)))
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if spec["duplicate_of"] is not None:  # near-duplicates also differ slightly in exposure
        x = np.asarray(img, np.float32) * _rng(spec["seed"], spec["index"], 3).uniform(0.93, 1.07)
        img = Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))
    return img


def image_size(seed: int, index: int, resolution: int = 64) -> tuple[int, int]:
    """(width, height) of haystack image ``index`` without rendering it (what :func:`render` makes)."""
    aspect = scene_spec(seed, index)["aspect"]
    return round(resolution * aspect[0]), round(resolution * aspect[1])


def make_sample(seed: int, index: int, resolution: int = 64) -> tuple[Image.Image, dict[str, Any]]:
    """Render haystack image ``index`` of the haystack ``seed``: ``(PIL image, metadata dict)``."""
    spec = scene_spec(seed, index)
    image = render(spec, resolution)
    return image, metadata(spec, *image.size)


# ------------------------------------------------------------------------------------------------- CLI
def _encode(index: int, seed: int, resolution: int) -> dict[str, Any]:
    image, meta = make_sample(seed, index, resolution)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return {"__key__": meta["key"], "png": buf.getvalue(), "txt": meta["caption"], "json": meta}


def write_shards(
    out: str | Path,
    n: int,
    seed: int = 0,
    resolution: int = 64,
    shard_size: int = 1000,
    workers: int = 1,
    start: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Write haystack images ``start .. start+n-1`` as ``{out}/{00000..}.tar`` and a ``haystack.json`` summary."""
    import multiprocessing as mp

    import webdataset as wds
    from tqdm import tqdm

    if n <= 0:
        raise ValueError(f"--n must be positive, got {n}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stats: Counter = Counter()
    t0 = time.perf_counter()
    encode = partial(_encode, seed=seed, resolution=resolution)
    indices = range(start, start + n)
    pool = mp.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        samples = pool.imap(encode, indices, chunksize=16) if pool else map(encode, indices)
        with wds.ShardWriter(str(out / "%05d.tar"), maxcount=shard_size, verbose=0) as sink:
            for sample in tqdm(samples, total=n, desc="haystack", unit="img", disable=not progress):
                meta = sample["json"]
                stats["needles"] += meta["needle"]
                stats.update(f"flaw/{f}" for f in meta["flaws"])
                stats["clean"] += not meta["flaws"]
                sink.write(sample)
    finally:
        if pool:
            pool.close()
            pool.join()
    seconds = time.perf_counter() - t0
    n_shards = math.ceil(n / shard_size)
    summary = {
        "n": n,
        "start": start,
        "seed": seed,
        "resolution": resolution,
        "shards": f"{out}/{{00000..{n_shards - 1:05d}}}.tar",
        "needles": stats["needles"],
        "needle_fraction": stats["needles"] / n,
        "clean": stats["clean"],
        "flaws": {k.split("/", 1)[1]: v for k, v in sorted(stats.items()) if k.startswith("flaw/")},
        "seconds": round(seconds, 2),
        "images_per_second": round(n / seconds, 1),
    }
    (out / "haystack.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m emu.mini.haystack", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, required=True, help="number of images")
    p.add_argument("--out", required=True, help="output directory for the shards")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=int, default=64, help="shorter side in pixels")
    p.add_argument("--shard-size", type=int, default=1000, help="images per tar shard")
    p.add_argument("--start", type=int, default=0, help="first index (to write disjoint splits)")
    p.add_argument("--workers", type=int, default=1, help="processes rendering in parallel")
    p.add_argument("--captions", action="store_true", help="write only the captions, one per line, to the file --out")
    args = p.parse_args(argv)
    if args.captions:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        captions = [caption_for(spec["objects"], spec["background"])
                    for spec in (scene_spec(args.seed, args.start + i) for i in range(args.n))]  # fmt: skip
        out.write_text("\n".join(captions) + "\n")
        print(f"wrote {len(captions)} captions of images {args.start}..{args.start + args.n - 1} to {out}")
        return
    if args.resolution < 16:
        p.error(f"--resolution must be at least 16, got {args.resolution}")
    s = write_shards(args.out, args.n, args.seed, args.resolution, args.shard_size, args.workers, args.start)
    print(
        f"wrote {s['n']} images to {s['shards']} in {s['seconds']:.1f}s ({s['images_per_second']:.0f} img/s); "
        f"needles {s['needles']} ({100 * s['needle_fraction']:.1f}%)"
    )


if __name__ == "__main__":
    main()

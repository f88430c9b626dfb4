"""The pieces of ``eval.py``: what to evaluate, the per-model metrics, the paired comparison and the report.

An *item* to evaluate is a stage-1/2 checkpoint (its images are generated here, through the same
:func:`~emu.diffusion.pipeline.generate` as ``sample.py``), a folder written by ``sample.py`` (``metadata.jsonl``
+ PNGs), or a stage-0 autoencoder (checkpoint or export folder; reconstruction metrics instead). Two text-to-image
items are compared pair by pair on the same prompts and seeds.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from emu.data.haystack import make_sample, metadata, scene_spec
from emu.data.samples import SamplePreparer
from emu.errors import ConfigError
from emu.evaluation import fid as fidlib
from emu.evaluation.winrate import compare, format_win_rate
from emu.utils.checkpoint_header import header
from emu.utils.images import image_grid, to_uint8

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass
class Generated:
    """Images of one text-to-image item with the prompt and seed of each."""

    name: str
    source: str
    images: torch.Tensor
    prompts: list[str]
    seeds: list[int]
    settings: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ items
def item_kind(path: str | Path) -> str:
    """``samples`` (a sample.py folder), ``diffusion`` or ``autoencoder`` (checkpoint or export folder)."""
    path = Path(path).expanduser()
    if path.is_dir():
        if (path / "metadata.jsonl").is_file():
            return "samples"
        if (path / "config.json").is_file():
            return "autoencoder"
        raise ConfigError("a/b", f"'{path}' is neither a sample folder (metadata.jsonl) nor an autoencoder export")
    if not path.is_file():
        raise ConfigError("a/b", f"'{path}' does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:
        raise ConfigError("a/b", f"'{path}' is not a readable checkpoint ({type(e).__name__}: {e})") from e
    kind = header(ckpt).get("kind")
    if kind not in ("diffusion", "autoencoder"):
        raise ConfigError("a/b", f"'{path}' is a {kind or 'non-emu'} checkpoint; eval.py takes diffusion or "
                          "autoencoder checkpoints, or sample.py folders")  # fmt: skip
    return kind


def load_samples(folder: str | Path, name: str) -> Generated:
    """A sample.py folder: its images ([-1, 1]), prompts, seeds and settings."""
    folder = Path(folder)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]
    images = [torch.from_numpy(np.asarray(Image.open(folder / r["file"]).convert("RGB"), dtype=np.float32))
              for r in rows]  # fmt: skip
    settings = {k: v for k, v in rows[0].items() if k not in ("file", "prompt", "seed")} if rows else {}
    return Generated(name, str(folder), torch.stack(images).permute(0, 3, 1, 2) / 127.5 - 1,
                     [r["prompt"] for r in rows], [int(r["seed"]) for r in rows], settings)  # fmt: skip


def generate_from_checkpoint(path: str | Path, name: str, prompts: list[str], seeds: list[int],
                             sampling: dict[str, Any], device: torch.device) -> Generated:  # fmt: skip
    """Images of a stage-1/2 checkpoint (EMA weights unless ``sampling["ema"]`` is false)."""
    from emu.diffusion.module import load_for_sampling

    module = load_for_sampling(path, device, ema=sampling.get("ema", True))
    res = int(sampling.get("resolution") or module.train_resolution or 64)
    kw = {k: sampling[k] for k in ("sampler", "steps", "guidance", "guidance_rescale", "schedule", "batch_size")}
    autocast = torch.bfloat16 if device.type == "cuda" else None
    print(f"[eval] {name}: sampling {len(prompts)} images at {res}px from {path}")
    images = module.sample(prompts, seeds, resolution=res, autocast_dtype=autocast, progress=True, **kw)
    return Generated(name, str(path), images, prompts, seeds, {**kw, "resolution": res, "ema": sampling.get("ema")})


def check_paired(a: Generated, b: Generated) -> None:
    """Refuse a paired comparison of items made from different prompts or seeds."""
    for what in ("prompts", "seeds"):
        x, y = getattr(a, what), getattr(b, what)
        if x != y:
            first = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
            raise ConfigError("b", f"a paired comparison needs the same {what} in the same order: {a.name} has "
                              f"{len(x)} and {b.name} {len(y)}, first difference at #{first}; generate both with "
                              "the same prompts and seed (or pass checkpoints and let eval.py do it)")  # fmt: skip


# ------------------------------------------------------------------------------------------------ reference sets
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


def folder_images(folder: str | Path, resolution: int) -> torch.Tensor:
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError("fid.reference", f"'{folder}' holds no images")
    prepare = SamplePreparer(resolution=resolution, require_caption=False)
    return torch.stack([prepare({"key": p.name, "image": p.read_bytes()})["image"] for p in files])


def reference_set(spec: str, resolution: int) -> tuple[str, callable]:
    """``(cache key, loader)`` for ``haystack_needles:N[@START]`` or an image folder."""
    if spec.startswith("haystack_needles:"):
        count, _, start = spec.removeprefix("haystack_needles:").partition("@")
        n, first = int(count), int(start or 1_000_000)
        return f"{spec}|{resolution}", lambda: haystack_needles(n, 0, first, resolution)
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise ConfigError("fid.reference", f"'{spec}' is neither haystack_needles:N nor an image folder")
    files = sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*")
                   if p.suffix.lower() in IMAGE_SUFFIXES)  # fmt: skip
    digest = hashlib.sha1(json.dumps(files).encode()).hexdigest()[:16]
    return f"{folder.resolve()}|{digest}|{resolution}", lambda: folder_images(folder, resolution)


# ------------------------------------------------------------------------------------------------ metrics
def frechet_metrics(images: torch.Tensor, extractors: list, reference: str | None, cache_dir: str | Path,
                    skipped: dict[str, str]) -> dict[str, Any]:  # fmt: skip
    """FID (Inception) and domain Fréchet distances of ``images`` to the reference set, one entry per extractor."""
    out: dict[str, Any] = dict(skipped)
    if not reference:
        return out
    res = images.shape[-1]
    key, load = reference_set(reference, res)
    for ex in extractors:
        digest = hashlib.sha1(f"{key}|{ex.name}".encode()).hexdigest()[:16]
        ref = fidlib.cached_reference_statistics(cache_dir, digest, ex, load)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            report = fidlib.fid_report(ex, images, ref)
        report["reference"] = reference
        out[report["metric"]] = report
    return out


def model_metrics(gen: Generated, clip: str | None, aesthetic: str | None, judge, extractors: list,
                  reference: str | None, cache_dir: str | Path,
                  fid_skipped: dict[str, str]) -> tuple[dict, dict[str, np.ndarray]]:  # fmt: skip
    """Everything measured on one item's images alone, and the per-image scores (judge, aesthetic) by name."""
    m: dict[str, Any] = {"name": gen.name, "source": gen.source, "n_images": len(gen.prompts), "settings": gen.settings}
    scores: dict[str, np.ndarray] = {}
    if clip:
        from emu.evaluation.prompt_following import torchmetrics_clip_score
        from emu.text.clip import ClipEmbedder

        m["clip_score"] = torchmetrics_clip_score(clip, gen.images, gen.prompts)
        m["clip_score_model"] = str(clip)
        m["clip_score_convention"] = "torchmetrics CLIPScore: max(100 * mean cos(image, text), 0)"
        cj = ClipEmbedder(clip)
        m["clip_zero_shot"] = cj.attribute_accuracy(gen.images, gen.prompts)
        if aesthetic:
            from emu.text.aesthetic import AestheticHead

            head = AestheticHead.from_file(aesthetic).eval()
            with torch.no_grad():
                scores["aesthetic"] = head(cj.embed_images(gen.images)).numpy()
            m["aesthetic"] = {"head": str(aesthetic), "mean": float(scores["aesthetic"].mean())}
    if judge is not None:
        js = judge.score(gen.images, gen.prompts)
        for k, v in js.items():
            scores[k] = v.numpy()
        m["judge"] = {"name": getattr(judge, "name", type(judge).__name__),
                      **{k: float(np.nanmean(v)) for k, v in scores.items() if k != "aesthetic"}}  # fmt: skip
    m["frechet"] = frechet_metrics(gen.images, extractors, reference, cache_dir, fid_skipped)
    return m, scores


def paired_metrics(sa: dict[str, np.ndarray], sb: dict[str, np.ndarray], tie_bands: dict[str, float],
                   n_boot: int) -> dict[str, Any]:  # fmt: skip
    """Win / tie / loss of A over B for every per-image score both have (judge appeal, faithfulness, ...)."""
    out = {}
    for key in ("appeal", "faithfulness", "aesthetic"):
        if key in sa and key in sb:
            if np.isnan(sa[key]).all():  # e.g. faithfulness on prompts the judge cannot parse
                continue
            out[key] = compare(sa[key], sb[key], float(tie_bands.get(key, 0.0)), n_boot=n_boot)
    return out


def autoencoder_metrics(path: str | Path, images: torch.Tensor, extractors: list, lpips: bool = True,
                        judge=None) -> dict:  # fmt: skip
    """PSNR / SSIM (torchmetrics), LPIPS (when its AlexNet weights are on disk) and rFID-style Fréchet distances
    of reconstructions to the originals; with a judge, its appeal of the originals and of the reconstructions
    (what the decoder lets a text-to-image model reach at best)."""
    from emu.autoencoder.module import load_autoencoder
    from emu.evaluation.reconstruction import reconstruct, reconstruction_metrics

    ae = load_autoencoder(path).eval()
    m: dict[str, Any] = {"source": str(path), "latent_channels": ae.latent_channels,
                         **reconstruction_metrics(ae, images)}  # fmt: skip
    recon = reconstruct(ae, images)
    m["lpips"] = lpips_or_reason(recon, images) if lpips else "off"
    for ex in extractors:
        report = fidlib.fid_report(ex, recon, images)
        m["r" + report["metric"]] = report
    if judge is not None:
        m["judge_appeal"] = {"originals": float(judge.predict(images)["appeal"].mean()),
                             "reconstructions": float(judge.predict(recon)["appeal"].mean())}  # fmt: skip
    return m


def lpips_or_reason(recon: torch.Tensor, images: torch.Tensor) -> float | str:
    """torchmetrics' LPIPS (AlexNet), or why it is unavailable (it needs torchvision's AlexNet weights on disk)."""
    weights = Path(torch.hub.get_dir()) / "checkpoints" / "alexnet-owt-7be5be79.pth"
    if not weights.is_file():
        return f"unavailable: LPIPS needs torchvision's AlexNet weights at {weights} (no downloads at run time)"
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    metric = LearnedPerceptualImagePatchSimilarity(net_type="alex")
    for i in range(0, len(images), 64):
        metric.update(recon[i : i + 64].clamp(-1, 1), images[i : i + 64])
    return float(metric.compute())


# ------------------------------------------------------------------------------------------------ pictures
def side_by_side(a: Generated, b: Generated, n: int = 16, columns: int = 8) -> Image.Image:
    """Pairs in columns, A above B, blocks of ``columns`` prompts; a header names A and B."""
    n = min(n, len(a.prompts))
    blocks = []
    for start in range(0, n, columns):
        idx = list(range(start, min(n, start + columns)))
        blocks.append(torch.cat([a.images[idx], b.images[idx]]))
    grids = [image_grid(block, nrow=len(block) // 2) for block in blocks]
    width = max(g.width for g in grids)
    header = 14
    canvas = Image.new("RGB", (width, header + sum(g.height + 6 for g in grids)), "white")
    ImageDraw.Draw(canvas).text((2, 1), f"top: {a.name}   bottom: {b.name}", fill="black")
    y = header
    for g in grids:
        canvas.paste(g, (0, y))
        y += g.height + 6
    return canvas


def reconstruction_grid(images: torch.Tensor, paths: list[str], names: list[str], columns: int = 16) -> Image.Image:
    """Originals in the first row, then each autoencoder's reconstructions of them, one row each, named."""
    from emu.autoencoder.module import load_autoencoder
    from emu.evaluation.reconstruction import reconstruct

    images = images[:columns]
    rows = [images] + [reconstruct(load_autoencoder(p).eval(), images) for p in paths]
    grid = image_grid(torch.cat(rows), nrow=len(images))
    label_w = 64
    canvas = Image.new("RGB", (grid.width + label_w, grid.height), "white")
    canvas.paste(grid, (label_w, 0))
    draw, row_h = ImageDraw.Draw(canvas), grid.height / len(rows)
    for i, label in enumerate(["original", *names]):
        draw.text((2, int(i * row_h + row_h / 2) - 5), label[:10], fill="black")
    return canvas


def to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(to_uint8(image).permute(1, 2, 0).numpy())


def save_images(gen: Generated, folder: Path) -> None:
    """A sample.py-style folder of the images, so an evaluation's images can be re-judged later."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "metadata.jsonl").open("w") as f:
        for i, (image, prompt, seed) in enumerate(zip(gen.images, gen.prompts, gen.seeds, strict=True)):
            name = f"{i:05d}.png"
            to_pil(image).save(folder / name)
            f.write(json.dumps({"file": name, "prompt": prompt, "seed": seed, **gen.settings,
                                "source": gen.source}) + "\n")  # fmt: skip


# ------------------------------------------------------------------------------------------------ report
def _fmt(x: Any, digits: int = 3) -> str:
    if isinstance(x, float):
        return "n/a" if math.isnan(x) else f"{x:.{digits}f}"
    return "n/a" if x is None else str(x)


def report_markdown(metrics: dict[str, Any]) -> str:
    """``report.md``: per-item table, paired win rates, judge accuracy, autoencoder table, warnings."""
    lines = [
        "# Evaluation",
        "",
        f"Prompts: {metrics.get('prompts', 'n/a')}; {metrics.get('n_prompts', 0)} prompts.",
        "",
    ]
    models = metrics.get("models", {})
    if models:
        names = list(models)
        frechet_keys = sorted({k for m in models.values() for k in m.get("frechet", {})})
        lines += ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        rows = [("images", lambda m: m["n_images"]), ("CLIP score", lambda m: m.get("clip_score")),
                ("aesthetic head", lambda m: m.get("aesthetic", {}).get("mean")),
                ("judge appeal", lambda m: m.get("judge", {}).get("appeal")),
                ("judge faithfulness", lambda m: m.get("judge", {}).get("faithfulness"))]  # fmt: skip
        for attr in ("color_acc", "shape_acc", "size_acc", "position_acc", "background_acc"):
            rows.append((f"CLIP zero-shot {attr[:-4]}", lambda m, a=attr: m.get("clip_zero_shot", {}).get(a)))
        for k in frechet_keys:
            rows.append((k, lambda m, k=k: _frechet_cell(m.get("frechet", {}).get(k))))
        for label, get in rows:
            values = [get(models[n]) for n in names]
            if any(v is not None for v in values):
                lines.append(f"| {label} | " + " | ".join(_fmt(v, 2) for v in values) + " |")
        lines.append("")
        clip = next((m.get("clip_score_model") for m in models.values() if m.get("clip_score_model")), None)
        if clip:
            lines += [f"CLIP score: torchmetrics `CLIPScore` over `{clip}`, max(100 x mean cosine, 0).", ""]
    paired = metrics.get("paired")
    if paired:
        a, b = list(models)[:2]
        lines += [f"## {a} vs {b}, paired on the same prompts and seeds", ""]
        lines += [
            "| judged on | A mean | B mean | tie band | result (95% bootstrap intervals) |",
            "|---|---|---|---|---|",
        ]
        for key, r in paired.items():
            lines.append(f"| {key} | {r['mean_a']:.3f} | {r['mean_b']:.3f} | {r['tie_band']} | {format_win_rate(r)} |")
        lines += ["", "Paper (Emu vs its pre-trained model, human raters, PartiPrompts): visual appeal 82.9% win / "
                  "15.4% loss; text faithfulness 36.7% / 21.0%.", ""]  # fmt: skip
    judge = metrics.get("judge_accuracy")
    if judge:
        lines += ["## How far to trust the judge (held-out haystack images)", ""]
        lines += [f"- {k}: {_fmt(v)}" for k, v in judge.items()] + [""]
    clip_acc = metrics.get("clip_accuracy")
    if clip_acc:
        lines += ["## How far to trust the CLIP (held-out haystack images)", ""]
        lines += [f"- {k}: {_fmt(v)}" for k, v in clip_acc.items()] + [""]
    ae = metrics.get("autoencoders")
    if ae:
        lines += [f"## Autoencoders ({metrics.get('images')})", "",
                  "| checkpoint | latent ch | PSNR | SSIM | LPIPS | rFD | judge appeal: originals -> reconstructions |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for m in ae.values():
            rfd = "; ".join(f"{k} {v['value']:.3f}" for k, v in m.items() if k.startswith("r") and isinstance(v, dict))
            ja = m.get("judge_appeal")
            ja = f"{ja['originals']:.2f} -> {ja['reconstructions']:.2f}" if ja else "n/a"
            lp = "n/a" if isinstance(m["lpips"], str) else _fmt(m["lpips"])
            lines.append(f"| {m['source']} | {m['latent_channels']} | {m['psnr']:.2f} | {m['ssim']:.3f} | {lp} | "
                         f"{rfd} | {ja} |")  # fmt: skip
        for name, b in metrics.get("baselines", {}).items():
            lines.append(f"| baseline: {name} | - | {b['psnr']:.2f} | {b['ssim']:.3f} | | | |")
        lpips = next((m["lpips"] for m in ae.values() if isinstance(m["lpips"], str)), None)
        lines += [f"LPIPS: {lpips}.", ""] if lpips else []
        lines.append("")
    if metrics.get("warnings"):
        lines += ["## Warnings", ""] + [f"- {w}" for w in metrics["warnings"]] + [""]
    if metrics.get("grids"):
        lines += ["## Pictures", ""] + [f"![{Path(g).stem}]({Path(g).name})" for g in metrics["grids"]] + [""]
    return "\n".join(lines)


def _frechet_cell(entry: Any) -> Any:
    if isinstance(entry, dict):
        return entry["value"]
    return None if entry is None else "skipped (see warnings)"

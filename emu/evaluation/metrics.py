"""The metrics of one item (CLIP score, aesthetic score, judge scores, Fréchet distances), of an autoencoder
(reconstruction), and the paired comparison of two items."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emu.evaluation import fid as fidlib
from emu.evaluation.items import Generated, load_reconstructor
from emu.evaluation.prompt_following import torchmetrics_clip_score
from emu.evaluation.reconstruction import reconstruct, reconstruction_metrics
from emu.evaluation.references import reference_set
from emu.evaluation.winrate import compare
from emu.text.aesthetic import AestheticHead
from emu.text.clip import ClipEmbedder


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
                  fid_skipped: dict[str, str], attributes=None) -> tuple[dict, dict[str, np.ndarray]]:  # fmt: skip
    """Everything measured on one item's images alone, and the per-image scores (judge, aesthetic) by name;
    ``attributes`` (a prompt-attribute scorer, e.g. :class:`emu.mini.clip.HaystackAttributes`) adds the CLIP's
    attribute accuracy."""
    m: dict[str, Any] = {"name": gen.name, "source": gen.source, "n_images": len(gen.prompts), "settings": gen.settings}
    scores: dict[str, np.ndarray] = {}
    if clip:
        m["clip_score"] = torchmetrics_clip_score(clip, gen.images, gen.prompts)
        m["clip_score_model"] = str(clip)
        m["clip_score_convention"] = "torchmetrics CLIPScore: max(100 * mean cos(image, text), 0)"
        cj = ClipEmbedder(clip)
        if attributes is not None:
            m["clip_zero_shot"] = attributes.accuracy(cj, gen.images, gen.prompts)
        if aesthetic:
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
    ae = load_reconstructor(path).eval()
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

"""``report.md`` of an evaluation, from its ``metrics.json`` content."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from emu import paper
from emu.evaluation.winrate import format_win_rate


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
        lines += ["", paper.headline(), ""]
    lines += headroom_lines(metrics.get("headroom"), models)
    lines += human_lines(metrics.get("human"))
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


def headroom_lines(h: dict[str, Any] | None, models: dict[str, Any]) -> list[str]:
    """The judge's appeal of held-out scenes as the corpus shows them and as needles (and through the autoencoder)
    beside the models' own: where the comparison's effect can be lost; and the needles' win rate, its ceiling."""
    if not h:
        return []
    labels = {"corpus": "held-out scenes as the corpus shows them", "needles": "the same scenes as needles",
              "corpus_reconstructed": "... corpus style, through the autoencoder",
              "needles_reconstructed": "... needles, through the autoencoder"}  # fmt: skip
    title = f"## Headroom: what the judge could see ({h['n']} held-out haystack scenes, seed {h['haystack_seed']})"
    lines = [title, "", "| images | judge appeal (mean) |", "|---|---|"]
    lines += [f"| {labels.get(k, k)} | {v:.2f} |" for k, v in h["appeal"].items()]
    for name, m in models.items():
        appeal = m.get("judge", {}).get("appeal")
        lines += [f"| generated: {name} | {appeal:.2f} |"] if appeal is not None else []
    lines.append("")
    for key, what in (("needles_vs_corpus", "as rendered"), ("needles_vs_corpus_reconstructed", "reconstructed")):
        if key in h:
            lines.append(f"- needles vs corpus, {what} (the ceiling of a paired appeal comparison, tie band "
                         f"{h['tie_band']}): {format_win_rate(h[key])}")  # fmt: skip
    return [*lines, ""]


def _frechet_cell(entry: Any) -> Any:
    if isinstance(entry, dict):
        return entry["value"]
    return None if entry is None else "skipped (see warnings)"


def human_lines(h: dict[str, Any] | None) -> list[str]:
    """Human A/B votes (``eval.py human_votes=``): majority per pair, intervals, agreement, per-rater statistics."""
    if not h:
        return []
    names = h.get("names", {"a": "A", "b": "B"})
    lines = [f"## Human raters: {names['a']} (A) vs {names['b']} (B), from {h['source']}", ""]
    for problem in h.get("problems", [])[:5]:
        lines.append(f"- skipped: {problem}")
    for q, r in h["questions"].items():
        lines += ["", f"**{q}**: {format_win_rate(r)}; {r['pairs']} pairs, {r['votes']} votes (per pair: "
                  f"{r['votes_per_pair']}), Krippendorff's alpha {r['alpha']:.2f}; majority of the raters per pair.",
                  "", "| rater | votes | agrees with the majority | ties | picks left | checks failed |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for name, s in r["raters"].items():
            lines.append(f"| {name} | {s['votes']} | {_fmt(s['agreement'], 2)} | {_fmt(s['tie_rate'], 2)} | "
                         f"{_fmt(s['left_rate'], 2)} | {s['checks_failed']} of {s['checks']} |")  # fmt: skip
    return [*lines, ""]

"""``<demo>/GENERALITY.md``: quality-tuning other architectures, one table beside the paper's claim.

Reads each architecture's stage-1 checkpoint (its parameters), its stage-2 ``selection.json`` (the selected step),
its eval's ``metrics.json`` (``paired.appeal`` / ``paired.faithfulness`` by the evaluation's judge, ``paired.aesthetic``
by the curation's aesthetic head, the CLIP score of each model) and the wall time of each run
(``generality_state.json``; the demo's own ``demo_state.json`` for the latent U-Net). Judges the targets
(:data:`TARGETS`) and writes them to ``generality/targets.json``. Measures nothing itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from emu.demo.ablation_report import _faith
from emu.demo.generality import Arch
from emu.demo.report import Targets, _load, _pct, wall_clock
from emu.evaluation.winrate import format_win_rate
from emu.utils.files import atomic_write_text

TARGETS = {"appeal_low": 0.5, "appeal_win": 0.70}  # each architecture: the win's interval above 0.5, the win >= 0.70
PAPER = ("significant gains in visual appeal and text faithfulness for an Imagen-like pixel diffusion model and a "
         "Muse-like masked transformer, each quality-tuned on the same ~2000 curated images (people judging, a third "
         "of PartiPrompts)")  # fmt: skip


def network_parameters(path: Path) -> int | None:
    """The generating network's parameters (U-Net, DiT or masked transformer) of a checkpoint; None when it is
    missing."""
    from emu.diffusion.checkpoints import load_diffusion
    from emu.maskgit.module import is_maskgit_checkpoint, load_maskgit

    if not path.is_file():
        return None
    if is_maskgit_checkpoint(path):
        return sum(p.numel() for p in load_maskgit(path).transformer.parameters())
    return sum(p.numel() for p in load_diffusion(path).unet.parameters())


def _seconds(arch: Arch, which: str, state: dict[str, Any], demo_state: dict[str, Any]) -> float | None:
    """A run's wall time: ``which`` is ``stage1``, ``stage2``, ``eval`` or (a tokenized arm's) ``tokenizer``."""
    if arch.stage is None:
        info = demo_state.get("steps", {}).get(which)
    else:
        info = state.get("steps", {}).get(f"{arch.name}/{which}")
    return None if info is None else float(info["seconds"])


def _minutes(seconds: float | None) -> str:
    return "not run" if seconds is None else f"{seconds / 60:.1f} min"


def faithfulness_kept(r: dict[str, Any] | None) -> bool | None:
    """Losses not above wins by more than the interval: ``loss - win`` at most the wider half-width of the two 95%
    intervals. None when not measured."""
    if not r:
        return None
    half = max(r["win_ci"][1] - r["win_ci"][0], r["loss_ci"][1] - r["loss_ci"][0]) / 2
    return r["loss"] - r["win"] <= half


def _clip_scores(m: dict[str, Any]) -> tuple[float, float] | None:
    """(quality-tuned, pre-trained) CLIP scores of an eval's ``metrics.json`` (its a and b), where both were
    measured."""
    names, models = m.get("config", {}), m.get("models", {})
    a, b = models.get(names.get("name_a"), {}), models.get(names.get("name_b"), {})
    if "clip_score" not in a or "clip_score" not in b:
        return None
    return float(a["clip_score"]), float(b["clip_score"])


def judges_agree(m: dict[str, Any] | None) -> bool | None:
    """The second judges agree with the evaluation's in direction: the aesthetic head's win - loss has the sign of
    the judge's appeal win - loss, and the CLIP score moves as the judge's faithfulness. None when not measured."""
    if not m or "appeal" not in m.get("paired", {}) or "aesthetic" not in m["paired"]:
        return None
    paired, clip = m["paired"], _clip_scores(m)
    sign = lambda x: (x > 0) - (x < 0)
    agree = sign(paired["appeal"]["win"] - paired["appeal"]["loss"]) == sign(
        paired["aesthetic"]["win"] - paired["aesthetic"]["loss"])  # fmt: skip
    if clip is not None and "faithfulness" in paired:
        clip = clip[0] - clip[1]
        faith = paired["faithfulness"]["win"] - paired["faithfulness"]["loss"]
        agree = agree and (sign(faith) == 0 or sign(clip) == sign(faith))
    return agree


def _second(m: dict[str, Any] | None) -> str:
    if not m or "aesthetic" not in m.get("paired", {}):
        return "n/a"
    clip = _clip_scores(m)
    return _faith(m["paired"]["aesthetic"]) + (f"; CLIP score {clip[1]:.1f} -> {clip[0]:.1f}" if clip else "")


def judge(arch: Arch, m: dict[str, Any] | None) -> list[tuple[str, str, bool | None]]:
    """``(target, measured, met)`` rows of one architecture."""
    paired = (m or {}).get("paired", {})
    ap, fa = paired.get("appeal"), paired.get("faithfulness")
    rows = [
        (
            f"{arch.name}: appeal win's 95% interval above {_pct(TARGETS['appeal_low'])}, win >= "
            f"{_pct(TARGETS['appeal_win'])}",
            format_win_rate(ap) if ap else "not measured",
            None if not ap else bool(ap["win_ci"][0] > TARGETS["appeal_low"] and ap["win"] >= TARGETS["appeal_win"]),
        ),
        (
            f"{arch.name}: faithfulness kept (losses not above wins by more than the interval)",
            _faith(fa) if fa else "not measured",
            faithfulness_kept(fa),
        ),
        (f"{arch.name}: the aesthetic head and the CLIP score agree in direction", _second(m), judges_agree(m)),
    ]
    return rows  # fmt: skip


def write_generality(out: Path, scale: dict[str, Any], rows: list[Arch], state: dict[str, Any],
                     demo_state: dict[str, Any]) -> Path:  # fmt: skip
    """``<out>/GENERALITY.md`` and ``<out>/generality/targets.json`` from what the architectures' runs wrote."""
    metrics = {a.name: _load(out / a.metrics) for a in rows}
    head = metrics.get(rows[0].name) or {}
    total = sum(v.get("seconds", 0.0) for v in state.get("stages", {}).values())
    wall = wall_clock(state)
    took = f"**{total / 60:.1f} min**"
    if wall is not None:
        took = (
            f"**{wall[0] / 60:.1f} min** wall clock, architectures side by side (they add up to {total / 60:.1f} min)"
        )
    lines = [
        "# Quality-tuning other architectures: the paper's generality claim, in miniature",
        "",
        f"Scale `{scale['name']}`. Each architecture is pre-trained on the demo's corpus as long as the demo's "
        "stage 1, quality-tuned on the demo's curated set with the demo's checkpoint selection, and its selected "
        f"checkpoint is compared with **its own pre-trained model** on the same {head.get('n_prompts', 'n/a')} "
        "held-out prompts and "
        f"seeds ({head.get('prompts', 'n/a')}) by the same pixel judge and tie band; paired win / tie / loss with 95% "
        f"bootstrap intervals over prompts. Wall time of the architectures run here: {took} "
        f"({state.get('finished', 'not finished')}). Samples: `generality/<arch>/eval/samples_*/` (the U-Net's: "
        "`eval/`).",
        "",
        f"**The paper**: {PAPER}.",
        "",
        "| architecture | network parameters | stage 1 | stage 2 (selected step) | appeal: win / tie / loss, 95% | "
        "faithfulness: win / tie / loss | aesthetic head: win / tie / loss; CLIP score |",
        "| --- | ---: | ---: | ---: | --- | --- | --- |",
    ]
    targets = Targets()
    records = []
    for arch in rows:
        m = metrics.get(arch.name)
        paired = (m or {}).get("paired", {})
        n = network_parameters(out / arch.stage1)
        sel = _load(out / arch.selection) or {}
        best = (sel.get("best") or {}).get("step")
        s1, s2 = _seconds(arch, "stage1", state, demo_state), _seconds(arch, "stage2", state, demo_state)
        tok = _seconds(arch, "tokenizer", state, demo_state)
        stage1 = _minutes(s1) if tok is None or s1 is None else f"{_minutes(s1 + tok)} (tokenizer {tok / 60:.1f})"
        fa = paired.get("faithfulness")
        lines.append(
            f"| {arch.name}: {arch.what} | {f'{n:,}' if n is not None else 'n/a'} | {stage1} | {_minutes(s2)} "
            f"({best if best is not None else 'n/a'}) | "
            f"{format_win_rate(paired['appeal']) if 'appeal' in paired else 'not run'} | "
            f"{_faith(fa) if fa else 'not run'} | {_second(m)} |"
        )
        for what, measured, met in judge(arch, m):
            targets.add(what, measured, met)
            records.append({"arch": arch.name, "target": what, "measured": measured, "met": met})
    lines += ["", "Wall times are each run's own, with whatever ran beside it (the U-Net's are the demo's; its stage 1 "
              "trains on latents precomputed once, as the DiT's and the masked transformer's do). A masked "
              "transformer's stage 1 includes its tokenizer's training; its network parameters are the transformer's.",
              "",
              "## Targets", ""]  # fmt: skip
    lines += targets.markdown()
    lines += ["## Pictures", ""]
    for arch in rows:
        picture = f"{arch.folder}/eval/side_by_side.png".removeprefix("./")
        if (out / picture).is_file():
            lines += [f"**{arch.name}**: the same prompts and seeds, quality-tuned (top) over pre-trained (bottom).",
                      "", f"![{arch.name}: quality-tuned over pre-trained]({picture})", ""]  # fmt: skip
        else:
            lines += [f"**{arch.name}**: no picture yet (its eval has not run).", ""]
    lines += [
        "Simulated: the raters are the pixel judge, the haystack stands in for web images (see REPORT.md). The "
        "aesthetic head is the curation's (checkpoint selection scores with it too): a second opinion on direction, "
        "not an independent one.",
        "",
    ]
    atomic_write_text(out / "generality" / "targets.json", json.dumps({"targets": records}, indent=2))
    report = out / "GENERALITY.md"
    atomic_write_text(report, "\n".join(lines))
    return report

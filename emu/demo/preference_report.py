"""``<demo>/PREFERENCE.md``: which recipe buys more appeal per human judgment, one row per arm.

Reads each arm's eval ``metrics.json`` (``paired.appeal`` / ``paired.faithfulness`` by the evaluation's pixel judge,
``paired.aesthetic`` by the curation's aesthetic head, the CLIP scores), its stage 2's ``selection.json`` (the
selected step), the wall time of each run (``preference_state.json``; the demo's ``demo_state.json`` for its own
quality-tuning) and what the human judgments were (the curation's ``labels.jsonl`` rows, each budget's
``pairs.json``, ``likes.json``). Writes the table, a curve of appeal win against judgments (``preference/curve.png``)
and ``preference/results.json``. Measures nothing itself.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from emu.demo.ablation_report import _faith
from emu.demo.generality_report import _clip_scores, faithfulness_kept
from emu.demo.plot import Panel, Series, chart
from emu.demo.preference import BASE, Arm
from emu.demo.report import _load, _pct, wall_clock
from emu.evaluation.winrate import format_win_rate
from emu.utils.files import atomic_write_text

CURVE = f"{BASE}/curve.png"


def curation_labels(out: Path) -> int:
    """The human labels of every pass of the demo's curation (rows of ``curate/human/*/labels.jsonl``)."""
    return sum(sum(1 for line in f.open() if line.strip()) for f in (out / "curate" / "human").glob("*/labels.jsonl"))


def judgments(out: Path, arm: Arm, curated: int) -> tuple[int | None, str]:
    """The human judgments ``arm`` used, and what they were, in words."""
    kind, _, n = arm.judgments.partition(":")
    labels = curation_labels(out)
    if kind == "curation" and not n:
        return labels, f"{labels:,} curation labels (both human passes)"
    if kind == "curation":  # a subset of the curated set: the share of the passes that would have found it
        share = round(labels * int(n) / max(curated, 1))
        return share, f"~{share:,} curation labels ({n} / {curated} of the passes' {labels:,}: an estimate)"
    pairs = _load(out / BASE / f"pairs_{n}" / "pairs.json")
    if pairs is None:
        return None, "not run"
    votes = int(pairs["votes"])
    what = f"{votes:,} votes on {pairs['pairs_voted']} pairs -> {pairs['confident']} confident pairs"
    if kind == "votes+curation":
        return votes + labels, f"{what}, after the curation's {labels:,} labels"
    return votes, what


def _seconds(arm: Arm, state: dict[str, Any], demo_state: dict[str, Any]) -> float | None:
    info = (demo_state if arm.stage is None else state).get("steps", {}).get(
        "stage2" if arm.stage is None else f"{arm.name}/stage2")  # fmt: skip
    return None if info is None else float(info["seconds"])


def _data_minutes(state: dict[str, Any]) -> str:
    seconds = state.get("stages", {}).get("preference_data", {}).get("seconds")
    return "not run" if seconds is None else f"{seconds / 60:.1f} min"


def _aesthetic(m: dict[str, Any] | None) -> str:
    if not m or "aesthetic" not in m.get("paired", {}):
        return "n/a"
    clip = _clip_scores(m)
    return _faith(m["paired"]["aesthetic"]) + (f"; CLIP score {clip[1]:.1f} -> {clip[0]:.1f}" if clip else "")


def _plot(out: Path, rows: list[dict[str, Any]]) -> str | None:
    """Appeal win (95% interval) against log10 of the judgments, one series per recipe."""
    series = []
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        pts = sorted((r["judgments"], r["appeal"]) for r in rows if r["recipe"] == recipe and r["appeal"]
                     and r["judgments"])  # fmt: skip
        if pts:
            series.append(Series(recipe, [math.log10(j) for j, _ in pts], [a["win"] for _, a in pts],
                                 [a["win_ci"][0] for _, a in pts], [a["win_ci"][1] for _, a in pts]))  # fmt: skip
    if not series:
        return None
    panel = Panel("appeal win vs the pre-trained model, 95% interval (evaluation judge, held-out prompts)", "", series,
                  hline=0.5, percent=True)  # fmt: skip
    chart([panel], "human judgments used (log10: 2.5 = 316, 3 = 1,000, 4 = 10,000)").save(out / CURVE)
    return CURVE


def _data_lines(out: Path) -> list[str]:
    """What the people gave: the pair task and its votes, each budget's pairs, KTO's likes."""
    lines = []
    results = _load(out / BASE / "pair_task" / "results.json")
    task = _load(out / BASE / "pair_task" / "task.json")
    if task:
        lines.append(f"- **Pairs**: the pre-trained model's two images for each of {len(task['pairs'])} training "
                     f"captions, {task['raters_per_pair']} simulated raters a pair (prompt hidden, sides drawn per "
                     f"rater, {len(task['checks'])} attention checks each).")  # fmt: skip
    if results and "appeal" in results:
        r = results["appeal"]
        checks = sum(s["checks"] for s in r["raters"].values())
        lines.append(f"  All votes: {r['votes']:,} on {r['pairs']} pairs and {checks} on attention checks, "
                     f"Krippendorff's alpha {r['alpha']:.2f}.")  # fmt: skip
    for f in sorted((out / BASE).glob("pairs_*/pairs.json"), key=lambda p: int(p.parent.name.split("_")[1])):
        p = json.loads(f.read_text())
        lines.append(f"  - budget {p['budget']}: {p['votes']} votes on {p['pairs_voted']} pairs -> "
                     f"{p['confident']} confident, {p['ties']} ties, {p['unconfident']} below "
                     f"{p['min_agreement']:.0%} agreement; raters left out for failed checks: "
                     f"{', '.join(p['raters_dropped']) or 'none'}.")  # fmt: skip
    likes = _load(out / BASE / "likes" / "likes.json")
    if likes:
        lines.append(f"- **Likes** (KTO): {likes['desirable']} desirable (kept by every human pass that saw them) and "
                     f"{likes['undesirable']} undesirable images (of {likes['undesirable_judged']} rejected, drawn "
                     f"at {likes['undesirable_ratio']} per desirable), from {likes['labels']:,} curation "
                     "labels.")  # fmt: skip
    return lines


def write_preference(out: Path, scale: dict[str, Any], arms: list[Arm], state: dict[str, Any],
                     demo_state: dict[str, Any], curated: int) -> Path:  # fmt: skip
    """``<out>/PREFERENCE.md``, ``<out>/preference/results.json`` and the curve, from what the arms wrote."""
    metrics = {a.name: _load(out / a.metrics) for a in arms}
    head = metrics.get(arms[0].name) or {}
    total = sum(v.get("seconds", 0.0) for v in state.get("stages", {}).values())
    wall = wall_clock(state)
    took = f"{(wall[0] if wall else total) / 60:.1f} min"
    lines = [
        "# Beyond quality-tuning: Diffusion-DPO and KTO from people's judgments, per judgment spent",
        "",
        f"Scale `{scale['name']}`. Every arm starts from the demo's pre-trained model (`qt_dpo` from its "
        "quality-tuned one), trains with stage 2's recipe (rate, warm-up, EMA, images per step, checkpoint selection "
        "by the curation's judge) and differs in its data and loss only; its selected checkpoint is compared with the "
        "pre-trained model on the same "
        f"{head.get('n_prompts', 'n/a')} held-out prompts and seeds ({head.get('prompts', 'n/a')}) by the demo's pixel "
        "judge and tie band: paired win / tie / loss with 95% bootstrap intervals over prompts. "
        f"Wall time of the runs here: {took}, the data from people {_data_minutes(state)} of it "
        f"({state.get('finished', 'not finished')}). Samples: "
        f"`{BASE}/<arm>/eval/samples_*/` (the demo's own: `eval/`).",
        "",
        "| arm | recipe: trains on | human judgments used | stage 2 (selected step) | appeal: win / tie / loss, 95% | "
        "faithfulness: win / tie / loss | aesthetic head: win / tie / loss; CLIP score |",
        "| --- | --- | --- | ---: | --- | --- | --- |",
    ]
    rows = []
    for arm in arms:
        m = metrics.get(arm.name)
        paired = (m or {}).get("paired", {})
        count, what = judgments(out, arm, curated)
        sel = _load(out / arm.selection) or {}
        best = (sel.get("best") or {}).get("step")
        s2 = _seconds(arm, state, demo_state)
        ap, fa = paired.get("appeal"), paired.get("faithfulness")
        lines.append(
            f"| {arm.name} | {arm.recipe}: {arm.what} | {what} | "
            f"{'not run' if s2 is None else f'{s2 / 60:.1f} min'} ({best if best is not None else 'n/a'}) | "
            f"{format_win_rate(ap) if ap else 'not run'} | {_faith(fa) if fa else 'not run'} | {_aesthetic(m)} |"
        )
        rows.append({"arm": arm.name, "recipe": arm.recipe, "judgments": count, "judgments_what": what,
                     "selected_step": best, "stage2_seconds": s2, "appeal": ap, "faithfulness": fa,
                     "faithfulness_kept": faithfulness_kept(fa), "aesthetic": paired.get("aesthetic"),
                     "clip_scores": _clip_scores(m) if m else None})  # fmt: skip
    per = [r for r in rows if r["appeal"] and r["judgments"]]
    lines += ["", "## Appeal per judgment", ""]
    if per:
        lines += ["| arm | judgments | appeal win - loss | per 1,000 judgments |", "| --- | ---: | ---: | ---: |"]
        for r in per:
            net = r["appeal"]["win"] - r["appeal"]["loss"]
            lines.append(f"| {r['arm']} | {r['judgments']:,} | {_pct(net)} | {_pct(net * 1000 / r['judgments'])} |")
        lines.append("")
    plot = _plot(out, rows)
    if plot:
        lines += [f"![appeal win against human judgments]({plot})", ""]
    lines += ["## The judgments", "", *_data_lines(out), ""]
    lines += ["## Pictures", ""]
    for arm in arms:
        picture = f"{arm.folder}/eval/side_by_side.png".removeprefix("./")
        if (out / picture).is_file():
            lines += [f"**{arm.name}** ({arm.recipe}): the same prompts and seeds, tuned (top) over pre-trained "
                      "(bottom).", "", f"![{arm.name}]({picture})", ""]  # fmt: skip
    lines += [
        "## What is simulated",
        "",
        "- **The raters are simulated** (`python -m emu.mini.raters`): the pair task's votes come from the curation's "
        "aesthetic head on the mini CLIP plus each rater's noise, cast through the annotation app's own store and read "
        "back as people's votes are; the curation's labels come from simulated annotators reading the haystack's "
        "hidden attributes (REPORT.md). No person judged these images.",
        "- **The evaluation's pixel judge is independent of both**: it learnt from its own haystack sample and never "
        "scored a training pair. The aesthetic head column is *not* a second opinion for the DPO arms: it is the "
        "simulated raters' eyes (and checkpoint selection's judge for every arm).",
        "- Judgment counts are what each recipe's people did: every vote of a budget (confident or not), every label "
        "of the curation's human passes (a subset's share of them, estimated).",
        "",
    ]
    atomic_write_text(out / BASE / "results.json", json.dumps({"arms": rows}, indent=2))
    report = out / "PREFERENCE.md"
    atomic_write_text(report, "\n".join(lines))
    return report

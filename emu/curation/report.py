"""``funnel.md``: the funnel as a table beside the paper's, with what each stage removed."""

from __future__ import annotations

from typing import Any

from emu.paper import CURATION_FUNNEL as PAPER


def funnel_markdown(report: dict[str, Any], stages: list) -> str:
    notes = [a.note for s in stages if not getattr(s, "labels", None) for a in getattr(s, "annotators", None) or []
             if getattr(a, "simulated", False)]  # fmt: skip
    has_labels = "precision" in (report.get("final") or {})
    lines = ["# Curation funnel", ""]
    lines.append(
        f"{report['n_images']} images in, {report['final']['n']} curated out ({report['seconds']:.0f}s). {PAPER}"
    )
    lines.append("")
    if notes:
        lines += [f"**The human passes are simulated**: {notes[0]}", ""]
    head = "| stage | kind | rule | in | out | kept | s / 1K images |"
    sep = "| --- | --- | --- | ---: | ---: | ---: | ---: |"
    if has_labels:
        head += " needles in -> out | precision | recall |"
        sep += " ---: | ---: | ---: |"
    lines += [head, sep]
    for s in report["stages"]:
        frac = s["n_out"] / s["n_in"] if s["n_in"] else 0
        row = (f"| {s['stage']} | {s['kind']} | {s['rule']} | {s['n_in']} | {s['n_out']} | {100 * frac:.1f}% | "
               f"{s['seconds_per_1k']:.1f} |")  # fmt: skip
        if has_labels:
            row += (
                f" {s['needles_in']} -> {s['needles_out']} | {100 * s['precision']:.1f}% | {100 * s['recall']:.1f}% |"
            )
        lines.append(row)
    if has_labels:
        f = report["final"]
        lines += ["", f"**Final set**: {f['n']} images, precision {100 * f['precision']:.1f}% (true needles), "
                  f"recall {100 * f['recall']:.1f}% of the {report['needles']} needles in the corpus.", "",
                  "## What each stage removed, by hidden flaw", ""]  # fmt: skip
        for s in report["stages"]:
            removed = ", ".join(f"{k} {v}" for k, v in s.get("removed_by_flaw", {}).items()) or "nothing flawed"
            lines.append(f"- **{s['stage']}**: {removed}; flaw-free images removed: {s.get('removed_clean', 0)}")
    lines += ["", "## Examples", "", "Each sheet: kept images in the top row, rejected ones in the bottom row.", ""]
    lines += [f"- {s['stage']}: ![{s['stage']}](sheets/{s['stage']}.png)" for s in report["stages"]]
    return "\n".join(lines) + "\n"

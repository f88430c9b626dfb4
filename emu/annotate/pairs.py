"""Votes of a preference-pair task (:func:`~emu.annotate.tasks.make_pair_task`) as Diffusion-DPO's data: a folder of
``pairs.jsonl`` in Pick-a-Pic's columns with its images (:class:`~emu.data.pairs.PairSource` reads it).

The rules, stated once:

* **Attention checks**: a rater who failed more than ``max_failed_checks`` of theirs (a broken image preferred, a
  repeated pair answered otherwise) has all their votes left out.
* **Majority**: a pair's outcome is the most frequent of its counted votes (a tie between the most frequent is a tie);
  a tie carries no preference and is left out.
* **Agreement**: a pair is confident, and kept, when at least ``min_agreement`` of its votes chose its winner (with
  three raters: 2 of 3) and it has at least ``min_votes`` votes.
* **Budget**: with ``budget``, only the task's first pairs (in task order, whole) whose votes sum to at most
  ``budget``: what a smaller collection would have bought. The judgments charged are all those votes, confident or
  not, a left-out rater's too; the attention checks' votes are counted apart (``check_votes``, the whole task's).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from emu.annotate.tasks import load_task
from emu.evaluation.human_votes import majority, outcome, rater_stats, read_votes
from emu.utils.files import atomic_write_text


def confident_pairs(task: dict, votes: list[dict], budget: int | None = None, min_agreement: float = 2 / 3,
                    min_votes: int = 1, max_failed_checks: int = 1) -> tuple[list[dict], dict]:  # fmt: skip
    """The task's confident pairs as Pick-a-Pic rows (``jpg_0`` / ``jpg_1``: the task's image files, ``label_0``), and
    the accounting: votes charged, pairs within the budget, ties, unconfident pairs, raters left out."""
    question = task["question"]
    stats = rater_stats(votes, question, {})
    dropped = sorted(r for r, s in stats.items() if s["checks_failed"] > max_failed_checks)
    cast: dict[str, int] = {}  # every vote on a pair, what the budget pays for
    counted: dict[str, list[int]] = {}  # those that count: not a left-out rater's
    for v in votes:
        if v["question"] == question and not v.get("check"):
            cast[v["pair"]] = cast.get(v["pair"], 0) + 1
            if v["rater"] not in dropped:
                counted.setdefault(v["pair"], []).append(outcome(v))
    rows, spent, within, ties, unsure = [], 0, 0, 0, 0
    for p in task["pairs"]:
        if not cast.get(p["pair"]):
            continue
        if budget is not None and spent + cast[p["pair"]] > budget:
            break
        spent += cast[p["pair"]]
        within += 1
        outcomes = counted.get(p["pair"], [])
        if not outcomes:
            unsure += 1
            continue
        winner = majority(outcomes)
        agreement = outcomes.count(winner) / len(outcomes)
        if winner == 0:
            ties += 1
        elif agreement < min_agreement or len(outcomes) < min_votes:
            unsure += 1
        else:
            rows.append({"id": p["pair"], "caption": p["prompt"], "jpg_0": f"images/{p['a']}",
                         "jpg_1": f"images/{p['b']}", "label_0": 1 if winner == 1 else 0, "votes": len(outcomes),
                         "agreement": round(agreement, 4)})  # fmt: skip
    accounting = {"votes": spent, "pairs_voted": within, "confident": len(rows), "ties": ties, "unconfident": unsure,
                  "raters_dropped": dropped, "min_agreement": min_agreement, "min_votes": min_votes,
                  "max_failed_checks": max_failed_checks, "budget": budget,
                  "check_votes": sum(1 for v in votes if v["question"] == question and v.get("check")),
                  "simulated": any(v.get("simulated") for v in votes)}  # fmt: skip
    return rows, accounting


def export_pairs(task_dir: str | Path, out: str | Path, budget: int | None = None, min_agreement: float = 2 / 3,
                 min_votes: int = 1, max_failed_checks: int = 1) -> dict:  # fmt: skip
    """Write ``out/pairs.jsonl``, its images and ``out/pairs.json`` (the accounting of :func:`confident_pairs`) from
    a pair task's votes."""
    task_dir, out = Path(task_dir), Path(out)
    task = load_task(task_dir)
    if not task.get("preference_pairs"):
        raise ValueError(f"'{task_dir}' is not a preference-pair task (python -m emu.annotate pair-task): its sides "
                         "are two models, not two images of one model")  # fmt: skip
    votes, problems = read_votes(task_dir / task["answers"])
    rows, accounting = confident_pairs(task, votes, budget, min_agreement, min_votes, max_failed_checks)
    if not rows:
        raise ValueError(f"no confident pair in '{task_dir}' ({accounting})")
    (out / "images").mkdir(parents=True, exist_ok=True)
    for r in rows:
        for field in ("jpg_0", "jpg_1"):
            shutil.copy(task_dir / r[field], out / r[field])
    atomic_write_text(out / "pairs.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    accounting = {**accounting, "problems": len(problems), "task": str(task_dir.resolve())}
    atomic_write_text(out / "pairs.json", json.dumps(accounting, indent=1))
    return accounting

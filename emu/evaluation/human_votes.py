"""Pairwise A/B votes of human raters -> win / tie / loss with intervals, rater agreement and per-rater statistics.

The paper's headline numbers are majority votes: five raters per pair for visual appeal (prompt hidden), three for
text faithfulness (prompt shown). A vote is one JSONL row::

    {"pair": "p0007", "question": "appeal", "rater": "ana", "choice": "left" | "right" | "tie",
     "left": "a" | "b", "time": "2026-12-02T13:40:00Z", "check": null | "repeat" | "broken", "expect": null | "a" | "b"}

``left`` records the randomisation (which model was shown on the left), so a vote is turned into a model-level outcome
here, never by the annotation tool. ``check`` marks attention checks: ``repeat`` (a pair shown again, sides swapped,
``of`` naming the original when its id differs; its vote should agree with the first) and ``broken`` (one image
deliberately broken; ``expect`` is the other model). Checks are left out of the win rates and counted per rater.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from emu.evaluation.winrate import win_rates

QUESTIONS = ("appeal", "faithfulness")
CHOICES = ("left", "right", "tie")
CHECKS = (None, "repeat", "broken")


def check_vote(row: Any) -> str | None:
    """What is wrong with a vote row (None: nothing)."""
    if not isinstance(row, dict):
        return "not an object"
    for key in ("pair", "rater"):
        if not isinstance(row.get(key), str) or not row[key]:
            return f"'{key}' must be a non-empty string"
    if row.get("question") not in QUESTIONS:
        return f"'question' must be one of {QUESTIONS}"
    if row.get("choice") not in CHOICES:
        return f"'choice' must be one of {CHOICES}"
    if row.get("left") not in ("a", "b"):
        return "'left' must be 'a' or 'b'"
    if row.get("check") not in CHECKS:
        return f"'check' must be one of {CHECKS}"
    if row.get("check") == "broken" and row.get("expect") not in ("a", "b"):
        return "a 'broken' check needs 'expect': 'a' or 'b'"
    return None


def read_votes(path: str | Path) -> tuple[list[dict], list[str]]:
    """The valid votes of a JSONL file and a message per skipped line (a rater's second vote on a pair is skipped)."""
    votes, problems, seen = [], [], set()
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"line {i}: not JSON ({e.msg})")
            continue
        problem = check_vote(row)
        if not problem and (row["rater"], row["pair"], row["question"]) in seen:
            problem = f"a second vote of {row['rater']} on {row['pair']} ({row['question']}): the first one counts"
        if problem:
            problems.append(f"line {i}: {problem}")
        else:
            seen.add((row["rater"], row["pair"], row["question"]))
            votes.append(row)
    return votes, problems


def outcome(vote: dict) -> int:
    """+1: model A preferred, -1: model B, 0: tie (undoing the left / right randomisation)."""
    if vote["choice"] == "tie":
        return 0
    chosen_left = vote["choice"] == "left"
    return 1 if chosen_left == (vote["left"] == "a") else -1


def majority(outcomes: Sequence[int]) -> int:
    """The most frequent outcome; a tie between the most frequent ones is a tie (0)."""
    counts = Counter(outcomes).most_common()
    if not counts:
        raise ValueError("no votes")
    if len(counts) > 1 and counts[0][1] == counts[1][1]:
        return 0
    return counts[0][0]


def by_pair(votes: Iterable[dict], question: str) -> dict[str, list[dict]]:
    """The counted votes (attention checks left out) of one question, grouped by pair."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for v in votes:
        if v["question"] == question and not v.get("check"):
            groups[v["pair"]].append(v)
    return dict(groups)


def krippendorff_alpha(units: Iterable[Sequence[int]]) -> float:
    """Krippendorff's alpha for nominal data: 1 = perfect agreement, 0 = chance, < 0 = systematic disagreement.
    ``units``: the values each item received (items with fewer than two values carry no information)."""
    pairable = [list(u) for u in units if len(u) >= 2]
    if not pairable:
        return float("nan")
    cats = sorted({v for u in pairable for v in u})
    index = {c: i for i, c in enumerate(cats)}
    coincidence = np.zeros((len(cats), len(cats)))
    for u in pairable:
        counts = np.bincount([index[v] for v in u], minlength=len(cats)).astype(float)
        coincidence += (np.outer(counts, counts) - np.diag(counts)) / (len(u) - 1)
    n_c, n = coincidence.sum(1), coincidence.sum()
    observed = n - np.trace(coincidence)
    expected = (n * n - (n_c**2).sum()) / (n - 1)
    return 1.0 if expected == 0 else float(1 - observed / expected)


def rater_stats(votes: Sequence[dict], question: str, majorities: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Per rater: votes, agreement with the pair's majority, tie rate, how often they picked the left image (position
    bias), and attention checks failed."""
    per: dict[str, dict[str, Any]] = defaultdict(lambda: Counter())
    first: dict[tuple[str, str], int] = {}
    for v in votes:
        if v["question"] == question and not v.get("check"):
            first[(v["rater"], v["pair"])] = outcome(v)
    for v in votes:
        if v["question"] != question:
            continue
        s, o = per[v["rater"]], outcome(v)
        if v.get("check") == "broken":
            s["checks"] += 1
            s["checks_failed"] += int(o != (1 if v["expect"] == "a" else -1))
        elif v.get("check") == "repeat":
            s["checks"] += 1
            original = (v["rater"], v.get("of", v["pair"]))  # the pair it repeats (an app's repeat has its own id)
            s["checks_failed"] += int(original in first and first[original] != o)
        else:
            s["votes"] += 1
            s["agree"] += int(majorities.get(v["pair"]) == o)
            s["ties"] += int(o == 0)
            s["left"] += int(v["choice"] == "left")
    out = {}
    for rater, s in sorted(per.items()):
        n = s["votes"]
        out[rater] = {"votes": n, "agreement": s["agree"] / n if n else float("nan"),
                      "tie_rate": s["ties"] / n if n else float("nan"),
                      "left_rate": s["left"] / (n - s["ties"]) if n - s["ties"] else float("nan"),
                      "checks": s["checks"], "checks_failed": s["checks_failed"]}  # fmt: skip
    return out


def human_win_rates(votes: Sequence[dict], question: str, **kw) -> dict[str, Any]:
    """Model A vs model B on ``question`` from human votes: the majority per pair (the paper's rule), then win / tie /
    loss with bootstrap intervals over pairs (:func:`~emu.evaluation.winrate.win_rates`), Krippendorff's alpha over
    the raters' outcomes, the votes per pair and the per-rater statistics."""
    groups = by_pair(votes, question)
    if not groups:
        raise ValueError(f"no {question} votes")
    majorities = {pair: majority([outcome(v) for v in vs]) for pair, vs in groups.items()}
    result = win_rates(list(majorities.values()), **kw)
    per_pair = Counter(len(vs) for vs in groups.values())
    return {**result, "question": question, "pairs": len(groups), "votes": sum(len(vs) for vs in groups.values()),
            "votes_per_pair": {str(k): v for k, v in sorted(per_pair.items())},
            "alpha": krippendorff_alpha([outcome(v) for v in vs] for vs in groups.values()),
            "raters": rater_stats(votes, question, majorities)}  # fmt: skip


def human_results(votes: Sequence[dict], **kw) -> dict[str, Any]:
    """:func:`human_win_rates` for every question that has votes."""
    return {q: human_win_rates(votes, q, **kw) for q in QUESTIONS if by_pair(votes, q)}

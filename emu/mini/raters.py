"""Simulated raters for the miniature's A/B task: they take the task as people do (the next item the app would show
them, the sides it drew) and write their votes through the app's own store, so the demo exercises the same files
and import path as real raters. They are simulated and say so (``"simulated": true`` on every vote).

A rater prefers the image the evaluation's judge scores higher, after adding their own Gaussian noise to each
pair's score difference (the same draw when a pair comes back as a repeat check, so a steady rater answers it the
same), and calls it a tie within the tie band. A broken-image check is answered right unless the rater lapses::

    python -m emu.mini.raters outputs/demo/human_ab --scores outputs/demo/eval/scores.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from emu.annotate.store import AnswerStore
from emu.annotate.tasks import full, left_side, load_task, next_item, vote_key


def judge_scores(scores_jsonl: str | Path, name: str, key: str = "appeal") -> dict[tuple[str, int], float]:
    """``(prompt, seed) -> score`` of one model from an ``eval.py`` scores.jsonl."""
    out = {}
    for line in Path(scores_jsonl).read_text().splitlines():
        row = json.loads(line)
        out[(row["prompt"], int(row["seed"]))] = float(row[name][key])
    return out


def simulate_votes(task_dir: str | Path, scores_a: dict, scores_b: dict, raters: int = 5, noise: float = 0.5,
                   tie_band: float = 0.25, lapse: float = 0.05, seed: int = 0) -> int:  # fmt: skip
    """Let ``raters`` simulated raters (``sim0``...) answer everything the task gives them; returns the votes cast."""
    task_dir = Path(task_dir)
    task = load_task(task_dir)
    if task["kind"] != "ab":
        raise ValueError(f"'{task_dir}' is a {task['kind']} task; simulated A/B raters need an A/B task")
    store = AnswerStore(task_dir / task["answers"], vote_key)
    pairs = {p["pair"]: p for p in task["pairs"]}
    cast = 0
    for r in range(raters):
        rater = f"sim{r}"
        while (item := next_item(task, store.rows, rater)) is not None:
            original = pairs.get(item.get("of", item["pair"]))
            rng = random.Random(f"{seed}/{rater}/{original['pair'] if original else item['pair']}")
            if item.get("check") == "broken":
                wanted = item["expect"] if rng.random() >= lapse else ("a" if item["expect"] == "b" else "b")
            else:
                key = (original["prompt"], original["seed"])
                if key not in scores_a or key not in scores_b or math.isnan(scores_a[key] - scores_b[key]):
                    raise ValueError(f"no judge score for both models on {key}: the scores are not of this task")
                d = scores_a[key] - scores_b[key] + rng.gauss(0, noise)
                wanted = None if abs(d) <= tie_band else ("a" if d > 0 else "b")
            left = left_side(task, rater, item)
            choice = "tie" if wanted is None else ("left" if wanted == left else "right")
            row = {"pair": item["pair"], "question": task["question"], "rater": rater, "choice": choice, "left": left,
                   "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "check": item.get("check"),
                   "expect": item.get("expect"), "simulated": True}  # fmt: skip
            if item.get("check") == "repeat":
                row["of"] = item["of"]
            store.append(row, partial(full, task))
            cast += 1
    return cast


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m emu.mini.raters", description=__doc__.split("\n\n")[0])
    p.add_argument("task", type=Path, help="an A/B task folder of `python -m emu.annotate ab-task`")
    p.add_argument("--scores", type=Path, required=True, help="eval.py's scores.jsonl of the two models")
    p.add_argument("--raters", type=int, default=5)
    p.add_argument("--noise", type=float, default=0.5, help="each rater's noise on the judge's score difference")
    p.add_argument("--tie-band", type=float, default=0.25)
    args = p.parse_args(argv)
    try:
        task = load_task(args.task)
        scores = [judge_scores(args.scores, task["names"][side]) for side in ("a", "b")]
        n = simulate_votes(args.task, *scores, raters=args.raters, noise=args.noise, tie_band=args.tie_band)
    except (FileNotFoundError, ValueError) as e:
        print(f"raters error: {e}", file=sys.stderr)
        return 2
    print(f"{args.raters} simulated raters cast {n} votes into {args.task / task['answers']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

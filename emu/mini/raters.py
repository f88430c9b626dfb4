"""Simulated raters for the miniature's A/B task: they take the task as people do (the next item the app would show
them, the sides it drew) and write their votes through the app's own store, so the demo exercises the same files
and import path as real raters. They are simulated and say so (``"simulated": true`` on every vote).

A rater prefers the image a judge scores higher, after adding their own Gaussian noise to each pair's score
difference (the same draw when a pair comes back as a repeat check, so a steady rater answers it the same), and calls
it a tie within the tie band. A broken-image check is answered right unless the rater lapses. Which judge stands for
their eyes:

* ``--scores``: an ``eval.py`` scores.jsonl of the two models (the evaluation's judge): the demo's A/B task, which
  measures, so the judge that measures may answer it;
* ``--curation-judge CLIP HEAD``: the curation's aesthetic head on its CLIP, scoring the task's images themselves: a
  preference-pair task whose votes become training data (:mod:`emu.annotate.pairs`), which must never see the
  evaluation's judge (as checkpoint selection never does)::

    python -m emu.mini.raters outputs/demo/human_ab --scores outputs/demo/eval/scores.jsonl
    python -m emu.mini.raters outputs/demo/preference/pairs_task --curation-judge outputs/demo/clip/export \
        outputs/demo/curate/aesthetic.safetensors --raters 3
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import v2

from emu.annotate.store import AnswerStore
from emu.annotate.tasks import full, left_side, load_task, next_item, vote_key


def judge_scores(scores_jsonl: str | Path, name: str, key: str = "appeal") -> dict[tuple[str, int], float]:
    """``(prompt, seed) -> score`` of one model from an ``eval.py`` scores.jsonl."""
    out = {}
    for line in Path(scores_jsonl).read_text().splitlines():
        row = json.loads(line)
        out[(row["prompt"], int(row["seed"]))] = float(row[name][key])
    return out


def by_prompt_and_seed(scores_a: dict, scores_b: dict) -> Callable[[dict, str], float]:
    """A pair's side's score from :func:`judge_scores` of the two models (an A/B task of two models, one seed)."""

    def score(pair: dict, side: str) -> float:
        key = (pair["prompt"], pair["seed"])
        table = scores_a if side == "a" else scores_b
        if key not in table:
            raise ValueError(f"no judge score for both models on {key}: the scores are not of this task")
        return table[key]

    return score


def image_scores(task_dir: str | Path, judge, batch_size: int = 256) -> dict[str, float]:
    """Appeal of every image file of a task's pairs by ``judge`` (``score(images, prompts)["appeal"]``, e.g.
    :class:`~emu.curation.aesthetic.CurationJudge`), by file name."""
    task_dir = Path(task_dir)
    task = load_task(task_dir)
    files = sorted({p[side] for p in task["pairs"] for side in "ab"})
    prompts = {p[side]: p["prompt"] for p in task["pairs"] for side in "ab"}
    out = {}
    for i in range(0, len(files), batch_size):
        chunk = files[i : i + batch_size]
        images = torch.stack([_read(task_dir / "images" / f) for f in chunk])
        appeal = judge.score(images * 2 - 1, [prompts[f] for f in chunk])["appeal"]
        out.update({f: float(a) for f, a in zip(chunk, appeal.tolist(), strict=True)})
    return out


def _read(path: Path) -> torch.Tensor:
    """An image file as float C x H x W in [0, 1]."""
    pixels = v2.functional.pil_to_tensor(Image.open(path).convert("RGB"))
    return v2.functional.to_dtype(pixels, torch.float32, scale=True)


def simulate_votes(task_dir: str | Path, score: Callable[[dict, str], float], raters: int = 5, noise: float = 0.5,
                   tie_band: float = 0.25, lapse: float = 0.05, seed: int = 0) -> int:  # fmt: skip
    """Let ``raters`` simulated raters (``sim0``...) answer everything the task gives them, seeing ``score(pair, side)``
    (side ``a`` or ``b``) through their noise; returns the votes cast."""
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
                d = score(original, "a") - score(original, "b")
                if math.isnan(d):
                    raise ValueError(f"no judge score for both sides of {original['pair']} ({original['prompt']!r})")
                d += rng.gauss(0, noise)
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
    judge = p.add_mutually_exclusive_group(required=True)
    judge.add_argument("--scores", type=Path, help="eval.py's scores.jsonl of the two models (the evaluation's judge)")
    judge.add_argument("--curation-judge", nargs=2, metavar=("CLIP", "HEAD"),
                       help="the curation's CLIP export and aesthetic head, scoring the task's images")  # fmt: skip
    p.add_argument("--raters", type=int, default=5)
    p.add_argument("--noise", type=float, default=0.5, help="each rater's noise on the judge's score difference")
    p.add_argument("--tie-band", type=float, default=0.25)
    args = p.parse_args(argv)
    try:
        task = load_task(args.task)
        if args.scores:
            score = by_prompt_and_seed(*(judge_scores(args.scores, task["names"][side]) for side in ("a", "b")))
        else:
            from emu.curation.aesthetic import CurationJudge

            table = image_scores(args.task, CurationJudge(*args.curation_judge))
            score = lambda pair, side: table[pair[side]]
        n = simulate_votes(args.task, score, raters=args.raters, noise=args.noise, tie_band=args.tie_band)
    except (FileNotFoundError, ValueError) as e:
        print(f"raters error: {e}", file=sys.stderr)
        return 2
    print(f"{args.raters} simulated raters cast {n} votes into {args.task / task['answers']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

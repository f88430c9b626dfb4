"""Annotation tasks: a folder with ``task.json``, its images, and the answers (``labels.jsonl`` / ``votes.jsonl``).

* **curation**: the candidates of one human pass of ``curate.py`` (its export folder ``human/<stage>/``, whose
  ``candidates/`` hold one PNG per key). Each rater grades each candidate with the photography guideline's principles
  and keep / reject; the rows (``app_labels.jsonl``) are the labels format ``curate.py`` imports
  (``stages.<stage>.labels=.../app_labels.jsonl``).
* **ab**: two sample folders of the same prompts and seeds (``sample.py`` / ``eval.py`` output). Each pair is shown to
  ``raters_per_pair`` raters, left / right drawn per rater and pair and recorded; appeal is asked with the prompt
  hidden, faithfulness with it shown. Attention checks per rater: a few pairs again with the sides swapped
  (``repeat``) and a few where one image is broken (``broken``). The rows are :mod:`emu.evaluation.human_votes`'s.

What a rater sees next is a pure function of the task, the answers so far and the rater's name, so a restarted server
continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from emu.curation.human import PRINCIPLES
from emu.evaluation.human_votes import QUESTIONS
from emu.utils.files import atomic_write_text
from emu.utils.sample_folder import METADATA

TASK_FILE = "task.json"
GUIDELINE = {  # the paper's photography principles, as the checkboxes say them
    "composition": "Composition: balanced, the subject placed with intent, nothing important cut off",
    "lighting": "Lighting: dynamic, the subject well lit, neither flat nor over- or under-exposed",
    "color_contrast": "Colour and contrast: vivid colours, strong contrast, no muddy or washed-out tones",
    "subject_background": "Subject and background: a clear subject, an uncluttered background, no defects",
    "subjective": "Subjective: would you stop and look at it?",
}


def _coin(*parts: object) -> float:
    """A deterministic uniform number in [0, 1) from ``parts``."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _opaque(*parts: object) -> str:
    """A short id from ``parts`` that reveals none of them."""
    return hashlib.sha256("/".join(map(str, ("emu-annotate", *parts))).encode()).hexdigest()[:12]


def load_task(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / TASK_FILE
    if not path.is_file():
        raise FileNotFoundError(f"'{folder}' is not an annotation task (no {TASK_FILE}); make one with "
                                "`python -m emu.annotate curation-task` or `ab-task`")  # fmt: skip
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------------------- curation
def make_curation_task(export: str | Path, raters_per_item: int | None = None, seed: int = 0) -> Path:
    """Turn a human pass's export folder (``candidates.jsonl`` + ``candidates/``) into a curation task, in place."""
    export = Path(export)
    index = export / "candidates.jsonl"
    if not index.is_file():
        raise FileNotFoundError(f"'{export}' has no candidates.jsonl: point at a human stage's export folder "
                                "(<curate out>/human/<stage>/) of a curate.py run")  # fmt: skip
    items = [json.loads(line) for line in index.read_text().splitlines() if line.strip()]
    task = {
        "kind": "curation",
        "stage": export.name,
        "items": items,
        "principles": list(PRINCIPLES),
        "guideline": GUIDELINE,
        "raters_per_item": raters_per_item,
        "seed": seed,
        "answers": "app_labels.jsonl",
    }  # fmt: skip (not labels.jsonl: curate.py writes that one itself)
    atomic_write_text(export / TASK_FILE, json.dumps(task, indent=1))
    return export


def curation_key(row: dict) -> tuple:
    return (row["annotator"], row["key"])


# ---------------------------------------------------------------------------------------------------------------- A/B
def _read_samples(folder: Path) -> list[dict]:
    path = folder / METADATA
    if not path.is_file():
        raise FileNotFoundError(f"'{folder}' is not a sample folder (no {METADATA})")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def broken_image(like: Path, seed: int) -> Image.Image:
    """An obviously broken image of the same size: coarse random blocks."""
    w, h = Image.open(like).size
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(max(1, h // 8), max(1, w // 8), 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize((w, h), Image.NEAREST)


def make_ab_task(a: str | Path, b: str | Path, out: str | Path, question: str = "appeal", raters_per_pair: int = 5,
                 name_a: str = "a", name_b: str = "b", repeat_checks: int = 2, broken_checks: int = 2,
                 seed: int = 0) -> Path:  # fmt: skip
    """A pairwise task from two sample folders: pairs where prompt and seed agree, images copied into the task."""
    if question not in QUESTIONS:
        raise ValueError(f"question must be one of {QUESTIONS}, got {question!r}")
    if raters_per_pair < 1:
        raise ValueError(f"raters_per_pair must be >= 1, got {raters_per_pair}")
    a, b, out = Path(a), Path(b), Path(out)
    rows_b = {(r["prompt"], int(r["seed"])): r for r in _read_samples(b)}
    (out / "images").mkdir(parents=True, exist_ok=True)
    pairs = []
    for r in _read_samples(a):
        other = rows_b.get((r["prompt"], int(r["seed"])))
        if other is None:
            continue
        pid = _opaque(seed, "pair", len(pairs))  # ids and file names say nothing of the model or of checks
        names = {side: f"{_opaque(seed, 'image', pid, side)}.png" for side in "ab"}
        shutil.copy(a / r["file"], out / "images" / names["a"])
        shutil.copy(b / other["file"], out / "images" / names["b"])
        pairs.append({"pair": pid, "prompt": r["prompt"], "seed": int(r["seed"]), **names})
    if not pairs:
        raise ValueError(f"'{a}' and '{b}' share no (prompt, seed): nothing to compare")
    task = {"kind": "ab", "question": question, "show_prompt": question == "faithfulness", "pairs": pairs,
            "checks": _checks(pairs, out, seed, repeat_checks, broken_checks), "raters_per_pair": raters_per_pair,
            "names": {"a": name_a, "b": name_b}, "sources": {"a": str(a.resolve()), "b": str(b.resolve())},
            "seed": seed, "answers": "votes.jsonl"}  # fmt: skip
    atomic_write_text(out / TASK_FILE, json.dumps(task, indent=1))
    return out


def make_pair_task(samples: str | Path, out: str | Path, question: str = "appeal", raters_per_pair: int = 3,
                   repeat_checks: int = 2, broken_checks: int = 2, seed: int = 0) -> Path:  # fmt: skip
    """A pairwise task from one sample folder with two images per prompt (``sample.py n=2``: two seeds of one model):
    which of the two do people prefer? Its votes become preference pairs (:func:`emu.annotate.pairs.export_pairs`);
    sides ``a`` / ``b`` are a prompt's first and second seed. The pairs keep the folder's prompt order."""
    if question not in QUESTIONS:
        raise ValueError(f"question must be one of {QUESTIONS}, got {question!r}")
    if raters_per_pair < 1:
        raise ValueError(f"raters_per_pair must be >= 1, got {raters_per_pair}")
    samples, out = Path(samples), Path(out)
    by_prompt: dict[str, list[dict]] = {}
    for r in _read_samples(samples):
        by_prompt.setdefault(r["prompt"], []).append(r)
    (out / "images").mkdir(parents=True, exist_ok=True)
    pairs = []
    for prompt, rows in by_prompt.items():  # a prompt's images by seed, two by two (an odd one out is left)
        rows = sorted(rows, key=lambda r: int(r["seed"]))
        for first, second in zip(rows[0::2], rows[1::2], strict=False):
            pairs.append(_pair(samples, out, seed, len(pairs), prompt, first, second))
    if not pairs:
        raise ValueError(f"'{samples}' has no prompt with two images: sample it with n=2")
    task = {"kind": "ab", "question": question, "show_prompt": question == "faithfulness", "pairs": pairs,
            "checks": _checks(pairs, out, seed, repeat_checks, broken_checks), "raters_per_pair": raters_per_pair,
            "names": {"a": "first_seed", "b": "second_seed"}, "sources": {"a": str(samples.resolve()),
            "b": str(samples.resolve())}, "seed": seed, "answers": "votes.jsonl", "preference_pairs": True}  # fmt: skip
    atomic_write_text(out / TASK_FILE, json.dumps(task, indent=1))
    return out


def _pair(samples: Path, out: Path, seed: int, index: int, prompt: str, first: dict, second: dict) -> dict:
    """Pair ``index`` of a pair task: two sample rows of one prompt, their images copied in under opaque names."""
    pid = _opaque(seed, "pair", index)
    names = {side: f"{_opaque(seed, 'image', pid, side)}.png" for side in "ab"}
    shutil.copy(samples / first["file"], out / "images" / names["a"])
    shutil.copy(samples / second["file"], out / "images" / names["b"])
    return {"pair": pid, "prompt": prompt, "seed": int(first["seed"]), "seed_b": int(second["seed"]), **names}


def _checks(pairs: list[dict], out: Path, seed: int, repeat_checks: int, broken_checks: int) -> list[dict]:
    """A task's attention checks: ``repeat_checks`` pairs again with the sides swapped, ``broken_checks`` pairs with one
    image broken (written into ``out/images``)."""
    rng = random.Random(seed)
    checks = []
    for i, p in enumerate(rng.sample(pairs, min(repeat_checks, len(pairs)))):
        checks.append({"pair": _opaque(seed, "repeat", i), "check": "repeat", "of": p["pair"], "prompt": p["prompt"],
                       "a": p["a"], "b": p["b"]})  # fmt: skip
    for i, p in enumerate(rng.sample(pairs, min(broken_checks, len(pairs)))):
        side = rng.choice("ab")  # the broken one
        name = f"{_opaque(seed, 'broken', i)}.png"
        broken_image(out / "images" / p[side], seed + i).save(out / "images" / name)
        checks.append({"pair": _opaque(seed, "broken", i, "pair"), "check": "broken", "prompt": p["prompt"],
                       "expect": "b" if side == "a" else "a", "a": name if side == "a" else p["a"],
                       "b": name if side == "b" else p["b"]})  # fmt: skip
    return checks


def vote_key(row: dict) -> tuple:
    return (row["rater"], row["pair"], row["question"])


def left_side(task: dict, rater: str, item: dict) -> str:
    """Which model this rater sees on the left for this item: drawn per (rater, pair); a repeat check swaps it."""
    if item.get("check") == "repeat":
        return "b" if left_side(task, rater, {"pair": item["of"]}) == "a" else "a"
    return "a" if _coin(task["seed"], rater, item["pair"]) < 0.5 else "b"


# --------------------------------------------------------------------------------------------------------- assignment
def _order(task: dict, rater: str, ids: list[str], last: set[str] = frozenset()) -> list[str]:
    """A rater's own order of ``ids``; those in ``last`` (repeat checks) after all others, far from their originals."""
    return sorted(ids, key=lambda i: (i in last, _coin(task["seed"], "order", rater, i)))


def next_item(task: dict, rows: list[dict], rater: str) -> dict | None:
    """The item ``rater`` sees next (None: nothing left for them), from the answers so far."""
    if task["kind"] == "curation":
        done = {r["key"] for r in rows if r["annotator"] == rater}
        count = Counter(r["key"] for r in rows)
        quota = task.get("raters_per_item")
        items = {it["key"]: it for it in task["items"]}
        for key in _order(task, rater, list(items)):
            if key not in done and (quota is None or count[key] < quota):
                return items[key]
        return None
    done = {r["pair"] for r in rows if r["rater"] == rater}
    count = Counter(r["pair"] for r in rows if not r.get("check"))
    items = {p["pair"]: p for p in task["pairs"]} | {c["pair"]: c for c in task["checks"]}
    repeats = {c["pair"] for c in task["checks"] if c["check"] == "repeat"}
    for pid in _order(task, rater, list(items), repeats):
        item = items[pid]
        if pid in done or (not item.get("check") and count[pid] >= task["raters_per_pair"]):
            continue
        if item.get("check") == "repeat" and item["of"] not in done:
            continue  # a repeat only after the original
        return item
    return None


def progress(task: dict, rows: list[dict], rater: str | None = None) -> dict[str, int]:
    """Answers given (by ``rater``, or by all) and the total wanted."""
    if task["kind"] == "curation":
        per = task.get("raters_per_item")
        mine = [r for r in rows if rater is None or r["annotator"] == rater]
        total = len(task["items"]) * (per or 1) if rater is None else len(task["items"])
        return {"done": len(mine), "total": total}
    if rater is None:  # the votes the task wants: the quota of every pair (attention checks not counted)
        wanted = len(task["pairs"]) * task["raters_per_pair"]
        return {"done": sum(1 for r in rows if not r.get("check")), "total": wanted}
    mine = [r for r in rows if r["rater"] == rater]
    total = len(task["pairs"]) + len(task["checks"])  # at most: a pair whose quota others filled is not shown
    return {"done": len(mine), "total": total}


def full(task: dict, rows: list[dict], row: dict) -> bool:
    """Whether ``row`` would go past its item's quota (attention checks have none)."""
    if task["kind"] == "curation":
        quota = task.get("raters_per_item")
        return quota is not None and sum(1 for r in rows if r["key"] == row["key"]) >= quota
    if row.get("check"):
        return False
    return sum(1 for r in rows if r["pair"] == row["pair"] and not r.get("check")) >= task["raters_per_pair"]

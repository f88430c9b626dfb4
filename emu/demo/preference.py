"""Beyond supervised quality-tuning in miniature (``make preference``): Diffusion-DPO and Diffusion-KTO on the demo's
pre-trained model, from judgments people give, against Emu's quality-tuning per human judgment spent.

On top of a finished demo, into ``<demo>/preference/``:

- **data** (shared): the pre-trained model samples two images for each of ``prompts`` *training* captions
  (``haystack:N@0``: the corpus's own, never the evaluation's or the selection's); they become a pair task of the
  annotation app (``python -m emu.annotate pair-task``, ``raters_per_pair`` raters a pair, attention checks), which
  simulated raters answer through the app's store (``python -m emu.mini.raters --curation-judge``: the curation's
  aesthetic head with each rater's noise, never the evaluation's judge); each budget of ``votes`` becomes its confident
  pairs (``python -m emu.annotate export-pairs --budget``, the rules in :mod:`emu.annotate.pairs`). The curation's
  human passes become KTO's likes (``python -m emu.curation.likes``).
- **arms**, each a stage 2 from the demo's pre-trained model (stage 1) with stage 2's recipe and checkpoint selection,
  then the demo's eval against the pre-trained model (:func:`emu.demo.stages.eval_args`):
  ``qt_<n>``: quality-tuning on ``n`` of the curated images (the whole set is the demo's own stage 2: nothing runs);
  ``dpo_<votes>``: Diffusion-DPO on the pairs from ``votes`` votes; ``kto``: Diffusion-KTO on the likes;
  ``qt_dpo``: the demo's quality-tuned model, then DPO on the largest budget's pairs (its reference: the
  quality-tuned model).

A scale's ``preference:`` section sets the counts (:data:`DEFAULTS`). Nothing here trains or measures: it says what to
run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from emu.demo.stages import Stage, Step, _step, eval_args

DEFAULTS = {"prompts": None, "votes": [250, 500, 1000, 2000], "raters_per_pair": 3, "curated": [100], "kto": True,
            "qt_dpo": True, "undesirable_ratio": 1.0}  # fmt: skip
BASE = "preference"  # the folder, relative to the demo's
SELECTED = "checkpoints/select/best.ckpt"


@dataclass
class Arm:
    """One recipe's row: what it trains on, the human judgments it used (``judgments``: how they are counted) and its
    steps (none: the demo's own quality-tuning)."""

    name: str
    recipe: str  # quality-tuning | DPO | KTO | quality-tuning + DPO
    what: str
    metrics: str  # its eval's metrics.json, relative to the demo folder
    # where its judgment count comes from: "curation", "curation:<n>", "votes:<budget>", "votes+curation:<budget>"
    judgments: str
    selection: str  # its stage 2's selection.json
    stage: Stage | None = None

    @property
    def folder(self) -> str:
        return "." if self.stage is None else f"{BASE}/{self.name}"


def settings(scale: dict[str, Any]) -> dict[str, Any]:
    """The scale's ``preference:`` section over :data:`DEFAULTS`; ``prompts`` defaults to enough captions for the
    largest vote budget (a prompt gives one pair; the corpus repeats some captions, which give a pair each time)."""
    s = {**DEFAULTS, **(scale.get("preference") or {})}
    s["votes"] = sorted({int(v) for v in s["votes"] or []})
    if not s["votes"] and not s["kto"]:
        raise SystemExit("[preference] nothing to run: preference.votes is empty and preference.kto is false")
    if s["prompts"] is None:
        s["prompts"] = math.ceil(max(s["votes"], default=0) / int(s["raters_per_pair"]) * 1.1)
    return s


def data_steps(scale: dict[str, Any], curated: int) -> Stage:
    """The shared data: the candidate pairs, their task and votes, each budget's confident pairs, KTO's likes, and the
    subsets of the ``curated`` images that quality-tuning arms train on."""
    s = settings(scale)
    base = "{out}/" + BASE
    steps: list[Step] = []
    if s["votes"]:
        steps += [
            _step("candidates", "sample.py ckpt={out}/stage1/checkpoints/last.ckpt "
                  f"prompts=haystack:{s['prompts']}@0 sets=mini n=2 seed=0 out={base}/candidates",
                  f"{BASE}/candidates/metadata.jsonl",
                  run_dir=f"{BASE}/candidates", like="candidates", needs=()),
            _step("pair_task", f"-m emu.annotate pair-task {base}/candidates {base}/pair_task "
                  f"--raters-per-pair {s['raters_per_pair']}", f"{BASE}/pair_task/task.json", hydra=False,
                  outputs=f"{BASE}/pair_task", needs=("candidates",)),
            _step("pair_votes", f"-m emu.mini.raters {base}/pair_task --curation-judge {{out}}/clip/export "
                  f"{{out}}/curate/aesthetic.safetensors --raters {s['raters_per_pair']}",
                  f"{BASE}/pair_task/votes.jsonl", hydra=False, needs=("pair_task",)),
            _step("pair_results", f"-m emu.annotate results {base}/pair_task --out {base}/pair_task/results.json",
                  f"{BASE}/pair_task/results.json", hydra=False, needs=("pair_votes",)),
        ]  # fmt: skip
        for v in s["votes"]:
            steps.append(_step(f"pairs_{v}", f"-m emu.annotate export-pairs {base}/pair_task {base}/pairs_{v} "
                               f"--budget {v}", f"{BASE}/pairs_{v}/pairs.json", hydra=False,
                               outputs=f"{BASE}/pairs_{v}", needs=("pair_votes",)))  # fmt: skip
    if s["kto"]:
        steps.append(_step("likes", f"-m emu.curation.likes {{out}}/curate --out {base}/likes "
                           f"--undesirable-ratio {s['undesirable_ratio']}", f"{BASE}/likes/likes.json", hydra=False,
                           outputs=f"{BASE}/likes", needs=()))  # fmt: skip
    for n in subsets(s, curated):
        steps.append(_step(f"curated_{n}", f"-m emu.curation.subset --folder {{out}}/curate/curated --n {n} "
                           f"--seed 0 --out {base}/curated_{n}", f"{BASE}/curated_{n}/subset.json", hydra=False,
                           needs=()))  # fmt: skip
    return Stage("preference_data", "preference: data from people", steps)


def _arm(scale: dict[str, Any], name: str, experiment: str, train: str, needs: str) -> Stage:
    """An arm's stage 2 (``train.py experiment=<experiment> <train>``, resumable) and its eval against the demo's
    pre-trained model; it waits for the data step ``needs``."""
    base, arm = f"{BASE}/{name}", f"{{out}}/{BASE}/{name}"
    stage2 = _step(f"{name}/stage2", f"train.py experiment={experiment} {train}",
                   f"{base}/stage2/checkpoints/select/selection.json", run_dir=f"{base}/stage2", like="stage2",
                   resumable=True, follows_threads=True, needs=(needs,))  # fmt: skip
    ev = eval_args(scale, f"{arm}/stage2/{SELECTED}", name, f"{arm}/eval", accuracy=False)
    evaluation = _step(f"{name}/eval", ev, f"{base}/eval/metrics.json", run_dir=f"{base}/eval", like="eval",
                       needs=(stage2.name,))  # fmt: skip
    return Stage(name, f"preference: {name}", [stage2, evaluation])


def plan(scale: dict[str, Any], curated: int) -> tuple[Stage, list[Arm]]:
    """The data stage and the arms for ``scale`` over a demo whose curated set has ``curated`` images; the first arm
    is the demo's own quality-tuning (it runs nothing)."""
    s = settings(scale)
    arms = [
        Arm(
            f"qt_{curated}",
            "quality-tuning",
            f"the whole curated set ({curated} images; the demo's stage 2)",
            "eval/metrics.json",
            "curation",
            f"stage2/{SELECTED.replace('best.ckpt', 'selection.json')}",
        )
    ]
    for n in subsets(s, curated):
        train = f"data.source.root={{out}}/{BASE}/curated_{n}/curated"
        stage = _arm(scale, f"qt_{n}", "mini/stage2_quality_tune", train, f"curated_{n}")
        arms.append(Arm(f"qt_{n}", "quality-tuning", f"{n} of the curated images (seed 0)",
                        f"{BASE}/qt_{n}/eval/metrics.json", f"curation:{n}",
                        f"{BASE}/qt_{n}/stage2/checkpoints/select/selection.json", stage))  # fmt: skip
    for v in s["votes"]:
        stage = _arm(scale, f"dpo_{v}", "mini/stage2_dpo", f"data.source.root={{out}}/{BASE}/pairs_{v}", f"pairs_{v}")
        arms.append(Arm(f"dpo_{v}", "DPO", f"the confident pairs of {v} votes", f"{BASE}/dpo_{v}/eval/metrics.json",
                        f"votes:{v}", f"{BASE}/dpo_{v}/stage2/checkpoints/select/selection.json", stage))  # fmt: skip
    if s["kto"]:
        stage = _arm(scale, "kto", "mini/stage2_kto", f"data.source.root={{out}}/{BASE}/likes", "likes")
        arms.append(Arm("kto", "KTO", "the curation's human labels as likes (desirable: kept by every pass)",
                        f"{BASE}/kto/eval/metrics.json", "curation",
                        f"{BASE}/kto/stage2/checkpoints/select/selection.json", stage))  # fmt: skip
    if s["qt_dpo"] and s["votes"]:
        v = s["votes"][-1]
        stage = _arm(scale, "qt_dpo", "mini/stage2_dpo", f"data.source.root={{out}}/{BASE}/pairs_{v} "
                     f"model.init_from={{out}}/stage2/{SELECTED}", f"pairs_{v}")  # fmt: skip
        arms.append(Arm("qt_dpo", "quality-tuning + DPO", f"the demo's quality-tuned model, then DPO on {v} votes' "
                        "pairs", f"{BASE}/qt_dpo/eval/metrics.json", f"votes+curation:{v}",
                        f"{BASE}/qt_dpo/stage2/checkpoints/select/selection.json", stage))  # fmt: skip
    return data_steps(scale, curated), arms


def subsets(s: dict[str, Any], curated: int) -> list[int]:
    """The quality-tuning arms' subset sizes: those of ``s["curated"]`` below the curated set's size."""
    return sorted({int(c) for c in s["curated"] or [] if int(c) < curated})

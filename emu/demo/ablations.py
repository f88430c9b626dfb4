"""The paper's ablations in miniature (``make ablations``): the arms, each a short list of entry-point commands.

Run on top of a finished demo folder; each arm lives in ``<demo>/ablations/<arm>/``:

- **curated subsets** (``curated_<n>``): quality-tuning on ``n`` images drawn by seed from the curated set (the
  paper: even 100 curated images help); the whole set is the demo's own stage 2 (``stage2/``, ``eval/``);
- **random images** (``random_<n>``): the same counts drawn from the whole haystack corpus: quality vs quantity;
- **automatic filters only** (``automatic_<n>``): as many images as the curated set, drawn from what the last
  automatic stage of the funnel kept, before the human passes;
- **training lengths** (``steps_<s>``): the demo's stage-2 checkpoints at about half the selected step and at the
  last one, and the demo's stage 2 resumed to a longer run: over-training;
- **seeds** (``seed_<s>``): stage 2 again on the whole curated set with other seeds: how much of an effect is noise;
- **LoRA** (``lora_r<r>``): stage 2 on the whole curated set training rank-``r`` adapters alone (``model.lora``, alpha
  = rank, the U-Net's attention projections) at ``lora_lr``, beside the full fine-tuning of the demo's stage 2.

Every arm is evaluated like the demo's own ``eval`` step (:func:`emu.demo.stages.eval_args`): against the same
pre-trained model on the same prompts and seeds with the same judge, into ``<arm>/eval/metrics.json``. The data of an
arm comes from ``python -m emu.curation.subset``; training from ``train.py experiment=mini/stage2_quality_tune``.
Nothing here trains or measures: it says what to run. A scale's ``ablations:`` section sets the counts and seeds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emu.demo.stages import Stage, Step, _step, eval_args

SELECT = "stage2/checkpoints/select"  # the demo's stage-2 checkpoint selection, relative to the demo folder
DEFAULTS = {"curated": [100, 300], "random": True, "automatic": True, "data_seed": 0, "lengths": True,
            "longer_steps": None, "seeds": [1, 2], "lora": [], "lora_lr": None}  # fmt: skip


@dataclass
class Arm:
    """One ablation: what it trains on and the steps that make and evaluate it (none: the demo's own run)."""

    name: str
    group: str  # curated | random | automatic | length | seed | lora
    what: str  # what it trains on, in words
    images: int  # training images
    metrics: str  # its eval's metrics.json, relative to the demo folder
    stage: Stage | None = None
    subset: str | None = None  # its data's subset.json (what was drawn), relative to the demo folder
    step: int | None = None  # the quality-tuning step evaluated, where the arm is about training length
    seed: int = 0
    selection: str | None = None  # a stage-2 run's selection.json (the judge's scores per step)


def settings(scale: dict[str, Any]) -> dict[str, Any]:
    """The scale's ``ablations:`` section over :data:`DEFAULTS`."""
    return {**DEFAULTS, **(scale.get("ablations") or {})}


def demo_facts(out: Path, who: str = "ablations") -> dict[str, Any]:
    """What the plan needs of a finished demo: the curated set's size, the funnel's last automatic stage and the
    stage-2 selection; a clear error naming what is missing otherwise."""
    need = {
        "curate/curated/metadata.jsonl": "curation",
        "curate/funnel.json": "curation",
        f"{SELECT}/selection.json": "stage2",
        "eval/metrics.json": "eval",
        "stage1/checkpoints/last.ckpt": "stage1",
    }
    missing = [f"{path} ({stage})" for path, stage in need.items() if not (out / path).is_file()]
    if missing:
        raise SystemExit(f"[{who}] {out} is not a finished demo: missing {', '.join(missing)}. Run the demo first "
                         f"(make demo, or python -m emu.demo --out {out}) at the same scale.")  # fmt: skip
    curated = sum(1 for line in (out / "curate/curated/metadata.jsonl").open() if line.strip())
    funnel = json.loads((out / "curate/funnel.json").read_text())
    automatic = [s["stage"] for s in funnel["stages"] if s["kind"] == "automatic"]
    selection = json.loads((out / SELECT / "selection.json").read_text())
    return {"curated": curated, "automatic_stage": automatic[-1] if automatic else None, "selection": selection}


def _arm_steps(name: str, scale: dict[str, Any], data: Step | None, train_args: str | None, ckpt: str,
               train_last: tuple[str, ...] = ()) -> Stage:  # fmt: skip
    """An arm's stage: its data (``data``), a stage-2 run (``train_args`` over the mini experiment, then the scale's
    stage-2 overrides, then ``train_last``) and its eval of ``ckpt`` (``{out}`` for the demo folder, ``{arm}`` for the
    arm's)."""
    arm = f"{{out}}/ablations/{name}"
    steps = [data] if data else []
    if train_args is not None:
        run_dir = f"ablations/{name}/stage2"
        args = f"train.py experiment=mini/stage2_quality_tune {train_args}".replace("{arm}", arm).strip()
        steps.append(_step(f"{name}/stage2", args, f"{run_dir}/checkpoints/select/selection.json", run_dir=run_dir,
                           resumable=True, like="stage2", last=train_last, follows_threads=True))  # fmt: skip
    ev = eval_args(scale, ckpt.replace("{arm}", arm), name, f"{arm}/eval", accuracy=False)
    steps.append(_step(f"{name}/eval", ev, f"ablations/{name}/eval/metrics.json", run_dir=f"ablations/{name}/eval",
                       like="eval"))  # fmt: skip
    for i, step in enumerate(steps):  # an arm reads only the finished demo and its own steps: arms run side by side
        step.needs = (steps[i - 1].name,) if i else ()
    return Stage(name, f"ablation {name}", steps)


def _data(name: str, source: str, n: int, seed: int) -> Step:
    """``python -m emu.curation.subset``: ``n`` images drawn by ``seed`` into ``<arm>/data``; ``source`` is
    ``--folder ...`` (a curated set, no config) or ``--funnel ...`` (the corpus, read with curate.py's data)."""
    out = f"ablations/{name}/data"
    args = f"-m emu.curation.subset {source} --n {n} --seed {seed} --out {{out}}/{out}"
    if source.startswith("--funnel"):  # the corpus as the demo's curation read it
        args += " experiment=mini/curate"
    return _step(f"{name}/data", args, f"{out}/subset.json", hydra=source.startswith("--funnel"), like="curate")


BEST = "{arm}/stage2/checkpoints/select/best.ckpt"  # what an arm's own stage 2 selected
ON_SUBSET = "data.source.root={arm}/data/curated"  # train on the arm's drawn set


def _arm(scale: dict[str, Any], name: str, group: str, what: str, images: int, data: Step | None = None,
         train: str | None = ON_SUBSET, ckpt: str = BEST, train_last: tuple[str, ...] = (), **kw) -> Arm:  # fmt: skip
    """An arm that runs: its data (``data``), its stage 2 (``train``: None for none) and its eval of ``ckpt``."""
    return Arm(name, group, what, images, f"ablations/{name}/eval/metrics.json",
               _arm_steps(name, scale, data, train, ckpt, train_last),
               subset=f"ablations/{name}/data/subset.json" if data else None, **kw)  # fmt: skip


def plan(scale: dict[str, Any], facts: dict[str, Any]) -> list[Arm]:
    """The arms for ``scale`` over a demo described by ``facts`` (:func:`demo_facts`); the first is the demo's own
    quality-tuned model (seed 0, the whole curated set), which runs nothing."""
    s, n, sel = settings(scale), int(facts["curated"]), facts["selection"]
    seed = int(s["data_seed"])
    best = (sel.get("best") or {}).get("step")
    arms = [Arm(f"curated_{n}", "curated", "the whole curated set (the demo's own stage 2)", n, "eval/metrics.json",
                step=best, selection=f"{SELECT}/selection.json")]  # fmt: skip
    counts = sorted({int(c) for c in s["curated"] or [] if int(c) < n})
    for c in counts:
        data = _data(f"curated_{c}", "--folder {out}/curate/curated", c, seed)
        arms.append(_arm(scale, f"curated_{c}", "curated", f"{c} of the curated set (seed {seed})", c, data))
    for c in [*counts, n] if s["random"] else []:
        data = _data(f"random_{c}", "--funnel {out}/curate", c, seed)
        arms.append(_arm(scale, f"random_{c}", "random", f"{c} random haystack images (seed {seed})", c, data))
    stage = facts.get("automatic_stage")
    if s["automatic"] and stage:
        data = _data(f"automatic_{n}", f"--funnel {{out}}/curate --kept-by {stage}", n, seed)
        what = f"{n} images the automatic filters kept (after `{stage}`; no human pass; seed {seed})"
        arms.append(_arm(scale, f"automatic_{n}", "automatic", what, n, data))
    for step in length_steps(sel) if s["lengths"] else []:
        what = f"the whole curated set, step {step} of the demo's stage 2"
        ckpt = f"{{out}}/{SELECT}/step_{step:07d}.ckpt"
        arms.append(_arm(scale, f"steps_{step}", "length", what, n, train=None, ckpt=ckpt, step=step))
    longer, last = s["longer_steps"], max((r["step"] for r in sel.get("rows", [])), default=0)
    if longer and int(longer) > last:
        longer = int(longer)
        what = f"the whole curated set, the demo's stage 2 resumed to step {longer}"
        arms.append(_arm(scale, f"steps_{longer}", "length", what, n,
                         train="ckpt_path={out}/stage2/checkpoints/last.ckpt",  # the driver's ckpt_path=last wins
                         ckpt=f"{{arm}}/stage2/checkpoints/select/step_{longer:07d}.ckpt",
                         train_last=(f"trainer.max_steps={longer}",), step=longer,
                         selection=f"ablations/steps_{longer}/{SELECT}/selection.json"))  # fmt: skip
    for sd in s["seeds"] or []:
        what = f"the whole curated set, stage 2 with seed {sd}"
        arms.append(_arm(scale, f"seed_{sd}", "seed", what, n, train=f"seed={sd}", seed=int(sd),
                         selection=f"ablations/seed_{sd}/{SELECT}/selection.json"))  # fmt: skip
    for rank in s["lora"] or []:
        rank, lr = int(rank), s["lora_lr"]
        what = f"the whole curated set, LoRA rank {rank} (alpha {rank}) on the attention projections" + (
            f", lr {lr:g}" if lr else "")  # fmt: skip
        train = f"model.lora.rank={rank} model.lora.alpha={rank}" + (f" model.lr={lr}" if lr else "")
        arms.append(_arm(scale, f"lora_r{rank}", "lora", what, n, train=train,
                         selection=f"ablations/lora_r{rank}/{SELECT}/selection.json"))  # fmt: skip
    return arms


def selected_checkpoint(arm: Arm) -> str:
    """The checkpoint an arm's stage 2 selected (the demo's own for the headline), relative to the demo folder."""
    return f"{SELECT}/best.ckpt" if arm.stage is None else f"ablations/{arm.name}/{SELECT}/best.ckpt"


def length_steps(selection: dict[str, Any]) -> list[int]:
    """The scored checkpoints to evaluate besides the selected one: the nearest to half its step, and the last."""
    steps = sorted(r["step"] for r in selection.get("rows", []) if r.get("ckpt") and r["step"] > 0)
    best = (selection.get("best") or {}).get("step")
    if not steps or best is None:
        return []
    others = [s for s in steps if s != best]
    half = min(others, key=lambda s: (abs(s - best / 2), s), default=None)
    return sorted({s for s in (half, steps[-1]) if s is not None and s != best})

"""The stages of ``make demo``: the whole recipe in miniature as a list of entry-point commands.

Each :class:`Step` is one command of the real entry points (``train.py``, ``curate.py``, ``eval.py`` or a module's
CLI) and the file it leaves when finished; a :class:`Stage` groups the steps whose wall time the report shows.
Nothing here trains or measures anything itself: it only says what to run, in which order, with which overrides.

Every Hydra command gets ``paths.demo_dir=<out>`` (the mini experiments read the earlier stages' outputs from
there) and ``hydra.run.dir=<out>/<folder>``, so a stage's outputs live in ``<out>/<stage>/`` and an interrupted
training run resumes from its own ``checkpoints/last.ckpt``. A scale (``conf/demo/<scale>.yaml``) adds its
overrides per step and sets the corpus size and the evaluation's prompts.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PY = sys.executable


@dataclass
class Step:
    """One command; ``done`` (relative to the demo folder) exists once it has finished."""

    name: str
    argv: list[str]
    done: str
    hydra: bool = True  # a Hydra entry point: gets paths.demo_dir, hydra.run.dir and the scale's overrides
    run_dir: str | None = None  # its Hydra run folder, relative to the demo folder
    resumable: bool = False  # a train.py run: resume from <run_dir>/checkpoints/last.ckpt when it exists
    # reads the haystack corpus: "images", its shards (<out>/haystack/*.tar), or "latents", its precomputed latents
    corpus: str | None = None
    like: str | None = None  # takes the scale's overrides of this step (default: its own name's)
    last: tuple[str, ...] = ()  # Hydra overrides after the scale's: they win over them
    # the steps whose outputs it reads: it may start once they finished, beside other steps (the driver's --jobs);
    # None: after every step listed before it
    needs: tuple[str, ...] | None = None
    # follows the driver's thread budget (emu.training.threads): a train.py run, the latents' precompute
    follows_threads: bool = False
    outputs: str | None = None  # the folder it writes, if not its run folder: removed when it starts over (--only)
    intermediate: bool = False  # its outputs only feed the steps that need it: not run once they all finished


@dataclass
class Stage:
    name: str
    title: str
    steps: list[Step] = field(default_factory=list)


def _step(name: str, args: str, done: str, **kw) -> Step:
    """A step from a command line (``{out}`` stands for the demo folder) run with this Python."""
    return Step(name, [PY, *shlex.split(args)], done, **kw)


# the data overrides of a step that reads the corpus as written (the shards curation reads), not rendered on the fly
CORPUS = {
    "images": ["data=webdataset", "data.source.shards={out}/haystack/*.tar"],
    # stage 1's latents and text embeddings, precomputed once in both orientations (emu.diffusion.precompute)
    "latents": ["data=latents", "data.source.shards={out}/latents/train/*.tar"],
}


def _train(name: str, experiment: str, done: str | None = None, **kw) -> Step:
    """``train.py experiment=<experiment>`` into ``<out>/<name>``, resumable from its ``last.ckpt``."""
    done = done or f"{name}/checkpoints/last.ckpt"
    return _step(name, f"train.py experiment={experiment}", done, run_dir=name, resumable=True, follows_threads=True,
                 **kw)  # fmt: skip


def eval_args(scale: dict[str, Any], a: str, name_a: str, out: str, accuracy: bool = True,
              b: str = "{out}/stage1/checkpoints/last.ckpt") -> str:  # fmt: skip
    """``eval.py``: ``a`` (named ``name_a``) vs the pre-trained model ``b`` (the demo's stage 1) on the scale's
    held-out prompts and seeds, judged as in the demo; ``accuracy`` also measures the judge and the CLIP themselves and
    the judge's headroom (the same for every comparison: once is enough). ``{out}`` stands for the demo folder."""
    ev = scale["eval"]
    judge, clip = (ev["judge_accuracy"], ev.get("clip_accuracy", 1000)) if accuracy else (0, 0)
    headroom = ev.get("headroom", 0) if accuracy else 0
    return (
        f"eval.py experiment=mini/eval a={a} b={b} name_a={name_a} name_b=pretrained "
        f"prompts={ev['prompts']} clip={{out}}/clip/export aesthetic={{out}}/curate/aesthetic.safetensors judge=pixel "
        f"fid.reference={ev['fid_reference']} checks.judge_accuracy.n={judge} checks.clip_accuracy.n={clip} "
        f"checks.headroom.n={headroom} out={out}"
    )


def demo_stages(scale: dict[str, Any]) -> list[Stage]:
    """The miniature's stages in order; ``scale`` is a ``conf/demo/<scale>.yaml`` as a plain dict."""
    ev = scale["eval"]
    haystack = f"-m emu.mini.haystack --n {int(scale['corpus'])} --seed 0 --out {{out}}/haystack"
    data_check = (
        "bench/data_throughput.py data=webdataset data.source.shards={out}/haystack/*.tar data.num_workers=1 "
        f"batches={scale.get('data_check_batches', 20)} grid={{out}}/haystack/first_batch.png"
    )
    ae_eval = (
        "eval.py experiment=mini/eval a={out}/autoencoder_16ch/export b={out}/autoencoder_4ch/export name_a=16ch "
        f"name_b=4ch clip={{out}}/clip/export aesthetic=null judge=pixel "
        f"autoencoder.images=haystack:{ev['autoencoder_images']} "
        "out={out}/autoencoder_eval"
    )
    aesthetic = (
        "-m emu.mini.aesthetic --clip {out}/clip/export --out {out}/curate/aesthetic.safetensors "
        f"--n {scale.get('aesthetic_images', 5000)} --epochs {scale.get('aesthetic_epochs', 60)}"
    )
    evaluation = eval_args(scale, "{out}/stage2/checkpoints/select/best.ckpt", "quality_tuned", "{out}/eval")
    ab_task = ("-m emu.annotate ab-task {out}/eval/samples_quality_tuned {out}/eval/samples_pretrained {out}/human_ab "
               "--question appeal --name-a quality_tuned --name-b pretrained")  # fmt: skip
    return [
        Stage("haystack", "haystack corpus", [
            _step("haystack", f"{haystack} --workers {scale.get('workers', 2)}", "haystack/haystack.json", hydra=False),
            _step("data_check", data_check, "haystack/first_batch.png", needs=("haystack",)),
        ]),
        Stage("judge", "evaluation judge", [_train("judge", "mini/judge", needs=())]),  # its own haystack seed
        Stage("text", "mini CLIP and T5", [
            _train("clip", "mini/clip", "clip/export/config.json", corpus="images", needs=("haystack",)),
            _step("t5", "-m emu.mini.t5 --out {out}/t5", "t5/config.json", hydra=False, needs=()),
        ]),
        Stage("autoencoders", "16- and 4-channel autoencoders", [
            _train("autoencoder_16ch", "mini/autoencoder", "autoencoder_16ch/export/config.json", corpus="images",
                   needs=("haystack",)),
            _train("autoencoder_4ch", "mini/autoencoder_4ch", "autoencoder_4ch/export/config.json", corpus="images",
                   needs=("haystack",)),
            _step("autoencoder_eval", ae_eval, "autoencoder_eval/metrics.json", run_dir="autoencoder_eval",
                  needs=("autoencoder_16ch", "autoencoder_4ch", "clip", "judge")),
        ]),
        Stage("stage1", "stage 1: pre-training", [
            # the frozen autoencoder and text encoders run once over the corpus instead of at every step (the flipped
            # images and swapped captions too: stage 1 trains with flips), with stage 1's data settings
            _step("latents", "-m emu.diffusion.precompute --out {out}/latents experiment=mini/stage1_pretrain",
                  "latents/precompute.json", corpus="images", like="stage1", outputs="latents", intermediate=True,
                  follows_threads=True, needs=("haystack", "clip", "t5", "autoencoder_16ch")),
            _train("stage1", "mini/stage1_pretrain", corpus="latents", needs=("latents",)),
        ]),
        Stage("curation", "curation", [
            _step("aesthetic_head", aesthetic, "curate/aesthetic.safetensors", hydra=False, needs=("clip",)),
            _step("curate", "curate.py experiment=mini/curate", "curate/funnel.json", run_dir="curate",
                  needs=("haystack", "clip", "aesthetic_head")),
        ]),
        # selection.json is written from the first scoring on; the driver's state says when the run finished
        Stage("stage2", "stage 2: quality-tuning", [
            _train("stage2", "mini/stage2_quality_tune", "stage2/checkpoints/select/selection.json",
                   needs=("stage1", "curate")),  # selection scores with the curation's judge (clip, aesthetic head)
        ]),
        Stage("eval", "evaluation", [
            _step("eval", evaluation, "eval/metrics.json", run_dir="eval",
                  needs=("stage2", "judge", "clip", "aesthetic_head")),
        ]),
        # the same comparison as an A/B task of the annotation app, answered by simulated raters (the judge + noise)
        Stage("human_ab", "A/B task, simulated raters", [
            _step("ab_task", ab_task, "human_ab/task.json", hydra=False, outputs="human_ab"),
            _step("ab_votes", "-m emu.mini.raters {out}/human_ab --scores {out}/eval/scores.jsonl",
                  "human_ab/votes.jsonl", hydra=False),
            _step("ab_results", "-m emu.annotate results {out}/human_ab --out {out}/human_ab/results.json",
                  "human_ab/results.json", hydra=False),
        ]),
    ]  # fmt: skip


def command(step: Step, out: Path, scale: dict[str, Any], resume: bool) -> list[str]:
    """The argv of ``step`` for the demo folder ``out`` at ``scale`` (its corpus size and overrides)."""
    argv = [a.replace("{out}", str(out)) for a in step.argv]
    if step.hydra:
        argv.append(f"paths.demo_dir={out}")
        if step.corpus:  # the haystack source's own keys go: the corpus is read from the demo folder
            argv += [a.replace("{out}", str(out)) for a in CORPUS[step.corpus]]
            argv += ["~data.source.n_train", "~data.source.n_val"]
        argv += list((scale.get("overrides") or {}).get(step.like or step.name, []))
        argv += [a.replace("{out}", str(out)) for a in step.last]
        if step.run_dir:
            argv.append(f"hydra.run.dir={out / step.run_dir}")
        if resume:
            argv.append("ckpt_path=last")
    return argv

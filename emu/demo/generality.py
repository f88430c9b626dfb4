"""The paper's generality claim in miniature (``make generality``): quality-tuning other architectures.

The Emu paper retrains an Imagen-like pixel diffusion model and a Muse-like masked transformer, quality-tunes each on
the same curated images and reports gains in appeal and faithfulness for both. On top of a finished demo, each
architecture here is one arm in ``<demo>/generality/<arch>/``:

- ``stage1``: ``train.py experiment=mini/stage1_<arch>`` on the demo's corpus, as long as the demo's stage 1;
- ``stage2``: ``train.py experiment=mini/stage2_quality_tune_<arch>`` from it, on the demo's curated set with its
  checkpoint selection;
- ``eval``: the selected checkpoint against the arm's own pre-trained model with the demo's protocol
  (:func:`emu.demo.stages.eval_args`: the held-out prompts and seeds, the same judge and tie band, bootstrap
  intervals; samples kept as ``eval/samples_*``).

The first row is the demo's own latent U-Net (its stage 1, 2 and eval: nothing runs). The arms:

- ``dit``: a diffusion transformer trained by rectified flow (SD3-like; conf/model/dit_mini.yaml) on the demo's
  precomputed latents, sampled by Euler on the flow's time grid;
- ``pixel``: a pixel-space U-Net (Imagen-like; conf/model/pixel_mini.yaml) at 32 px on the corpus's images;
- ``maskgit``: a masked generative transformer (Muse-like; conf/model/maskgit_mini.yaml) over FSQ tokens of the demo's
  latents; its tokenizer (``tokenizer``: ``train.py experiment=mini/tokenizer``) trains first, on the precomputed
  latents, and its samples are decoded in 12 parallel steps.

A scale's ``generality:`` section lists the arms (``arms``). Nothing here trains or measures: it says what to run.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from emu.demo.stages import Stage, _step, demo_stages, eval_args

ARCHITECTURES = {  # name -> (what it is, in words; its eval's extra overrides)
    "dit": ("diffusion transformer, rectified flow (SD3-like), on the latents", "sampling.sampler=euler"),
    "pixel": ("pixel-space U-Net (Imagen-like), 32 px, no autoencoder", ""),
    "maskgit": (
        "masked generative transformer (Muse-like), FSQ tokens of the latents",
        "sampling.sampler=maskgit sampling.steps=12",
    ),
}
DEFAULTS = {"arms": list(ARCHITECTURES)}
# stage 1 reads the precomputed latents, or the images themselves
CORPUS = {"dit": "latents", "pixel": "images", "maskgit": "latents"}
TOKENIZED = ("maskgit",)  # arms whose stage 1 reads the tokens of a tokenizer they train first


@dataclass
class Arch:
    """One architecture's row: its runs (none: the demo's own) and where they leave their results."""

    name: str
    what: str
    stage1: str  # its pre-trained checkpoint, relative to the demo folder
    selection: str  # its stage 2's selection.json
    metrics: str  # its eval's metrics.json
    stage: Stage | None = None

    @property
    def folder(self) -> str:
        return "." if self.stage is None else f"generality/{self.name}"


def settings(scale: dict[str, Any]) -> dict[str, Any]:
    """The scale's ``generality:`` section over :data:`DEFAULTS`; unknown arms are refused."""
    s = {**DEFAULTS, **(scale.get("generality") or {})}
    unknown = [a for a in s["arms"] if a not in ARCHITECTURES]
    if unknown:
        raise SystemExit(f"[generality] unknown arm(s) {unknown}: choose from {list(ARCHITECTURES)}")
    return s


def arm_steps(scale: dict[str, Any], name: str, latents: bool = False, after: str | None = None) -> Stage:
    """Stage 1, stage 2 and eval of architecture ``name`` into ``<demo>/generality/<name>/`` (a tokenized arm's
    tokenizer before them); ``latents``: first the demo's precompute of the corpus's latents (a demo folder may lack
    them: its stage 1 ran before they existed); ``after``: a step of another arm the first step waits for (that arm's
    precompute of the latents)."""
    base = f"generality/{name}"
    train = dict(resumable=True, follows_threads=True)
    stage1 = _step(f"{name}/stage1", f"train.py experiment=mini/stage1_{name}", f"{base}/stage1/checkpoints/last.ckpt",
                   run_dir=f"{base}/stage1", corpus=CORPUS[name], like="stage1", **train)  # fmt: skip
    stage2 = _step(f"{name}/stage2", f"train.py experiment=mini/stage2_quality_tune_{name}",
                   f"{base}/stage2/checkpoints/select/selection.json", run_dir=f"{base}/stage2", like="stage2",
                   **train)  # fmt: skip
    arm = f"{{out}}/{base}"
    ev = eval_args(scale, f"{arm}/stage2/checkpoints/select/best.ckpt", f"{name}_quality_tuned", f"{arm}/eval",
                   accuracy=False, b=f"{arm}/stage1/checkpoints/last.ckpt")  # fmt: skip
    evaluation = _step(f"{name}/eval", f"{ev} {ARCHITECTURES[name][1]}".strip(), f"{base}/eval/metrics.json",
                       run_dir=f"{base}/eval", like="eval")  # fmt: skip
    steps = [stage1, stage2, evaluation]
    if name in TOKENIZED:
        steps.insert(0, _step(f"{name}/tokenizer", "train.py experiment=mini/tokenizer",
                              f"{base}/tokenizer/checkpoints/last.ckpt", run_dir=f"{base}/tokenizer", corpus="latents",
                              like="tokenizer", **train))  # fmt: skip
    if latents:
        step = next(s for stage in demo_stages(scale) for s in stage.steps if s.name == "latents")
        steps.insert(0, replace(step, name=f"{name}/latents", intermediate=False))
    for i, step in enumerate(steps):  # an arm reads only the finished demo and its own steps: arms run side by side
        step.needs = (steps[i - 1].name,) if i else ((after,) if after else ())
    return Stage(name, f"generality: {name}", steps)


def plan(scale: dict[str, Any], out: Path | None = None) -> list[Arch]:
    """The rows for ``scale``: the demo's own latent U-Net, then each arm of its ``generality:`` section; where the
    demo folder ``out`` lacks the latents, the first arm on them precomputes them and the others wait for it."""
    rows = [Arch("unet", "latent U-Net (the demo's own)", "stage1/checkpoints/last.ckpt",
                 "stage2/checkpoints/select/selection.json", "eval/metrics.json")]  # fmt: skip
    precompute = None  # the arm that precomputes missing latents: the others on latents wait for it
    for name in settings(scale)["arms"]:
        base = f"generality/{name}"
        lacks = _lacks_latents(name, out)
        steps = arm_steps(scale, name, latents=lacks and precompute is None, after=precompute if lacks else None)
        if lacks and precompute is None:
            precompute = f"{name}/latents"
        rows.append(Arch(name, ARCHITECTURES[name][0], f"{base}/stage1/checkpoints/last.ckpt",
                         f"{base}/stage2/checkpoints/select/selection.json", f"{base}/eval/metrics.json",
                         steps))  # fmt: skip
    return rows


def _lacks_latents(name: str, out: Path | None) -> bool:
    return CORPUS[name] == "latents" and out is not None and not (out / "latents" / "precompute.json").is_file()

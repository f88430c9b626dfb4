"""Export a trained model: ``python -m emu.export {safetensors,diffusers,lora} CKPT [OUT]``.

* ``safetensors CKPT [OUT]``: a stage-1/2 checkpoint as a self-contained folder of safetensors + JSON (the trained
  weights, the frozen autoencoder and text encoders, the hyper-parameters) that ``sample.py`` and ``eval.py`` take in
  place of the checkpoint; a stage-0 autoencoder checkpoint as its ``model.safetensors`` + ``config.json``.
* ``diffusers CKPT OUT``: a stage-1/2 checkpoint (or a safetensors export of one) as a folder that
  ``diffusers.DiffusionPipeline.from_pretrained(OUT)`` loads and runs: a stock ``StableDiffusionXLPipeline`` where the
  model is one (SDXL quality-tuned: ``experiment=stage2_quality_tune_sdxl``), else emu's own pipeline, which needs
  ``trust_remote_code=True`` (``--pipeline auto|emu|sdxl``).

* ``lora CKPT OUT``: a LoRA model's adapters (``model.lora``) as a LoRA file, diffusers' layout
  (``pipe.load_lora_weights`` on the base model's diffusers export) or kohya's (``--layout kohya``;
  :mod:`emu.export.lora`).

A LoRA model's ``safetensors`` and ``diffusers`` exports hold the adapters merged into their base: a whole model.
The stage-1/2 exports write a model card (README.md). EMA weights unless ``--raw``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from emu.autoencoder.module import load_autoencoder
from emu.diffusion.checkpoints import load_diffusion, load_for_sampling
from emu.diffusion.export import is_export, save_export
from emu.export.card import model_card
from emu.export.diffusers import PIPELINES, SCHEDULERS, choose_pipeline, export_diffusers
from emu.export.lora import LAYOUTS, export_lora
from emu.utils.checkpoint_header import header


def checkpoint_kind(path: Path) -> str:
    """``diffusion`` or ``autoencoder`` (a checkpoint or an export folder); a clear error for anything else."""
    if path.is_dir():
        if is_export(path):
            return "diffusion"
        raise ValueError(f"'{path}' is a folder but not an emu export (no config.json naming an emu diffusion model)")
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at '{path}'")
    try:  # our own checkpoint format; loading the header needs the pickle, so only checkpoints emu wrote
        kind = header(torch.load(path, map_location="cpu", weights_only=False, mmap=True)).get("kind")
    except Exception as e:
        raise ValueError(f"'{path}' is not a readable checkpoint ({type(e).__name__}: {e})") from e
    if kind not in ("diffusion", "autoencoder"):
        raise ValueError(f"'{path}' is a {kind or 'non-emu'} checkpoint; export takes stage-0/1/2 checkpoints")
    return kind


def check_metrics(path: Path) -> None:
    """An ``eval.py`` metrics.json: a readable JSON object."""
    try:
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--metrics '{path}' is not a readable JSON file ({e})") from e
    if not isinstance(metrics, dict):
        raise ValueError(f"--metrics '{path}' is not an eval.py metrics.json (a JSON object)")


def export_safetensors(ckpt: Path, out: Path | None, ema: bool, metrics: str | None) -> Path:
    kind = checkpoint_kind(ckpt)
    out = out or ckpt.with_name(f"{ckpt.stem}-safetensors")
    if kind == "autoencoder":
        folder = load_autoencoder(ckpt).save_pretrained(out)
        print(f"wrote the autoencoder as {folder / 'model.safetensors'} + config.json")
        return folder
    module = load_diffusion(ckpt)  # the EMA kept apart: save_export picks the weights itself
    if not ema and module.exported_weights == "ema":
        raise ValueError(f"'{ckpt}' holds the EMA weights only; --raw needs the training checkpoint")
    if module.adapters is not None:  # self-contained: the adapters (their EMA unless --raw) merged into their base
        if ema and module.ema is not None:
            module.ema.copy_to(module.trained_modules())
            module.exported_weights = "ema"
        module.merge_lora()
    folder = save_export(module, out, ema=ema, step=module.trained_steps, source=str(ckpt))
    weights = json.loads((folder / "config.json").read_text())["weights"]
    (folder / "README.md").write_text(model_card(module, str(ckpt), "safetensors", weights, metrics))
    print(f"wrote {weights.upper()} weights, the frozen models and a model card to {folder}")
    return folder


def export_to_diffusers(ckpt: Path, out: Path, ema: bool, sampler: str, metrics: str | None,
                        pipeline: str = "auto") -> Path:  # fmt: skip
    if checkpoint_kind(ckpt) != "diffusion":
        raise ValueError(f"'{ckpt}' is an autoencoder checkpoint; the diffusers export takes stage-1/2 models")
    module = load_for_sampling(ckpt, ema=ema)
    weights = module.sampled_weights
    kind = choose_pipeline(module, pipeline)  # refuses an inexpressible --pipeline sdxl before anything is written
    folder = export_diffusers(module, out, sampler, kind)
    (folder / "README.md").write_text(model_card(module, str(ckpt), "diffusers", weights, metrics, pipeline=kind))
    sdxl = kind == "sdxl"
    what, trust = ("a StableDiffusionXLPipeline", "") if sdxl else ("an EmuPipeline", ", trust_remote_code=True")
    print(f"wrote {what} ({weights.upper()} weights, {sampler} scheduler) to {folder}; load it with "
          f"DiffusionPipeline.from_pretrained('{folder}'{trust})")  # fmt: skip
    return folder


def export_lora_file(ckpt: Path, out: Path, ema: bool, layout: str) -> Path:
    if checkpoint_kind(ckpt) != "diffusion":
        raise ValueError(f"'{ckpt}' is an autoencoder checkpoint; a LoRA file comes from a stage-2 LoRA model")
    module = load_for_sampling(ckpt, ema=ema)
    path = export_lora(module, out, layout)
    print(f"wrote the {module.sampled_weights.upper()} adapters (rank {module.hparams.lora['rank']}, alpha "
          f"{module.hparams.lora['alpha']:g}) in {layout}'s layout to {path}; their base: "
          f"{module.hparams.init_from}")  # fmt: skip
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emu.export", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="format", required=True)
    st = sub.add_parser("safetensors", help="a self-contained safetensors folder that sample.py and eval.py load")
    st.add_argument("ckpt", type=Path)
    st.add_argument("out", type=Path, nargs="?", help="default: <ckpt without .ckpt>-safetensors beside it")
    df = sub.add_parser("diffusers", help="a folder DiffusionPipeline.from_pretrained loads")
    df.add_argument("ckpt", type=Path, help="a stage-1/2 checkpoint or a safetensors export of one")
    df.add_argument("out", type=Path)
    df.add_argument("--sampler", default="dpmpp_2m", choices=sorted(SCHEDULERS), help="the scheduler it ships with")
    df.add_argument("--pipeline", default="auto", choices=PIPELINES, help="sdxl: diffusers' StableDiffusionXLPipeline "
                    "(refused, with the reasons, for a model it cannot express); emu: emu's own (trust_remote_code); "
                    "auto: sdxl where the model is one, else emu")  # fmt: skip
    lo = sub.add_parser("lora", help="a LoRA model's adapters as a LoRA file (diffusers' or kohya's layout)")
    lo.add_argument("ckpt", type=Path, help="a stage-2 checkpoint trained with model.lora")
    lo.add_argument("out", type=Path, help="the folder to write the file into")
    lo.add_argument("--layout", default="diffusers", choices=LAYOUTS, help="diffusers: pytorch_lora_weights."
                    "safetensors for pipe.load_lora_weights; kohya: lora_unet_* keys (A1111, ComfyUI)")  # fmt: skip
    lo.add_argument("--raw", action="store_true", help="the raw adapters instead of their EMA")
    for p in (st, df):
        p.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA")
        p.add_argument("--metrics", help="an eval.py metrics.json to put into the model card")
    args = parser.parse_args(argv)
    ckpt = args.ckpt.expanduser().absolute()  # not resolved: best.ckpt stays best.ckpt in the card
    try:
        if getattr(args, "metrics", None) is not None:  # checked before anything is written
            check_metrics(Path(args.metrics))
        if args.format == "safetensors":
            export_safetensors(ckpt, args.out, not args.raw, args.metrics)
        elif args.format == "lora":
            export_lora_file(ckpt, args.out, not args.raw, args.layout)
        else:
            export_to_diffusers(ckpt, args.out, not args.raw, args.sampler, args.metrics, args.pipeline)
    except (FileNotFoundError, ValueError) as e:
        print(f"export error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What ``eval.py`` runs: the items to evaluate (checkpoints, sample folders, autoencoders), their metrics
(:mod:`emu.evaluation.metrics`), and the files and logs written from them.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from emu.diffusion.pipeline import SamplingSettings
from emu.diffusion.prompts import read_prompts
from emu.errors import ConfigError
from emu.evaluation import fid as fidlib
from emu.evaluation import human_votes, items, metrics, pictures, references, report
from emu.evaluation.reconstruction import BASELINES, reconstruction_metrics
from emu.text.clip import ClipEmbedder
from emu.utils import named_sets
from emu.utils.config import check_required, instantiate_group
from emu.utils.files import atomic_write_text
from emu.utils.images import to_pil


@dataclass
class Evaluation:
    """One evaluation's outcome: ``metrics`` (what ``metrics.json`` holds), the image sets that were scored, their
    per-image scores by item name and score name, and the pictures written."""

    metrics: dict[str, Any]
    generated: list[items.Generated] = field(default_factory=list)
    scores: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    grids: list[str] = field(default_factory=list)


def item_name(path: str, given: str | None) -> str:
    if given:
        return str(given)
    p = Path(path)
    return p.parent.parent.name if p.parent.name == "checkpoints" else p.name


def extractors(cfg: DictConfig, notes: list[str]) -> tuple[list, dict[str, str]]:
    """Inception (FID) and domain (fd_clip) feature extractors; ``skipped`` says why FID is missing, if it is."""
    out, skipped = [], {}
    if cfg.fid.inception not in (False, None, "false", "off"):
        explicit = None if cfg.fid.inception == "auto" else cfg.fid.inception
        try:
            out.append(fidlib.inception_extractor(explicit, mode=cfg.fid.mode, device=_device(cfg)))
        except fidlib.InceptionWeightsMissing as e:
            if explicit:
                raise ConfigError("fid.inception", str(e)) from e
            skipped["fid"] = f"skipped: {e}"
            notes.append(f"FID skipped: {str(e).splitlines()[0]}")
    if cfg.fid.domain and cfg.clip:
        judge = ClipEmbedder(cfg.clip)
        out.append(fidlib.custom_extractor(f"clip_{Path(cfg.clip).name}", judge.embed_images))
    return out, skipped


def _device(cfg: DictConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "cuda was asked for but no GPU is visible")
    return torch.device(cfg.device)


def evaluate_autoencoders(
    cfg: DictConfig, paths: list[str], names: list[str], exs: list, notes: list[str]
) -> Evaluation:
    spec = cfg.autoencoder.images
    res = int(cfg.autoencoder.resolution)
    if not spec:
        raise ConfigError("autoencoder.images", "autoencoders are measured on an image folder or a named image set")
    images, source = references.reference_set(str(spec), res, "autoencoder.images")[1](), f"{spec} at {res}px"
    judge = hydra.utils.instantiate(cfg.judge) if cfg.get("judge") else None
    results = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for path, name in zip(paths, names):
            results[name] = metrics.autoencoder_metrics(path, images, exs, lpips=cfg.autoencoder.lpips, judge=judge)
    notes += sorted({str(w.message) for w in caught})

    baselines = {name: reconstruction_metrics(fn, images) for name, fn in BASELINES.items()}
    grid = Path(cfg.out) / "reconstructions.png"
    pictures.reconstruction_grid(images[: int(cfg.grid_pairs)], paths, names).save(grid)
    return Evaluation({"autoencoders": results, "baselines": baselines, "images": source}, grids=[str(grid)])


def same_judge_note(path: str | Path, name: str, judge: Any) -> str | None:
    """A warning when the checkpoint at ``path`` was chosen by checkpoint selection (a ``selection.json`` beside it)
    with the judge that scores it here: selection picked the judge's favourite, so its appeal is biased upward."""
    record = Path(path).expanduser().parent / "selection.json"
    if judge is None or not record.is_file():
        return None
    try:
        chosen_by = json.loads(record.read_text()).get("judge")
    except (OSError, ValueError):
        return None
    ours = getattr(judge, "name", type(judge).__name__)
    if chosen_by != ours:
        return None
    return (f"{name} was selected by the judge that scores it here ({ours}, {record}): its appeal is biased upward; "
            "select with another judge (callbacks.selection.judge) or compare with people")  # fmt: skip


def evaluate_models(cfg: DictConfig, sampling: SamplingSettings, todo: list[tuple[str, str, str]], exs, skipped,
                    notes) -> Evaluation:  # fmt: skip
    device = _device(cfg)
    gens: list[items.Generated] = []
    prompts = None
    for path, kind, name in todo:
        if kind == "samples":
            gens.append(items.load_samples(path, name))
            continue
        if prompts is None:
            if not cfg.prompts:
                raise ConfigError("prompts", "a checkpoint is evaluated on prompts: e.g. prompts=parti:200 or a file")
            prompts = read_prompts(cfg.prompts, "prompts")[: cfg.limit or None]
        seeds = [int(cfg.seed) + i for i in range(len(prompts))]
        gens.append(items.generate_from_checkpoint(path, name, prompts, seeds, sampling, device))
    if len(gens) == 2:
        items.check_paired(*gens)
    judge = hydra.utils.instantiate(cfg.judge) if cfg.get("judge") else None
    attributes = hydra.utils.instantiate(cfg.attributes) if cfg.get("attributes") else None
    for path, _, name in todo:
        note = same_judge_note(path, name, judge)
        if note:
            print(f"[eval] warning: {note}")
            notes.append(note)
    models, scores = {}, {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for gen in gens:
            print(f"[eval] {gen.name}: scoring {len(gen.prompts)} images")
            models[gen.name], scores[gen.name] = metrics.model_metrics(
                gen, cfg.clip, cfg.aesthetic, judge, exs, cfg.fid.reference, cfg.fid.cache_dir, skipped, attributes
            )
    notes += sorted({str(w.message) for w in caught if "fid" in str(w.message).lower() or "images" in str(w.message)})
    result: dict[str, Any] = {"prompts": str(cfg.prompts), "n_prompts": len(gens[0].prompts), "models": models}
    if len(gens) == 2:
        a, b = (scores[g.name] for g in gens)
        result["paired"] = metrics.paired_metrics(a, b, dict(cfg.tie_band), int(cfg.bootstrap))
    ae = next((g.autoencoder for g in gens if g.autoencoder is not None), None)
    result |= run_checks(cfg, judge=judge, autoencoder=ae)
    return Evaluation(result, gens, scores)


def run_checks(cfg: DictConfig, **context: Any) -> dict[str, Any]:
    """``cfg.checks``: extra measurements by name, each a ``_target_`` called with the evaluation's context (``judge``,
    ``autoencoder``, ``clip``, ``device``, ``tie_band``, ``n_boot``) and its own settings; what one returns (unless
    None) is stored under its name."""
    context |= {"clip": cfg.clip, "device": str(_device(cfg)), "tie_band": dict(cfg.tie_band),
                "n_boot": int(cfg.bootstrap)}  # fmt: skip
    out = {}
    for name, spec in (cfg.get("checks") or {}).items():
        if spec is None:  # a check switched off: checks.<name>=null
            continue
        value = hydra.utils.instantiate(spec, _partial_=True)(**context)
        if value is not None:
            out[name] = value
    return out


def write_outputs(out: Path, result: Evaluation, cfg: DictConfig) -> None:
    """metrics.json, report.md, scores.jsonl, the sample folders and grids; then every number to the loggers."""
    gens, scores = result.generated, result.scores
    for gen in gens:
        if not Path(gen.source).is_dir():  # generated here (a sample folder is already on disk)
            items.save_images(gen, out / f"samples_{gen.name}")
    if len(gens) == 2:
        pictures.side_by_side(gens[0], gens[1], int(cfg.grid_pairs)).save(out / "side_by_side.png")
        result.grids.append(str(out / "side_by_side.png"))
    if gens:
        with (out / "scores.jsonl").open("w") as f:
            for i in range(len(gens[0].prompts)):
                row = {"prompt": gens[0].prompts[i], "seed": gens[0].seeds[i]}
                for gen in gens:
                    row[gen.name] = {k: float(v[i]) for k, v in scores[gen.name].items()}
                f.write(json.dumps(row) + "\n")
    summary = result.metrics | {"grids": result.grids, "config": OmegaConf.to_container(cfg, resolve=True)}
    atomic_write_text(out / "metrics.json", json.dumps(summary, indent=2, default=str))
    atomic_write_text(out / "report.md", report.report_markdown(summary))
    log_to_loggers(cfg, summary, result)


def log_to_loggers(cfg: DictConfig, summary: dict[str, Any], result: Evaluation) -> None:
    """Every number into the configured loggers; with W&B also the run summary, the grids and a table of pairs."""
    loggers = instantiate_group(cfg.get("logger"))
    if not loggers:
        return
    from lightning.pytorch.loggers import WandbLogger

    gens, scores, grids = result.generated, result.scores, result.grids
    flat = {k: v for k, v in _flatten(summary).items() if isinstance(v, int | float) and not isinstance(v, bool)}
    for logger in loggers:
        logger.log_metrics(flat)
        if isinstance(logger, WandbLogger):
            import wandb
            from PIL import Image

            logger.experiment.summary.update(flat)
            for g in grids:
                logger.log_image(key=Path(g).stem, images=[Image.open(g)])
            if gens:
                keys = sorted({k for s in scores.values() for k in s})
                columns = ["prompt", "seed"] + [f"{g.name}" for g in gens]
                columns += [f"{g.name}/{k}" for g in gens for k in keys if k in scores[g.name]]
                rows = []
                for i in range(min(len(gens[0].prompts), int(cfg.grid_pairs) * 4)):
                    row = [gens[0].prompts[i], gens[0].seeds[i]]
                    row += [wandb.Image(to_pil(g.images[i])) for g in gens]
                    row += [float(scores[g.name][k][i]) for g in gens for k in keys if k in scores[g.name]]
                    rows.append(row)
                logger.log_table(key="pairs", columns=columns, data=rows)
        logger.save()


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if k == "config":
            continue
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + "/") if isinstance(v, dict) else {key: v})
    return out


def human_votes_metrics(path: Path, n_boot: int) -> dict[str, Any]:
    """Win rates from the votes of an A/B task folder (``python -m emu.annotate``) or a votes JSONL file."""
    path = path.expanduser()
    names = {"a": "A", "b": "B"}
    if path.is_dir():
        task_file = path / "task.json"
        if not task_file.is_file():
            raise ConfigError("human_votes", f"'{path}' is not an A/B task folder (no task.json)")
        task = json.loads(task_file.read_text())
        names, path = task.get("names", names), path / task.get("answers", "votes.jsonl")
    if not path.is_file():
        raise ConfigError("human_votes", f"no votes at '{path}'")
    votes, problems = human_votes.read_votes(path)
    questions = human_votes.human_results(votes, n_boot=n_boot)
    if not questions:
        raise ConfigError("human_votes", f"'{path}' has no valid votes ({len(problems)} bad rows)")
    return {"source": str(path), "names": names, "problems": problems, "questions": questions}


def run(cfg: DictConfig) -> Path:
    """``eval.py``'s whole job for a composed config: evaluate ``a`` (and ``b``), write the outputs to ``cfg.out``."""
    check_required(cfg)
    named_sets.register(cfg.get("sets"))
    sampling = SamplingSettings.from_config(OmegaConf.to_container(cfg.sampling, resolve=True))
    paths = [str(cfg.a)] + ([str(cfg.b)] if cfg.b else [])
    kinds = [items.item_kind(p) for p in paths]
    names = [item_name(p, n) for p, n in zip(paths, (cfg.name_a, cfg.name_b))]
    if len(names) == 2 and names[0] == names[1]:
        names = [f"A_{names[0]}", f"B_{names[1]}"]
    notes: list[str] = []
    exs, skipped = extractors(cfg, notes)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if "autoencoder" in kinds:
        if set(kinds) != {"autoencoder"}:
            raise ConfigError("b", "compare autoencoders with autoencoders; a and b are of different kinds")
        result = evaluate_autoencoders(cfg, paths, names, exs, notes)
    else:
        result = evaluate_models(cfg, sampling, list(zip(paths, kinds, names)), exs, skipped, notes)
    if cfg.get("human_votes"):
        result.metrics["human"] = human_votes_metrics(Path(str(cfg.human_votes)), int(cfg.bootstrap))
    result.metrics["warnings"] = notes
    write_outputs(out, result, cfg)
    print((out / "report.md").read_text())
    written = ", ".join(Path(g).name for g in result.grids)
    print(f"[eval] wrote metrics.json, report.md{' and ' + written if written else ''} to {out}")
    return out

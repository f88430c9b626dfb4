"""Checkpoint selection for quality-tuning: sample held-out prompts every N steps, judge them, keep every scored
checkpoint, mark the best, and optionally stop early.

The paper stops quality-tuning well before the loss plateaus, because longer training overfits the few thousand
curated images. The loss cannot show that; samples can. Every ``every_n_steps`` optimizer steps (and once before
the first step, as the baseline: the stage-1 weights) this callback samples a fixed prompt set with fixed seeds
through the EMA weights, scores the images with a judge (``score(images, prompts)`` -> per-image ``appeal`` and
``faithfulness``; at paper scale a preference model by path, not the one the evaluation uses), keeps the weights and
appends a row to ``selection.jsonl``. ``keep="full"`` saves a Lightning checkpoint (``step_XXXXXXX.ckpt``, optimizer
state included: resumable); ``keep="ema"`` only the EMA weights, as an export folder (``step_XXXXXXX/``, the frozen
models referenced by path, not copied: ~1/4 of a full checkpoint with AdamW; gathered to rank 0 under FSDP). The
best is the one with the highest mean appeal whose faithfulness stays within ``faithfulness_margin`` of the baseline;
``selection.json`` names it and ``best.ckpt`` (or ``best/``) links to it. Optional early
stop: ``patience`` scorings without an appeal gain of ``min_delta``, or faithfulness falling more than
``faithfulness_margin`` below the baseline. Scores, the training loss beside them, and the sample grids are logged.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from emu.diffusion.export import plain_json, save_export, trained_state
from emu.diffusion.module import DiffusionModule
from emu.diffusion.pipeline import SamplingSettings
from emu.diffusion.prompts import read_prompts
from emu.errors import ConfigError
from emu.training.optim import images_per_step
from emu.utils.files import atomic_write_text
from emu.utils.images import image_grid, log_image
from emu.utils.steps import log_step

log = logging.getLogger("emu.selection")
KEEP = ("full", "ema")  # what is kept at every scoring: a Lightning checkpoint, or the EMA weights as an export folder


class CheckpointSelection(L.Callback):
    """See the module docstring. ``judge``: any object with ``score(images, prompts) -> {"appeal": (N,),
    "faithfulness": (N,)}`` (Hydra instantiates it from a ``_target_`` node)."""

    def __init__(
        self,
        judge: Any,
        prompts: str | list[str],
        dirpath: str | Path,
        every_n_steps: int = 50,
        limit: int | None = None,
        seed: int = 0,
        sampling: dict[str, Any] | SamplingSettings | None = None,
        faithfulness_margin: float = 0.05,
        patience: int | None = None,
        min_delta: float = 0.0,
        stop_on_faithfulness_drop: bool = False,
        log_grid_images: int = 16,
        keep: str = "full",
    ):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if keep not in KEEP:
            raise ConfigError("callbacks.selection.keep", f"must be one of {KEEP}, got {keep!r}")
        self.keep = keep
        self.judge = judge
        self.prompts = read_prompts(prompts, "callbacks.selection.prompts") if isinstance(prompts, str) else prompts
        self.prompts = list(self.prompts)[:limit] if limit else list(self.prompts)
        self.seeds = [seed + i for i in range(len(self.prompts))]
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.sampling = SamplingSettings.from_config(sampling, "callbacks.selection.sampling")
        self.faithfulness_margin, self.patience, self.min_delta = faithfulness_margin, patience, min_delta
        self.stop_on_faithfulness_drop = stop_on_faithfulness_drop
        self.log_grid_images = log_grid_images
        self.rows: list[dict[str, Any]] = []
        self.stopped: str | None = None

    # ----------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "stopped": self.stopped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows, self.stopped = list(state.get("rows", [])), state.get("stopped")

    @property
    def baseline(self) -> dict[str, Any] | None:
        return next((r for r in self.rows if r["step"] == 0), None)

    def best(self) -> dict[str, Any] | None:
        """The scored checkpoint with the highest appeal whose faithfulness stays within the margin."""
        base = self.baseline
        floor = base["faithfulness"] - self.faithfulness_margin if base else -math.inf
        eligible = [r for r in self.rows if r.get("ckpt") and not (r["faithfulness"] < floor)]
        return max(eligible, key=lambda r: r["appeal"], default=None)

    # ----------------------------------------------------------------------------------------- hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if hasattr(self.judge, "to"):  # built before the trainer: onto this rank's own device now
            self.judge.to(pl_module.device)
        if self.keep == "ema" and getattr(pl_module, "ema", None) is None:
            raise ConfigError(
                "callbacks.selection.keep", "'ema' needs a model with an EMA (model.ema_half_life_images)"
            )
        if self.keep == "ema" and not isinstance(pl_module, DiffusionModule):
            raise ConfigError("callbacks.selection.keep", f"'ema' keeps export folders, which diffusion models write; "
                              f"a {type(pl_module).__name__} keeps full checkpoints: set keep=full")  # fmt: skip

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == 0 and self.baseline is None:
            self._score(trainer, pl_module, save=False)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and not any(r["step"] == step for r in self.rows):
            self._score(trainer, pl_module, save=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if step > 0 and not any(r["step"] == step for r in self.rows):
            self._score(trainer, pl_module, save=True)  # the final weights are always scored
        best = self.best()
        if best and trainer.is_global_zero:
            print(f"[selection] best checkpoint: step {best['step']} (appeal {best['appeal']:.3f}, faithfulness "
                  f"{best['faithfulness']:.3f}) -> {best['ckpt']}")  # fmt: skip

    # ----------------------------------------------------------------------------------------- work
    @torch.no_grad()
    def _sample(self, pl_module) -> torch.Tensor:
        was_training = pl_module.training
        pl_module.eval()
        try:
            ema = getattr(pl_module, "ema", None)
            if ema is not None and self.sampling.ema:
                with ema.swapped(pl_module.trained_modules()):
                    return pl_module.sample(self.prompts, self.seeds, self.sampling)
            return pl_module.sample(self.prompts, self.seeds, self.sampling)
        finally:
            pl_module.train(was_training)

    def _score(self, trainer: L.Trainer, pl_module: L.LightningModule, save: bool) -> None:
        step = trainer.global_step
        images = self._sample(pl_module)
        scores = self.judge.score(images, self.prompts)
        loss = trainer.callback_metrics.get("train/loss")
        row = {
            "step": step,
            "images_seen": step * (images_per_step(trainer) or 0) * getattr(pl_module, "images_per_sample", 1),
            "appeal": float(np.nanmean(scores["appeal"].numpy())),
            "faithfulness": float(np.nanmean(scores["faithfulness"].numpy())),
            "train_loss": float(loss) if loss is not None else None,
            "ckpt": None,
        }
        if save:
            row["ckpt"] = str(self._keep(trainer, pl_module, step))
        self.rows.append(row)
        for logger in trainer.loggers:
            logger.log_metrics({"select/appeal": row["appeal"], "select/faithfulness": row["faithfulness"]},
                               log_step(trainer))  # fmt: skip
        if trainer.is_global_zero:
            n = self.log_grid_images
            caption = f"step {step}: appeal {row['appeal']:.2f}, faithfulness {row['faithfulness']:.3f}"
            log_image(trainer, "select/samples", image_grid(images[:n], nrow=min(8, n)), caption)
            self._write()
            print(f"[selection] step {step}: appeal {row['appeal']:.3f}, faithfulness {row['faithfulness']:.3f}"
                  + (f", train loss {row['train_loss']:.4f}" if row["train_loss"] is not None else ""))  # fmt: skip
        self._maybe_stop(trainer)

    def _keep(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> Path:
        """Save what ``keep`` says for ``step``; its path."""
        if self.keep == "full":
            path = self.dirpath / f"step_{step:07d}.ckpt"
            trainer.save_checkpoint(path)
            return path
        path = self.dirpath / f"step_{step:07d}"
        plain_json(dict(pl_module.hparams))  # on every rank before the gather: no rank fails alone after it
        state = trained_state(pl_module, ema=True, keep=trainer.is_global_zero)  # every rank: FSDP gathers shards
        if trainer.is_global_zero:
            save_export(pl_module, path, ema=True, step=step, source=f"checkpoint selection at step {step}",
                        copy_frozen=False, state=state)  # fmt: skip
        trainer.strategy.barrier("selection_keep")
        return path

    def _maybe_stop(self, trainer: L.Trainer) -> None:
        base, scored = self.baseline, [r for r in self.rows if r["step"] > 0]
        if not scored or self.stopped:
            return
        reason = None
        if (
            self.stop_on_faithfulness_drop
            and base
            and scored[-1]["faithfulness"] < base["faithfulness"] - (self.faithfulness_margin)
        ):
            reason = (f"faithfulness {scored[-1]['faithfulness']:.3f} fell more than {self.faithfulness_margin} below "
                      f"the baseline {base['faithfulness']:.3f}")  # fmt: skip
        if self.patience and len(scored) > self.patience:
            best_before = max(r["appeal"] for r in scored[: -self.patience])
            if max(r["appeal"] for r in scored[-self.patience :]) < best_before + self.min_delta:
                reason = f"appeal has not improved on {best_before:.3f} for {self.patience} scorings"
        if reason:
            self.stopped = f"step {trainer.global_step}: {reason}"
            trainer.should_stop = True
            if trainer.is_global_zero:
                print(f"[selection] early stop at {self.stopped}")
                self._write()

    def _write(self) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.dirpath / "selection.jsonl", "".join(json.dumps(r) + "\n" for r in self.rows))
        best = self.best()
        summary = {"best": best, "baseline": self.baseline, "stopped": self.stopped, "rows": self.rows,
                   "faithfulness_margin": self.faithfulness_margin, "every_n_steps": self.every_n_steps,
                   "prompts": len(self.prompts), "sampling": self.sampling.as_dict(),
                   "judge": getattr(self.judge, "name", type(self.judge).__name__), "keep": self.keep}  # fmt: skip
        atomic_write_text(self.dirpath / "selection.json", json.dumps(summary, indent=2))
        if best:
            name = "best.ckpt" if self.keep == "full" else "best"
            link, tmp = self.dirpath / name, self.dirpath / f".{name}.tmp"
            tmp.unlink(missing_ok=True)
            os.symlink(Path(best["ckpt"]).name, tmp)
            os.replace(tmp, link)

"""Train any stage of the recipe: ``python train.py experiment=<name> [key=value ...]``.

The experiment picks the data, model, trainer and logger groups (conf/); this file only composes,
instantiates and fits. ``python train.py -m experiment=<name> key=a,b`` runs a sweep, one folder per job.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from emu.data.callbacks import DataFault
from emu.errors import ConfigError
from emu.plan import check_fits
from emu.training.checkpoints import resolve_checkpoint
from emu.training.loggers import start_fresh
from emu.training.numerics import NumericalFault
from emu.training.preemption import Preempted
from emu.utils import named_sets
from emu.utils.config import (
    check_experiment_args,
    check_required,
    config_errors_as_messages,
    experiments,
    instantiate_group,
)
from emu.utils.validate import validate

log = logging.getLogger("emu.train")
CONF = Path(__file__).parent / "conf"


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit ``cfg.model`` on ``cfg.data`` with ``cfg.trainer``; returns the final logged metrics."""
    if cfg.get("data") is None or cfg.get("model") is None:
        raise ConfigError("experiment", "train.py trains what an experiment names: experiment=<one of: "
                          f"{', '.join(experiments(CONF))}> (or data=... model=... trainer=...)")  # fmt: skip
    check_required(cfg)
    named_sets.register(cfg.get("sets"))
    validate(cfg)  # unknown keys and mismatched stages, before anything is built
    plan = check_fits(cfg)  # GPU runs: the memory per rank, and a refusal of a run that cannot fit
    if plan is not None:
        log.info("memory plan: %.1f GiB per rank", plan.peak / 2**30)
    folder = OmegaConf.select(cfg, "callbacks.model_checkpoint.dirpath")
    ckpt_path = resolve_checkpoint(cfg.ckpt_path, folder)  # a broken checkpoint is refused before any work
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision(cfg.get("matmul_precision", "highest"))

    log.info("data: %s", cfg.data.source._target_)
    datamodule = hydra.utils.instantiate(cfg.data)
    log.info("model: %s", cfg.model._target_)
    model = hydra.utils.instantiate(cfg.model)
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    if ckpt_path is None:  # a fresh run: its folder's logs start over (a resume continues them)
        start_fresh(loggers)
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    except Preempted as e:
        print(f"\n[{cfg.task_name}] preempted: {e}")
        return {"preempted": 1.0}
    except (NumericalFault, DataFault) as e:
        print(f"\n[{cfg.task_name}] stopped: {e}", file=sys.stderr)
        sys.exit(3)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    checkpoint = trainer.checkpoint_callback
    best = (checkpoint.best_model_path or checkpoint.last_model_path) if checkpoint else ""
    print(f"\n[{cfg.task_name}] finished at step {trainer.global_step}")
    print(f"  outputs:    {cfg.paths.output_dir}")
    if best:
        print(f"  checkpoint: {best}")
    if hasattr(datamodule, "skip_summary"):
        print(f"  data:       {datamodule.skip_summary()}")
    for k in sorted(m for m in metrics if m.startswith("val/")):
        print(f"  {k:<24} {metrics[k]:.4f}")
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@config_errors_as_messages
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    return metrics.get(cfg.optimized_metric) if cfg.get("optimized_metric") else None


if __name__ == "__main__":
    check_experiment_args(sys.argv[1:], str(CONF))
    main()

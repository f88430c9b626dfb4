"""Callbacks of the data pipeline."""

from __future__ import annotations

import logging

import lightning as L

log = logging.getLogger("emu.data")


class DataHealth(L.Callback):
    """Logs the DataModule's skipped-sample counts (``data/skipped/{split}/{reason}``) and prints them at the end."""

    def _log(self, trainer: L.Trainer) -> None:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "skipped"):
            return
        metrics = {
            f"data/skipped/{split}/{reason}": float(n) for split, c in dm.skipped.items() for reason, n in c.items()
        }
        metrics.update({f"data/skipped/{split}": float(sum(c.values())) for split, c in dm.skipped.items()})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer)
        if trainer.datamodule is not None and hasattr(trainer.datamodule, "skip_summary"):
            log.info("data: %s", trainer.datamodule.skip_summary())

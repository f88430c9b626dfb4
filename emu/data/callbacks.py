"""Callbacks of the data pipeline."""

from __future__ import annotations

import logging

import lightning as L

from emu.data.batches import drop_gradients_without_data
from emu.utils.steps import log_step

log = logging.getLogger("emu.data")


class DataFault(RuntimeError):
    """Too much of the data is unusable to go on training."""


class DataHealth(L.Callback):
    """Logs the DataModule's skipped-sample counts (``data/skipped/{split}/{reason}``; ``data/empty_batches/{split}``,
    batches left with no good sample) and prints them at the end; stops the run (:class:`DataFault`) when the
    training skip rate passes ``data.max_skip_rate`` (checked every ``every_n_batches`` once
    ``data.skip_rate_min_samples`` samples were read). Under several ranks, drops the gradients of a step in which no
    rank had a good sample (:func:`~emu.data.batches.drop_gradients_without_data`), so the optimizer skips it."""

    def __init__(self, every_n_batches: int = 20):
        self.every_n_batches = every_n_batches

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "skip_rate") or (batch_idx + 1) % self.every_n_batches:
            return
        rate, skipped, read = dm.skip_rate("train")
        bad = read >= dm.skip_rate_min_samples and rate > dm.max_skip_rate
        # every rank reaches this batch; they decide together, so that no rank is left waiting in a collective
        if trainer.strategy.reduce_boolean_decision(bad, all=False):
            if not bad:
                raise DataFault("another rank's training skip rate passed data.max_skip_rate; see its message")
            raise DataFault(
                f"{skipped} of {read} training samples read so far were unusable ({rate:.0%} > data.max_skip_rate="
                f"{dm.max_skip_rate}): {dm.skip_summary()}. Fix or drop the bad shards/files, or raise "
                "data.max_skip_rate if this corpus is known to be this noisy"
            )

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        drop_gradients_without_data(optimizer)

    def _log(self, trainer: L.Trainer) -> None:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "skipped"):
            return
        metrics = {
            f"data/skipped/{split}/{reason}": float(n) for split, c in dm.skipped.items() for reason, n in c.items()
        }
        metrics.update({f"data/skipped/{split}": float(sum(c.values())) for split, c in dm.skipped.items()})
        empty = getattr(dm, "empty_batches", {})
        metrics.update({f"data/empty_batches/{split}": float(n) for split, n in empty.items() if n})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=log_step(trainer))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer)
        if trainer.datamodule is not None and hasattr(trainer.datamodule, "skip_summary"):
            log.info("data: %s", trainer.datamodule.skip_summary())

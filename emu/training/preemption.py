"""Preemption: SIGTERM or SIGUSR1 makes the run save a checkpoint and stop cleanly, within a bounded time.

The signal only sets a flag; once the current training batch is done every rank agrees to stop, the run saves
``last.ckpt`` in its checkpoint folder (atomically) and raises :class:`Preempted`, which ends ``fit`` at once (no
epoch-end hooks that could save a later-looking state); ``train.py`` reports it and exits with code 0, so
``ckpt_path=last`` resumes exactly there. If the batch or the save hangs, the process exits anyway after
``grace_seconds``. Under SLURM with Lightning's auto-requeue, SIGUSR1 stays Lightning's (it checkpoints and requeues
the job); SIGTERM is handled here.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import lightning as L
from lightning.pytorch.plugins.environments import SLURMEnvironment

from emu.training.checkpoints import save_last

log = logging.getLogger("emu.training")


class Preempted(Exception):
    """The run was asked to stop by a signal and saved its checkpoint; the message says how to resume."""


class Preemption(L.Callback):
    """Checkpoint and stop on ``signals`` (names, default SIGTERM and SIGUSR1)."""

    def __init__(self, signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1"), grace_seconds: float = 300.0):
        self.signals = [getattr(signal, s) for s in signals]
        self.grace_seconds = grace_seconds
        self.received: int | None = None
        self._previous: dict[int, object] = {}
        self._timer: threading.Timer | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        env = getattr(trainer.strategy, "cluster_environment", None)
        slurm_requeue = isinstance(env, SLURMEnvironment) and env.auto_requeue
        for sig in self.signals:
            if sig == signal.SIGUSR1 and slurm_requeue:
                continue
            if threading.current_thread() is threading.main_thread():
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            log.warning("received %s: saving a checkpoint after this batch, then stopping",
                        signal.Signals(signum).name)  # fmt: skip
            self._timer = threading.Timer(self.grace_seconds, self._give_up)
            self._timer.daemon = True
            self._timer.start()
        self.received = signum

    def _give_up(self) -> None:
        log.error("no clean stop within %.0f s of the signal: exiting without a checkpoint", self.grace_seconds)
        os._exit(1)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        """Between two batches (every hook of the last one has run): save and stop if a signal came."""
        stop = trainer.strategy.reduce_boolean_decision(self.received is not None, all=False)
        if not stop:
            return
        path = save_last(trainer)
        if self._timer is not None:  # saved in time: the rest of the shutdown is not bounded by the grace period
            self._timer.cancel()
            self._timer = None
        name = signal.Signals(self.received).name if self.received else "a signal on another rank"
        self.received = None
        raise Preempted(f"{name} at step {trainer.global_step}: saved {path}; resume with ckpt_path=last "
                        f"hydra.run.dir={trainer.default_root_dir}")  # fmt: skip

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

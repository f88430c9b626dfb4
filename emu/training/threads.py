"""A CPU-thread budget that another process may change while a run trains.

``EMU_THREADS_FILE`` names a file holding one integer: the intra-op threads this process may use. A scheduler that
runs several jobs on one machine (``make demo``'s driver, :mod:`emu.demo.driver`) rewrites it as its other jobs start
and finish, so that a training run has every core while it runs alone and its share while others run beside it.
Threads beyond the cores cost far more than they give: on 2 cores a 2-thread U-Net step beside a 1-thread job is 3x
slower than alone. :class:`FollowThreadBudget` rereads the file (microseconds) before every batch and calls
``torch.set_num_threads`` when the number changed. Without ``EMU_THREADS_FILE`` it does nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch

from emu.utils.files import atomic_write_text

ENV = "EMU_THREADS_FILE"


def write_budget(path: str | Path, threads: int) -> None:
    """Set the budget in ``path`` (atomically: a reader never sees half a number)."""
    if threads < 1:
        raise ValueError(f"a thread budget is at least 1, got {threads}")
    atomic_write_text(path, f"{int(threads)}\n")


class ThreadBudget:
    """The budget in ``path``; :meth:`apply` puts a changed one in place."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def read(self) -> int | None:
        """The budget, or None while the file is missing or holds no positive integer."""
        try:
            n = int(self.path.read_text().strip())
        except (OSError, ValueError):
            return None
        return n if n >= 1 else None

    def apply(self) -> int | None:
        """If the file holds a budget other than the threads in use: ``torch.set_num_threads`` to it, which is
        returned; else None (also while unreadable: the threads stay as they are). Reading it costs microseconds."""
        n = self.read()
        if n is None or n == torch.get_num_threads():
            return None
        torch.set_num_threads(n)
        return n


def budget_from_env() -> ThreadBudget | None:
    path = os.environ.get(ENV)
    return ThreadBudget(path) if path else None


class FollowThreadBudget(L.Callback):
    """Follows ``EMU_THREADS_FILE`` (see the module) before every training and validation batch."""

    def __init__(self):
        self.budget = budget_from_env()

    def _follow(self) -> None:
        if self.budget is not None:
            self.budget.apply()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._follow()

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._follow()

"""The step to log at: the one Lightning's own ``self.log`` rows carry at this moment.

Lightning logs a batch's metrics (and a validation's) at the number of batches stepped *before* it, one less than
``trainer.global_step`` after the optimizer step. Rows logged by hand (callbacks, images) use the same counter, so
that one x-axis holds every row, and a resumed run, which replaces the rows from its first logged step on, replaces
exactly the rows it logs again (:mod:`emu.training.loggers`).
"""

from __future__ import annotations


def log_step(trainer) -> int:
    """The step of the rows Lightning logs now (batches stepped so far in this fit)."""
    loop = getattr(trainer, "fit_loop", None)
    return int(loop.epoch_loop._batches_that_stepped) if loop is not None else int(trainer.global_step)

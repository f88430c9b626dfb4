"""Fault injectors and recorders the fault tests add to real train.py runs as callbacks, e.g.
``+callbacks.losses._target_=tests.faults.inject.RecordLosses +callbacks.losses.out=<file>``."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import lightning as L

from emu.training.checkpoints import save_last


class RecordLosses(L.Callback):
    """Appends ``{"step", "loss", "keys", "pid", "rank"}`` per training batch to a JSON-lines file (what the run saw,
    in order; ``pid`` tells a resumed process's rows from the killed one's; every rank of a run appends)."""

    def __init__(self, out: str):
        self.out = Path(out)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        row = {"step": trainer.global_step, "loss": float(loss), "keys": list(batch.get("key", [])), "pid": os.getpid(),
               "rank": trainer.global_rank}  # fmt: skip
        self.out.parent.mkdir(parents=True, exist_ok=True)
        with open(self.out, "a") as f:
            f.write(json.dumps(row) + "\n")


class KillAt(L.Callback):
    """Sends ``sig`` (a name: SIGKILL, SIGTERM, SIGUSR1) to this process in the training batch that makes global
    step ``step``: at its start (``at=start``: the signal arrives while the step runs) or at its end (``at=end``,
    before that batch's checkpoint: Lightning runs checkpoint callbacks last, so a SIGKILL loses everything after
    the previous checkpoint). ``save_first`` writes ``last.ckpt`` at that batch end just before the signal, as a
    time-interval or user checkpoint would (Lightning's step-interval checkpoints skip an epoch's last batch)."""

    def __init__(self, step: int, sig: str = "SIGKILL", at: str = "end", save_first: bool = False):
        self.step, self.signal, self.at, self.save_first = step, getattr(signal, sig), at, save_first

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.at == "start" and trainer.global_step + 1 == self.step:
            os.kill(os.getpid(), self.signal)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.at == "end" and trainer.global_step == self.step:
            if self.save_first:
                save_last(trainer)
            os.kill(os.getpid(), self.signal)


class PoisonGradients(L.Callback):
    """Makes the gradients non-finite (NaN, or Inf) in the optimizer steps that would make the given global steps,
    as a diverging run would."""

    def __init__(self, steps: list[int], value: str = "nan"):
        self.steps, self.value = set(steps), float(value)

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step + 1 in self.steps:
            p = next(p for p in pl_module.parameters() if p.grad is not None)
            p.grad.view(-1)[0] = self.value

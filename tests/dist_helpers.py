"""A callback the distributed tests add to train.py runs (``+callbacks.dump._target_=tests.dist_helpers.DumpWeights``):
every rank writes the full trained weights it starts (after any resume) and ends with, sharded ones gathered, so the
tests can compare ranks and runs: ``<out>/start_rank<r>.pt``, ``<out>/rank<r>.pt``, with the rank's global torch
RNG state (what its training step will draw noise from)."""

from pathlib import Path

import lightning as L
import torch


class DumpWeights(L.Callback):
    def __init__(self, out: str):
        self.out = Path(out)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._dump(trainer, pl_module, "start_")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._dump(trainer, pl_module, "")

    def _dump(self, trainer: L.Trainer, pl_module: L.LightningModule, prefix: str) -> None:
        weights = {}
        for name, module in pl_module.trained_modules().items():
            for key, p in module.named_parameters():
                weights[f"{name}.{key}"] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().clone()
        if pl_module.ema is not None:
            for key, p in pl_module.ema.named_parameters():
                weights[f"ema.{key}"] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().clone()
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / f"{prefix}rank{trainer.global_rank}.pt"
        torch.save({"step": trainer.global_step, "weights": weights, "rng": torch.get_rng_state()}, path)


class KillAt(L.Callback):
    """SIGKILL the whole run (every rank: the process group the test started it in) at the start of the batch after
    ``step``: the checkpoint of ``step`` is on disk, nothing after it is, and no process gets to clean up."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if trainer.global_step == self.step:
            trainer.strategy.barrier("kill_at")  # every rank has saved and arrived
            if trainer.is_global_zero:
                import os
                import signal

                os.killpg(os.getpgid(0), signal.SIGKILL)

"""Numerical faults: a step whose gradients hold NaN or Inf is skipped, counted and logged; K in a row stop the run.

:class:`NumericalGuard` looks at the gradients just before each optimizer step (after backward, before clipping).
If any is not finite on any rank, all gradients are dropped, so the optimizer leaves the weights (and its moments)
as they were: the step is skipped. ``train/nonfinite_steps`` counts them. After ``max_consecutive`` skipped steps in
a row the weights are still the last good ones: the guard saves them as ``last.ckpt`` and raises
:class:`NumericalFault`. Modules that step an optimizer outside Lightning (the autoencoder's discriminator) call
:meth:`NumericalGuard.check` themselves.
"""

from __future__ import annotations

from collections.abc import Iterable

import lightning as L
import torch

from emu.training.checkpoints import save_last
from emu.training.distributed import local


class NumericalFault(RuntimeError):
    """Too many non-finite steps in a row; the message names the checkpoint of the last good state."""


def finite_gradients(params: Iterable[torch.nn.Parameter]) -> bool:
    grads = [local(p.grad) for p in params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.stack([g.isfinite().all() for g in grads]).all())


class NumericalGuard(L.Callback):
    """Skip steps with non-finite gradients; stop after ``max_consecutive`` of them in a row."""

    def __init__(self, max_consecutive: int = 10):
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive: dict[str, int] = {}  # per optimizer (the autoencoder's generator and discriminator)

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self.check(trainer, pl_module, params, name=f"optimizer {trainer.optimizers.index(optimizer)}"
                   if len(trainer.optimizers) > 1 and optimizer in trainer.optimizers else "")  # fmt: skip

    def check(self, trainer: L.Trainer, pl_module: L.LightningModule, params: list[torch.nn.Parameter],
              name: str = "") -> bool:  # fmt: skip
        """True when the gradients of ``params`` are finite on every rank; otherwise drops them (the step is
        skipped), counts it, and raises :class:`NumericalFault` after ``max_consecutive`` in a row."""
        ok = trainer.strategy.reduce_boolean_decision(finite_gradients(params), all=True)
        if ok:
            self.consecutive[name] = 0
            return True
        for p in params:
            p.grad = None
        self.skipped += 1
        self.consecutive[name] = consecutive = self.consecutive.get(name, 0) + 1
        pl_module.log("train/nonfinite_steps", float(self.skipped), batch_size=1)
        if trainer.is_global_zero:
            print(f"[numerics] step {trainer.global_step + 1}: non-finite gradients{f' ({name})' if name else ''}, "
                  f"step skipped ({consecutive} in a row, {self.skipped} in all)", flush=True)  # fmt: skip
        if consecutive >= self.max_consecutive:
            path = save_last(trainer)
            step = trainer.global_step + 1
            raise NumericalFault(
                f"{consecutive} steps in a row{f' of {name}' if name else ''} had non-finite gradients (up to step "
                f"{step}); the weights were left at the last good step and saved to {path}. Lower model.lr, set "
                "trainer.gradient_clip_val, or check the data, then resume with ckpt_path=last"
            )
        return False

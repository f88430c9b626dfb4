"""Batches with no good sample: skipped, never refilled with a repeat, and skipped in step on every rank.

A map-style batch whose samples are all bad (:class:`~emu.data.sources.PreparedDataset`) comes out as an **empty
batch**: ``image`` of 0 rows, empty ``caption`` / ``key`` / ``meta``, counted per split
(:attr:`~emu.data.datamodule.EmuDataModule.empty_batches`). What happens to it depends on who reads the loader
(:class:`BatchLoader`'s ``empty``):

* ``drop``: loaders read by plain loops (precompute and curation pieces, statistics, benchmarks, single-process
  validation) never see it.
* ``keep``: the training loader yields it, so that the Trainer's batch count (what an exact resume starts from,
  :mod:`emu.data.resume`) stays the sampler's. The batch also carries a **stand-in** (``batch["stand_in"]``): the next
  good sample after its first index, read but not delivered, only so that a rank can run the same forward and backward
  as its peers with zero weight. The training step goes through :func:`good_samples` (or the
  :func:`trains_on_good_samples` decorator), the one place the skip happens:

  - one process: an empty batch is skipped (the step returns None: no forward, no gradient, the optimizer leaves the
    weights and its moments alone);
  - several ranks (DDP, FSDP): the ranks sum their good-sample counts (one scalar all-reduce a step). Each rank scales
    its mean loss by ``n * world / total``, so the averaged gradient is the mean over the step's good samples, every
    one weighing the same whichever rank it is on (no good neighbour of a bad file is over-weighted). A rank with
    none trains its stand-in at weight 0: every rank runs the same forward (FSDP's all-gathers) and backward (the
    gradient all-reduce), and the job cannot hang (what that rank logs for the step is its stand-in's loss). When no
    rank has a sample, the stand-ins run at weight 0 (Lightning refuses a skipped ``training_step`` under several
    ranks) and :class:`~emu.data.callbacks.DataHealth` drops the step's gradients before the optimizer sees them
    (:func:`drop_gradients_without_data`), as :class:`~emu.training.numerics.NumericalGuard` drops non-finite ones;
    manual-optimization modules just return None on every rank.

  A skipped step of an automatic-optimization module still counts as a step for Lightning (``global_step``, the LR
  schedule, the diffusion EMA's update of unchanged weights), as a NumericalGuard-skipped one does; a
  manual-optimization module's (the autoencoder's) does not, since no optimizer stepped.
* ``stand_in``: validation over several ranks, where every rank must run the same number of validation forwards
  (FSDP gathers weights in each, DDP syncs buffers) and the modules' validation steps have no sample weights: the
  empty batch is replaced by its stand-in, a repeat, as Lightning's ``DistributedSampler`` already pads the val split
  with repeats to give every rank the same length.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

STAND_IN = "stand_in"
EMPTY_POLICIES = ("drop", "keep", "stand_in")


def empty_batch(width: int, height: int, stand_in: dict[str, Any] | None = None) -> dict[str, Any]:
    """A batch with no sample (``image`` 0 x 3 x ``height`` x ``width``), with its ``stand_in`` batch when given."""
    batch: dict[str, Any] = {"image": torch.zeros(0, 3, height, width), "caption": [], "key": [], "meta": []}
    if stand_in is not None:
        batch[STAND_IN] = stand_in
    return batch


def samples_in(batch: dict[str, Any]) -> int:
    """How many samples a batch holds: its keys, or the rows of its first tensor (batches made by hand)."""
    if "key" in batch:
        return len(batch["key"])
    return next(len(v) for v in batch.values() if isinstance(v, torch.Tensor))


def is_empty(batch: Any) -> bool:
    return isinstance(batch, dict) and "key" in batch and len(batch["key"]) == 0


class BatchLoader(DataLoader):
    """A DataLoader over a dataset that may yield empty batches; ``empty`` says what becomes of them (module doc)."""

    def __init__(self, *args, empty: str = "drop", **kwargs):
        if empty not in EMPTY_POLICIES:
            raise ValueError(f"empty must be one of {EMPTY_POLICIES}, got {empty!r}")
        super().__init__(*args, **kwargs)
        self.empty = empty

    def __iter__(self):
        batches = super().__iter__()
        return batches if self.empty == "keep" else self._without_empty(batches)

    def _without_empty(self, batches: Iterator[Any]) -> Iterator[Any]:
        for batch in batches:
            if not is_empty(batch):
                yield batch
            elif self.empty == "stand_in":
                yield batch[STAND_IN]


# ------------------------------------------------------------------------------------------ the training step
_SAMPLES = "_emu_good_samples"  # on each optimizer: good samples of all ranks since its last step
_warned = False
log = logging.getLogger("emu.data")


def _count_for_optimizers(trainer, total: int) -> None:
    global _warned
    if total == 0 and not _warned:
        from emu.data.callbacks import DataHealth  # here: the callback module imports this one

        if not any(isinstance(c, DataHealth) for c in trainer.callbacks):
            _warned = True
            log.warning("a step had no good sample on any rank, and without the emu.data.callbacks.DataHealth "
                        "callback nothing drops its zero gradients: the optimizer steps anyway (momentum moves the "
                        "weights); add it (callbacks.data_health)")  # fmt: skip
    for optimizer in trainer.optimizers:
        setattr(optimizer, _SAMPLES, getattr(optimizer, _SAMPLES, 0) + total)


def drop_gradients_without_data(optimizer: torch.optim.Optimizer) -> bool:
    """Called just before ``optimizer`` steps (:class:`~emu.data.callbacks.DataHealth`): when no micro-batch since its
    last step had a good sample on any rank, drop the gradients (zeros from the stand-ins), so that the step leaves
    the weights and moments as they were; True then. Starts the next step's count."""
    samples = getattr(optimizer, _SAMPLES, None)
    if samples is None:  # one process, or a module that does not use good_samples
        return False
    setattr(optimizer, _SAMPLES, 0)
    if samples:
        return False
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None
    return True


def good_samples(module, batch: dict[str, Any]) -> tuple[dict[str, Any], float] | None:
    """What a training step of ``module`` trains on: ``(batch, weight)`` for its mean loss, or None to skip the step.

    One process: ``(batch, 1.0)``, or None for an empty batch. Several ranks: one all-reduce of the good-sample count;
    ``(batch, n * world / total)``, or ``(stand-in, 0.0)`` on a rank with none (module doc). When no rank has any, a
    manual-optimization module gets None on every rank; an automatic one gets its stand-in at 0 and the step's
    gradients are dropped before the optimizer step.
    """
    n = samples_in(batch)
    trainer = module._trainer
    world = trainer.world_size if trainer is not None else 1
    if world == 1:
        return (batch, 1.0) if n else None
    count = torch.tensor(float(n), device=module.device)
    total = round(float(trainer.strategy.reduce(count, reduce_op="sum")))
    if module.automatic_optimization:
        _count_for_optimizers(trainer, total)
    elif total == 0:
        return None  # every rank returns here: no forward, no collective
    if n == 0:
        if STAND_IN not in batch:
            raise RuntimeError("an empty batch without a stand-in reached a training step on several ranks; the "
                               "training loader must be EmuDataModule.train_dataloader()")  # fmt: skip
        return batch[STAND_IN], 0.0
    return batch, n * world / total


def trains_on_good_samples(step: Callable) -> Callable:
    """Decorates an automatic-optimization ``training_step``: it runs on :func:`good_samples`' batch and its loss
    (a tensor, or a dict's ``loss``) is scaled by the weight; an empty batch on one process skips the step."""

    @functools.wraps(step)
    def training_step(module, batch: dict[str, Any], *args, **kwargs):
        picked = good_samples(module, batch)
        if picked is None:
            return None
        batch, weight = picked
        out = step(module, batch, *args, **kwargs)
        if weight == 1.0 or out is None:
            return out
        if isinstance(out, dict):
            return {**out, "loss": out["loss"] * weight}
        return out * weight

    return training_step

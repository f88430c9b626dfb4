"""Exact resume of the random number streams: the training step's draws continue where they stopped.

The data side is :mod:`emu.data.resume` (order, position and augmentations as functions of seed and epoch). What is
left is the global RNG the training step draws from (noise, noise levels, posterior samples, CFG dropout): this
callback stores every rank's CPU generator states and its own CUDA device's state in each checkpoint and restores
them when training starts after a resume, and isolates validation (which may draw, e.g. ancestral samplers) so that
a run validated at step N continues exactly as one resumed from step N.

With several ranks, every rank starts from the same seed (so that all build the same initial weights); at the start
of training each rank's generators are re-seeded with ``seed + rank`` so that ranks draw different noise for their
different images. A checkpoint from a run with another number of ranks cannot restore the streams exactly: the
callback warns and re-seeds that way instead.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import lightning as L
import numpy as np
import torch

log = logging.getLogger("emu.training")


def _collect_rng_states() -> dict[str, Any]:
    """This process's generator states, as tensors and plain values (loadable with ``torch.load(weights_only=True)``):
    CPU torch, numpy, python, and the current CUDA device's."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = states.get("cuda")
    if isinstance(cuda, torch.Tensor) and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


def _seed_for_rank(rank: int) -> None:
    seed = (torch.initial_seed() + rank) % 2**32
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # CUDA generators too


class ExactResume(L.Callback):
    """Saves and restores every rank's RNG states; validation leaves them as it found them."""

    def __init__(self) -> None:
        self._restored: dict[str, Any] | None = None
        self._before_validation: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        # every rank dumps the checkpoint (Trainer.save_checkpoint), so gathering here is collective
        local = _collect_rng_states()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            per_rank: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(per_rank, local)
            return {"rng_per_rank": per_rank}
        return {"rng_per_rank": [local]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        restored, self._restored = self._restored, None
        if restored is not None:
            per_rank = restored.get("rng_per_rank") or ([restored["rng"]] if "rng" in restored else [])
            if len(per_rank) == trainer.world_size:
                _set_rng_states(per_rank[trainer.global_rank])
                return
            if trainer.is_global_zero:
                log.warning(
                    "the checkpoint holds RNG states of %d rank(s), this run has %d: the training draws are "
                    "re-seeded, so this resume is not bit-exact",
                    len(per_rank),
                    trainer.world_size,
                )
        if trainer.world_size > 1 or restored is not None:
            _seed_for_rank(trainer.global_rank)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._before_validation = _collect_rng_states()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._before_validation is not None:
            _set_rng_states(self._before_validation)
            self._before_validation = None

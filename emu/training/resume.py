"""Exact resume of the random number streams: the training step's draws continue where they stopped.

The data side is :mod:`emu.data.resume` (order, position and augmentations as functions of seed and epoch). What is
left is the global RNG the training step draws from (noise, noise levels, posterior samples, CFG dropout): this
callback stores the CPU and CUDA generator states in every checkpoint and restores them when training starts
after a resume, and isolates validation (which may draw, e.g. ancestral samplers) so that a run validated at step
N continues exactly as one resumed from step N.
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch


def _collect_rng_states(include_cuda: bool = True) -> dict[str, Any]:
    """The global generators' states, as tensors and plain values (loadable with ``torch.load(weights_only=True)``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }
    if include_cuda and torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class ExactResume(L.Callback):
    """Saves and restores the global RNG states; validation leaves them as it found them."""

    def __init__(self) -> None:
        self._restored: dict[str, Any] | None = None
        self._before_validation: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"rng": _collect_rng_states(include_cuda=True)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict.get("rng")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._restored is not None:
            _set_rng_states(self._restored)
            self._restored = None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._before_validation = _collect_rng_states(include_cuda=True)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._before_validation is not None:
            _set_rng_states(self._before_validation)
            self._before_validation = None

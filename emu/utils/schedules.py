"""Learning-rate schedules as pure functions of the step (wrap with ``functools.partial`` for ``LambdaLR``)."""

from __future__ import annotations

import math


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then a cosine from 1 to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress))


def warmup_constant(step: int, warmup: int) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then constant."""
    return min(1.0, (step + 1) / max(1, warmup))


LR_SCALINGS = ("none", "linear", "sqrt")


def scaled_lr(lr: float, scaling: str, global_batch: int) -> float:
    """The learning rate for a global batch (images per optimizer step, all ranks and accumulation included):
    ``none``: ``lr`` as given; ``linear``: ``lr`` per image times the batch (the LDM autoencoders' rule: base 4.5e-6 x
    GPUs x batch); ``sqrt``: ``lr`` times sqrt(batch) (Adam's square-root rule)."""
    if global_batch < 1:
        raise ValueError(f"the global batch must be >= 1, got {global_batch}")
    if scaling == "none":
        return lr
    if scaling == "linear":
        return lr * global_batch
    if scaling == "sqrt":
        return lr * math.sqrt(global_batch)
    raise ValueError(f"unknown learning-rate scaling {scaling!r}; choose one of {LR_SCALINGS}")

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


def warmup_constant_cooldown(step: int, warmup: int, total: int, cooldown: int) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, constant, then a linear cooldown to 0 over the last
    ``cooldown`` of ``total`` steps (warmup-stable-decay: a stage ends on a settled model; 0: no cooldown)."""
    left = total - step
    if cooldown > 0 and left <= cooldown:
        return min(warmup_constant(step, warmup), max(0.0, left / cooldown))
    return warmup_constant(step, warmup)


LR_SCALINGS = ("none", "linear", "sqrt")


def scaled_lr(lr: float, scaling: str, global_batch: int, reference_batch: int = 1) -> float:
    """The learning rate for a global batch (images per optimizer step, all ranks and accumulation included), ``lr``
    being the rate at ``reference_batch``: ``none``: ``lr`` as given; ``linear``: ``lr x batch / reference`` (the LDM
    autoencoders' rule with reference 1: base 4.5e-6 x GPUs x batch); ``sqrt``: ``lr x sqrt(batch / reference)``
    (Adam's square-root rule: a 16x smaller batch, a 4x smaller rate)."""
    if global_batch < 1 or reference_batch < 1:
        raise ValueError(f"the global and reference batches must be >= 1, got {global_batch} and {reference_batch}")
    if scaling == "none":
        return lr
    if scaling == "linear":
        return lr * global_batch / reference_batch
    if scaling == "sqrt":
        return lr * math.sqrt(global_batch / reference_batch)
    raise ValueError(f"unknown learning-rate scaling {scaling!r}; choose one of {LR_SCALINGS}")

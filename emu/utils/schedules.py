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

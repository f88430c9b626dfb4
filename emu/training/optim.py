"""What the optimizer sees: its parameter groups, and how many images make one of its steps."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def images_per_step(trainer, batch_size: int | None = None) -> int | None:
    """Images per optimizer step: the per-rank batch (``batch_size``, else the DataModule's) x ranks x gradient
    accumulation; None when no batch size is known."""
    if batch_size is None:
        batch_size = getattr(getattr(trainer, "datamodule", None), "batch_size", None)
    if not batch_size:
        return None
    return int(batch_size) * trainer.world_size * trainer.accumulate_grad_batches


def weight_decay_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict]:
    """AdamW parameter groups: ``weight_decay`` on the weight matrices and kernels (2+ dimensions) of every layer but
    embeddings; none on biases, norms' scales and shifts (1 dimension) and embedding tables, whose decay only pulls
    them toward zero without regularising anything (as GPT-2 / minGPT, SD3 and EDM2 train). With ``weight_decay`` 0
    there is one group, the parameters in the modules' order (checkpoints' optimizer states keep their layout)."""
    modules = list(modules)
    params = [p for m in modules for p in m.parameters()]
    if not weight_decay:
        return [{"params": params, "weight_decay": 0.0}]
    tables = [sub for m in modules for sub in m.modules() if isinstance(sub, nn.Embedding)]
    embedding = {id(p) for sub in tables for p in sub.parameters()}
    decay = [p for p in params if p.ndim >= 2 and id(p) not in embedding]
    seen = {id(p) for p in decay}
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) not in seen], "weight_decay": 0.0}]  # fmt: skip

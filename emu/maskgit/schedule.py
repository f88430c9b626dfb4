"""MaskGIT's masking schedule and training masks: small pure functions.

The schedule ``gamma(r) = cos(pi r / 2)`` gives the fraction of tokens still masked after a fraction ``r`` of the
decoding steps (1 at the start, 0 at the end). Training draws ``r ~ U(0, 1)`` per image and masks
``ceil(gamma(r) N)`` of its ``N`` tokens (at least one) at random, so that the network learns every stage of the
decoding; decoding step ``t`` of ``T`` leaves ``floor(gamma((t + 1) / T) N)`` tokens masked.
"""

from __future__ import annotations

import math

import torch


def cosine_schedule(r: torch.Tensor | float) -> torch.Tensor:
    """The fraction of tokens masked after a fraction ``r`` in [0, 1] of the decoding (MaskGIT's cosine)."""
    return torch.cos(torch.as_tensor(r, dtype=torch.float64) * math.pi / 2)


def masked_after(step: int, steps: int, n_tokens: int) -> int:
    """Tokens still masked after decoding step ``step`` (0-based) of ``steps``: 0 after the last."""
    return math.floor(float(cosine_schedule((step + 1) / steps)) * n_tokens)


def training_mask(batch: int, n_tokens: int, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> torch.Tensor:  # fmt: skip
    """``B x N`` booleans, True where a token is masked: per image ``ceil(gamma(r) N)`` tokens (at least one) for
    ``r ~ U(0, 1)``, the positions uniformly at random. Drawn on the CPU (the same mask on any device)."""
    r = torch.rand(batch, generator=generator, dtype=torch.float64)
    n_masked = torch.ceil(cosine_schedule(r) * n_tokens).clamp(min=1, max=n_tokens).long()
    ranks = torch.rand(batch, n_tokens, generator=generator).argsort(1).argsort(1)  # a random order per image
    return (ranks < n_masked[:, None]).to(device)

"""Finite scalar quantization (FSQ; Mentzer et al. 2023): a codebook-free discrete bottleneck for image tokenizers.

Each of ``d = len(levels)`` latent channels is bounded and rounded to one of ``levels[i]`` evenly spaced values in
[-1, 1]; a position's ``d`` values together are one of ``prod(levels)`` codes (its token). Rounding passes gradients
straight through, and there is no codebook to learn, collapse or re-seed. ``[7, 5, 5, 5, 5]`` (4375 codes) and
``[8, 8, 8, 5, 5, 5]`` (64000) are the paper's choices for ~2^12 and ~2^16.

``bound`` maps a channel to ``(-(L-1)/2, (L-1)/2)`` (shifted by half a level for even ``L``, so that rounding gives
exactly ``L`` values), ``quantize`` rounds and rescales to [-1, 1]; :meth:`FSQ.codes_to_indices` and
:meth:`FSQ.indices_to_codes` convert between a position's quantized values and its token in mixed radix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


def round_ste(z: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass (the straight-through estimator)."""
    return z + (z.round() - z).detach()


class FSQ(nn.Module):
    """Finite scalar quantization over the channel axis (dim 1) of ``B x d x ...`` tensors; no parameters.

    Args:
        levels: values per channel, each at least 2 (``d = len(levels)`` channels).
        eps: keeps the bound's ends off the rounding boundaries.
    """

    def __init__(self, levels: Sequence[int], eps: float = 1e-3):
        super().__init__()
        levels = [int(v) for v in levels]
        if not levels or min(levels) < 2:
            raise ValueError(f"FSQ levels must be at least 2 each, got {levels}")
        self.levels, self.eps = levels, eps
        # int64 buffers: a module cast (.to(bfloat16)) leaves them exact
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.int64), persistent=False)
        basis = torch.cumprod(torch.tensor([1, *levels[:-1]], dtype=torch.int64), 0)  # mixed radix, first digit fastest
        self.register_buffer("_basis", basis, persistent=False)

    @property
    def dim(self) -> int:
        return len(self.levels)

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    def _view(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        return t.view(1, -1, *([1] * (ndim - 2)))

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """Each channel squashed into ``(-(L-1)/2, (L-1)/2)``, offset by 1/2 for even ``L``."""
        levels = self._view(self._levels, z.ndim).double()
        half = (levels - 1) * (1 + self.eps) / 2
        offset = torch.where(levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half)
        return ((z.double() + shift).tanh() * half - offset).to(z.dtype)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Quantized ``z`` (``B x d x ...``), each channel on its ``L`` values in [-1, 1]; straight-through
        gradients."""
        if z.shape[1] != self.dim:
            raise ValueError(f"FSQ over {self.dim} channels got {z.shape[1]}")
        half_width = self._view(self._levels // 2, z.ndim).to(z.dtype)
        return round_ste(self.bound(z)) / half_width

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """Quantized values (``B x d x ...``, from :meth:`forward`) -> tokens (``B x ...``, int64 in
        [0, prod(levels)))."""
        half_width = self._view(self._levels // 2, codes.ndim)
        digits = (codes.double() * half_width + half_width).round().long()  # 0 .. L-1 per channel
        return (digits * self._view(self._basis, codes.ndim)).sum(1)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Tokens (``B x ...``) -> quantized values (``B x d x ...``, float32), the inverse of
        :meth:`codes_to_indices`."""
        if indices.min() < 0 or indices.max() >= self.codebook_size:
            raise ValueError(f"token ids must lie in [0, {self.codebook_size}), got {int(indices.min())}.."
                             f"{int(indices.max())}")  # fmt: skip
        idx = indices.long().unsqueeze(1)
        levels, basis = self._view(self._levels, idx.ndim), self._view(self._basis, idx.ndim)
        digits = (idx // basis) % levels
        half_width = (levels // 2).float()
        return (digits.float() - half_width) / half_width

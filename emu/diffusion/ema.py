"""Exponential moving average of weights, by half-life in images, as EDM's training code does it (Karras et al.
2022, ``ema_halflife_kimg`` with ``ema_rampup_ratio``).

Per optimizer step of ``n`` images the average moves by ``1 - beta`` with ``beta = 0.5 ** (n / half_life)``;
with ``ramp`` the half-life is at most ``ramp * images_seen``, so early averages do not drag the random init
along. This is not EDM2's EMA (Karras et al. 2024): that one is a power-function profile set by its relative width
(``sigma_rel``), with post-hoc reconstruction of other widths from stored snapshots; neither is implemented here.

The averaged copies are submodules, hence in every checkpoint's ``state_dict`` (``ema.shadow.*``). Under FSDP the
copies are sharded exactly as the live networks (:mod:`emu.training.distributed`) and every operation here works on
this rank's local shards, with no communication.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from emu.training.distributed import local


def ema_beta(images_per_step: float, half_life_images: float, images_seen: float, ramp: float | None) -> float:
    """The decay for one step."""
    half_life = half_life_images
    if ramp is not None:
        half_life = min(half_life, ramp * images_seen)
    return 0.5 ** (images_per_step / max(half_life, 1e-8))


class WeightCopy(nn.Module):
    """Frozen copies of ``modules`` (name -> module) that :meth:`swapped` puts in place of the live weights: the base of
    :class:`EMA`, and by itself the preference objectives' reference model (:mod:`emu.diffusion.preference`)."""

    def __init__(self, modules: dict[str, nn.Module]):
        super().__init__()
        self.shadow = nn.ModuleDict({k: copy.deepcopy(m).requires_grad_(False).eval() for k, m in modules.items()})

    def train(self, mode: bool = True):  # the shadow itself never trains (dropout off); swapped in, see the user
        return super().train(False)

    def _pairs(self, modules: dict[str, nn.Module]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        live, avg = [], []
        for k, m in modules.items():
            for (n, p), (n2, q) in zip(m.named_parameters(), self.shadow[k].named_parameters(), strict=True):
                assert n == n2, (n, n2)
                live.append(local(p.detach()))
                avg.append(local(q.detach()))
        return live, avg

    @torch.no_grad()
    def copy_to(self, modules: dict[str, nn.Module]) -> None:
        live, avg = self._pairs(modules)
        torch._foreach_copy_(live, avg)

    @contextmanager
    def swapped(self, modules: dict[str, nn.Module]) -> Iterator[None]:
        """Use the copied weights inside the block; the live weights come back after it, even on error."""
        live, _ = self._pairs(modules)
        backup = [p.clone() for p in live]
        self.copy_to(modules)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(live, backup)


class EMA(WeightCopy):
    """Averaged copies of ``modules`` (name -> module); :meth:`update` after each step, :meth:`swapped` to use them."""

    def __init__(self, modules: dict[str, nn.Module], half_life_images: float, ramp: float | None = 0.05):
        super().__init__(modules)
        self.half_life_images, self.ramp = float(half_life_images), ramp
        self.register_buffer("images_seen", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update(self, modules: dict[str, nn.Module], images: int) -> float:
        self.images_seen += images
        beta = ema_beta(images, self.half_life_images, float(self.images_seen), self.ramp)
        live, avg = self._pairs(modules)
        torch._foreach_lerp_(avg, [p.to(a.dtype) for p, a in zip(live, avg, strict=True)], 1.0 - beta)
        return beta

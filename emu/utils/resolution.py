"""The resolution invariant, defined once: an image side must be a positive multiple of the model's total
downsampling (the autoencoder's ``f`` times the U-Net's levels), or its latents would not tile.

The data does not know the model, so the model states its own multiple (``resolution_multiple`` on each
LightningModule) and checks the datamodule's resolution at ``setup``; :mod:`emu.utils.validate` checks the composed
config before any network is built, and sampling checks the size it is asked for. All of them ask this module.
"""

from __future__ import annotations

from emu.errors import ConfigError


def resolution_problem(resolution: int, multiple: int, why: str) -> str | None:
    """What is wrong with ``resolution`` for a model that downsamples by ``multiple`` (``why`` names the parts), with
    the nearest valid size; None when it is fine."""
    if resolution > 0 and resolution % multiple == 0:
        return None
    nearest = max(multiple, round(resolution / multiple) * multiple)
    return f"{resolution} is not a positive multiple of {multiple} ({why}); try {nearest}"


def check_resolution(resolution: int, multiple: int, key: str, why: str) -> None:
    """Raise a :class:`ConfigError` naming ``key`` when :func:`resolution_problem` finds one."""
    problem = resolution_problem(int(resolution), int(multiple), why)
    if problem:
        raise ConfigError(key, problem)

"""The denoising networks a :class:`~emu.diffusion.module.DiffusionModule` can train, by ``model.unet.arch``.

``unet`` (the default, and what a config without ``arch`` means: every config and checkpoint before the DiT) is
:class:`~emu.diffusion.unet.UNet`; ``dit`` is :class:`~emu.diffusion.dit.DiT`. Both take the same call,
``net(x, t, context, context_mask, pooled, ...)``, keep their construction arguments in ``config`` (what checkpoints
store and rebuild them from) and say their ``downsample_factor``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from emu.diffusion.dit import DiT, DiTBlock
from emu.diffusion.unet import BasicTransformerBlock, ResnetBlock2D, UNet

ARCHITECTURES: dict[str, type[nn.Module]] = {"unet": UNet, "dit": DiT}
# the blocks FSDP shards as units, by class name (emu.training.distributed.shard_modules)
SHARDED_BLOCKS = tuple(cls.__name__ for cls in (ResnetBlock2D, BasicTransformerBlock, DiTBlock))


def architecture(config: dict[str, Any]) -> str:
    """A network config's ``arch`` (``unet`` where it names none); a clear error for an unknown one."""
    arch = config.get("arch", "unet")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown network architecture {arch!r} (model.unet.arch); choose one of "
                         f"{list(ARCHITECTURES)}")  # fmt: skip
    return arch


def build_network(config: dict[str, Any]) -> nn.Module:
    """The network ``config`` describes (its ``arch``; the U-Net's config carries none)."""
    config = dict(config)
    arch = architecture(config)
    if arch == "unet":
        config.pop("arch", None)
    return ARCHITECTURES[arch](**config)

"""Sharded training: FSDP2 (``torch.distributed.fsdp.fully_shard``) through Lightning's ``ModelParallelStrategy``.

:class:`FSDPStrategy` carries the sharding settings (full or hybrid sharding, the bf16 mixed-precision policy,
activation checkpointing, which block classes become their own FSDP units); a LightningModule applies them to its
trainable networks in ``configure_model`` with :func:`shard_modules`. Frozen networks (autoencoder, text encoders)
are left alone: they are replicated and run under the trainer's bf16 autocast. The EMA's averaged copies are sharded
exactly as the live networks, so each rank averages its own shard (:mod:`emu.diffusion.ema` works on local shards)
and the averages are saved in the sharded checkpoint with everything else.

Without a device mesh (one device, DDP) nothing here is used.
``python -m emu.training.distributed consolidate <folder>`` turns a sharded checkpoint into one file.
"""

from __future__ import annotations

import argparse
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from emu.errors import ConfigError
from emu.training.checkpoints import replace_folder
from emu.utils.checkpoint_header import is_sharded_checkpoint

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, None: None}


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a parameter (a DTensor under FSDP2), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


class FSDPStrategy(ModelParallelStrategy):
    """Fully sharded data parallel over all ranks (FSDP2), as a Lightning strategy.

    Args:
        sharding: ``full`` (shard over every rank) or ``hybrid`` (shard within a node, replicate across nodes).
        param_dtype, reduce_dtype: the mixed-precision policy: compute in ``param_dtype``, reduce gradients in
            ``reduce_dtype``; the optimizer keeps float32 master weights.
        activation_checkpointing: recompute block activations in the backward pass.
        reshard_after_forward: free gathered weights after each unit's forward (ZeRO-3); false keeps them (ZeRO-2).
        wrap: class names of the blocks that become their own FSDP units (defaults: the module's choice).
        save_distributed_checkpoint: each rank writes its shard (a checkpoint folder); false gathers one file.
    """

    def __init__(
        self,
        sharding: str = "full",
        param_dtype: str | None = "bfloat16",
        reduce_dtype: str | None = "float32",
        activation_checkpointing: bool = True,
        reshard_after_forward: bool = True,
        wrap: Iterable[str] | None = None,
        save_distributed_checkpoint: bool = True,
        **kwargs: Any,
    ):
        if sharding not in ("full", "hybrid"):
            raise ConfigError("trainer.strategy.sharding", f"must be 'full' or 'hybrid', got {sharding!r}")
        for key, value in (("param_dtype", param_dtype), ("reduce_dtype", reduce_dtype)):
            if value not in DTYPES:
                allowed = [k for k in DTYPES if k]
                raise ConfigError(f"trainer.strategy.{key}", f"must be one of {allowed}, got {value!r}")
        super().__init__(save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
        self.sharding, self.param_dtype, self.reduce_dtype = sharding, param_dtype, reduce_dtype
        self.activation_checkpointing, self.reshard_after_forward = activation_checkpointing, reshard_after_forward
        self.wrap = list(wrap) if wrap else None

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        """Sharded checkpoints are written to ``<path>.partial`` and then put in place (``replace_folder``), so a
        kill during the save leaves the previous checkpoint whole instead of a mix of old and new shards."""
        if not self._save_distributed_checkpoint or "://" in str(filepath):
            return super().save_checkpoint(checkpoint, filepath, storage_options)

        path = Path(self.broadcast(str(filepath)))
        partial = path.with_name(path.name + ".partial")
        if self.global_rank == 0 and partial.exists():
            shutil.rmtree(partial)  # a save that was cut short
        self.barrier("emu_checkpoint_start")
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier("emu_checkpoint_written")
        if self.global_rank == 0:
            replace_folder(partial, path)
        self.barrier("emu_checkpoint_in_place")

    def setup_environment(self) -> None:
        self._data_parallel_size, self._tensor_parallel_size = self.num_nodes * self.num_processes, 1
        super().setup_environment()

    def fsdp_mesh(self):
        """The mesh FSDP shards over: 1-D (full) or 2-D replicate x shard (hybrid)."""
        if self.sharding == "full":
            return self.device_mesh["data_parallel"]
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(self.root_device.type, (self.num_nodes, self.num_processes),
                                mesh_dim_names=("replicate", "shard"))  # fmt: skip

    def fully_shard_kwargs(self) -> dict[str, Any]:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        mp = MixedPrecisionPolicy(param_dtype=DTYPES[self.param_dtype], reduce_dtype=DTYPES[self.reduce_dtype])
        return {"mesh": self.fsdp_mesh(), "mp_policy": mp, "reshard_after_forward": self.reshard_after_forward}


def shard_modules(modules: Iterable[nn.Module], wrap: Iterable[str], strategy: FSDPStrategy | None = None) -> int:
    """``fully_shard`` every submodule whose class name is in ``wrap`` (or ``strategy.wrap``), then each module.

    Returns the number of FSDP units made. Modules already sharded are left as they are (``configure_model`` may
    run more than once).
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    kwargs = strategy.fully_shard_kwargs() if strategy is not None else {}
    names = set(strategy.wrap if strategy is not None and strategy.wrap else wrap)
    units = 0
    for module in modules:
        if isinstance(module, FSDPModule):
            continue
        for sub in module.modules():
            if sub is not module and type(sub).__name__ in names:
                fully_shard(sub, **kwargs)
                units += 1
        fully_shard(module, **kwargs)
        units += 1
    return units


def read_sharded_weights(folder: str | Path, prefixes: Iterable[str]) -> dict[str, torch.Tensor]:
    """The full tensors of a sharded checkpoint's ``state_dict`` whose keys start with one of ``prefixes`` (e.g. only
    the EMA's, to initialise the next stage): read straight from the shards, nothing else of the checkpoint loaded (the
    optimizer state of a 2.8B model would be ~23 GB more per process). Works with or without a process group."""
    import torch.distributed.checkpoint as dcp

    if not is_sharded_checkpoint(folder):
        raise FileNotFoundError(f"'{folder}' is not a sharded checkpoint folder (no *.distcp files)")
    reader = dcp.FileSystemReader(str(folder))
    entries = reader.read_metadata().state_dict_metadata
    wanted = {}
    for key, meta in entries.items():
        name = key.removeprefix("state_dict.")
        if key.startswith("state_dict.") and hasattr(meta, "size") and name.startswith(tuple(prefixes)):
            wanted[name] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
    if wanted:
        dcp.load({"state_dict": wanted}, storage_reader=reader)
    return wanted


def consolidate(folder: str | Path, out: str | Path | None = None) -> Path:
    """One ``.ckpt`` file from a sharded checkpoint folder (what ``load_diffusion``, ``sample.py`` and ``eval.py``
    read): full weights, EMA and optimizer states, with the run's metadata. Needs the whole model in CPU memory."""
    from lightning.fabric.utilities.load import _load_distributed_checkpoint  # Lightning's reader of DCP folders

    folder = Path(folder)
    if not folder.is_dir() or not any(folder.glob("*.distcp")):
        raise FileNotFoundError(f"'{folder}' is not a sharded checkpoint folder (no *.distcp files)")
    checkpoint = _load_distributed_checkpoint(folder)
    n = len([k for k in checkpoint if re.fullmatch(r"optimizer_\d+", k)])
    checkpoint["optimizer_states"] = [checkpoint.pop(f"optimizer_{i}") for i in range(n)]
    out = Path(out) if out else folder.with_name(folder.name.removesuffix(".ckpt") + ".consolidated.ckpt")
    tmp = out.with_name(out.name + ".tmp")
    torch.save(checkpoint, tmp)
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m emu.training.distributed", description="Tools for sharded (FSDP) runs.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("consolidate", help="one .ckpt file from a sharded checkpoint folder")
    c.add_argument("folder")
    c.add_argument("--out", default=None, help="default: <folder without .ckpt>.consolidated.ckpt beside it")
    args = p.parse_args(argv)
    print(f"wrote {consolidate(args.folder, args.out)}")


if __name__ == "__main__":
    main()

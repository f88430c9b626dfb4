"""Which rank of a multi-process job this process is, for the jobs that are not Lightning fits (precompute, curation).

They run under the launchers training uses: ``torchrun`` (torchelastic's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``),
SLURM's ``srun`` (``SLURM_PROCID`` / ``SLURM_NTASKS`` / ``SLURM_LOCALID``; detected by Lightning's
``SLURMEnvironment``, which ignores interactive allocations) or Lightning's own launcher (``LOCAL_RANK`` /
``WORLD_SIZE`` on one node); or are told by hand (``--rank`` / ``--world-size``, e.g. a SLURM array job). Such jobs
need no process group: each rank takes its share of the work by number (:func:`share`) and one rank gathers the
results from the files the others wrote (the precompute's last to finish, the curation's rank 0).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from emu.errors import ConfigError


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    launcher: str = "single process"

    def __post_init__(self):
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ConfigError("rank", f"rank {self.rank} of a world of {self.world} is not a rank of that world")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return f"rank {self.rank} of {self.world} ({self.launcher})" if self.world > 1 else self.launcher


def detect_ranks(rank: int | None = None, world: int | None = None) -> Ranks:
    """This process's :class:`Ranks`: given by hand (both ``rank`` and ``world``), else from the launcher's
    environment, else a single process."""
    if (rank is None) != (world is None):
        raise ConfigError("--rank/--world-size", "give both or neither")
    if rank is not None:
        return Ranks(int(rank), int(world), int(os.environ.get("LOCAL_RANK", 0)), "given by hand")
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    env = os.environ
    if TorchElasticEnvironment.detect():
        return Ranks(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun")
    if SLURMEnvironment.detect():
        return Ranks(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)), "SLURM")
    if "LOCAL_RANK" in env and "WORLD_SIZE" in env and int(env.get("NODE_RANK", 0)) == 0:
        return Ranks(int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]), "Lightning")
    return Ranks()


def share(items: list, ranks: Ranks) -> list:
    """This rank's items of a list every rank builds the same way: every ``world``-th one, from its rank on."""
    return items[ranks.rank :: ranks.world]

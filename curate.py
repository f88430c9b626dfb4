"""Curate a corpus: ``python curate.py [stages.<name>.<key>=... ...]``.

Runs the funnel of ``conf/curate.yaml`` (automatic stages, then human passes) over the configured data source and
writes the curated set (``<out>/curated``, readable with ``data=folder``), score tables, ``funnel.json`` and
``funnel.md``. Rerunning with the same ``out`` resumes: finished stages and pieces are not redone. Under ``torchrun``
or ``srun`` every rank runs the same command with the same ``out`` (a shared folder) and scores its share of the
pieces (:mod:`emu.curation.funnel`), e.g. ``torchrun --nproc-per-node 8 curate.py out=/shared/curation ...``.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import hydra
import torch
from hydra.utils import get_class
from omegaconf import DictConfig

from emu.curation.funnel import Funnel
from emu.curation.pieces import CurationError
from emu.errors import ConfigError
from emu.text.clip import ClipEmbedder
from emu.training.ranks import detect_ranks
from emu.utils.config import check_experiment_args, check_required, config_errors_as_messages


def build_stages(cfg: DictConfig, device: str = "cpu") -> list:
    """Instantiate the stages in order, each named by its key; those that take a ``clip`` share one, loaded on first
    need (on ``device``)."""
    clip = None
    stages = []
    for name, node in cfg.stages.items():
        if node is None:  # stages.<name>=null removes a stage
            continue
        if node.get("name", name) != name:
            raise ConfigError(f"stages.{name}.name", f"is {node.name!r}; a stage is named by its key: rename the key")
        params = inspect.signature(get_class(node._target_).__init__).parameters
        extra = {"name": name}
        if "clip" in params:
            if clip is None:
                if not Path(str(cfg.clip)).expanduser().exists() and str(cfg.clip).startswith((".", "/", "~")):
                    raise ConfigError("clip", f"no CLIP model folder at '{cfg.clip}' (train one: make demo)")
                clip = ClipEmbedder(cfg.clip, device)
            extra["clip"] = clip
        stages.append(hydra.utils.instantiate(node, **extra))
    return stages


def run(cfg: DictConfig) -> dict:
    check_required(cfg)
    ranks = detect_ranks()
    device = f"cuda:{ranks.local_rank}" if torch.cuda.is_available() else "cpu"
    stages = build_stages(cfg, device)
    datamodule = hydra.utils.instantiate(cfg.data)
    funnel = Funnel(datamodule, stages, cfg.out, examples=int(cfg.examples), ranks=ranks,
                    piece_size=int(cfg.piece_size), poll_seconds=float(cfg.poll_seconds))  # fmt: skip
    print(f"curating into {cfg.out} ({ranks.describe()}, {funnel.pieces} pieces)")
    try:
        report = funnel.run()
    except CurationError as e:
        print(f"curation stopped: {e}", file=sys.stderr)
        raise SystemExit(3) from e
    if not ranks.is_main:
        return report
    f = report["final"]
    line = f"curated {f['n']} of {report['n_images']} images in {report['seconds']:.0f}s"
    if "precision" in f:
        line += f": precision {100 * f['precision']:.1f}%, recall {100 * f['recall']:.1f}% (hidden needles)"
    print(line)
    print(f"  set:    {Path(cfg.out) / 'curated'}\n  report: {Path(cfg.out) / 'funnel.md'}")
    if hasattr(datamodule, "skip_summary"):
        print(f"  data:   {datamodule.skip_summary()}")
    return report


@hydra.main(version_base="1.3", config_path="conf", config_name="curate")
@config_errors_as_messages
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    check_experiment_args(sys.argv[1:], str(Path(__file__).parent / "conf"), "curate")
    main()

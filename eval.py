"""Evaluate a text-to-image model, or compare two: ``python eval.py a=CKPT_OR_FOLDER [b=...] prompts=...``.

Writes ``metrics.json``, ``scores.jsonl`` (per image), ``report.md``, ``side_by_side.png`` and the images of each item
(``samples_<name>/``, sample.py's format) into the run folder (``out=``); see ``conf/eval.yaml`` for every option,
``emu/evaluation/run.py`` for the run and ``emu/evaluation/metrics.py`` for the metrics. Stage-0 autoencoders get
PSNR / SSIM / LPIPS / rFID instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from emu.evaluation.run import run
from emu.utils.config import check_experiment_args, config_errors_as_messages

__all__ = ["main", "run"]


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
@config_errors_as_messages
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    check_experiment_args(sys.argv[1:], str(Path(__file__).parent / "conf"), "eval")
    sys.exit(main())

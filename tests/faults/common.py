"""Running train.py as a subprocess with faults injected (tests/faults/inject.py), and reading what it recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, tiny_stage1_overrides

SMALL = ["data.batch_size=4", "data.num_workers=0", "data.source.n_train=16", "data.source.n_val=4",
         "data.resolution=32", "++trainer.limit_val_batches=1", "trainer.val_check_interval=3",
         "trainer.check_val_every_n_epoch=null", "trainer.max_epochs=-1", "trainer.log_every_n_steps=1",
         "callbacks.progress_bar=null", "callbacks.model_checkpoint.every_n_train_steps=1",
         "callbacks.model_checkpoint.monitor=step", "callbacks.model_checkpoint.mode=max"]  # fmt: skip


def stage_overrides(stage: str, tiny: tuple[Path, Path, Path]) -> list[str]:
    """A few seconds per run of each stage's mini experiment: tiny networks on 16 haystack images at 32px."""
    if stage == "stage1":
        return ["experiment=mini/stage1_pretrain", *SMALL, "model.val_prompts=null", *tiny_stage1_overrides(*tiny)]
    if stage == "autoencoder":  # the adversarial phase from step 3 on
        return ["experiment=mini/autoencoder", *SMALL, "model.autoencoder.block_out_channels=[8,8,8,8]",
                "model.autoencoder.norm_num_groups=4", "model.loss.disc_start=3", "model.loss.disc_width=8",
                "model.num_logged_images=2", "model.export_on_fit_end=false"]  # fmt: skip
    if stage == "judge":
        return ["experiment=mini/judge", *SMALL, "data.source.cache=false", "data.persistent_workers=false",
                "model.num_logged_images=2"]  # fmt: skip
    if stage == "clip":
        return ["experiment=mini/clip", *SMALL, "model.vision_width=32", "model.vision_layers=1", "model.text_width=32",
                "model.text_layers=1", "model.heads=2", "model.projection_dim=16", "model.retrieval_candidates=4",
                "model.export_on_fit_end=false"]  # fmt: skip
    raise ValueError(stage)


def train(run_dir: Path, overrides: list[str], *injected: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python train.py`` in ``run_dir`` (fixed, so that ``ckpt_path=last`` finds the run's checkpoints); every
    training batch's loss and sample keys are appended to ``run_dir/losses.jsonl``."""
    record = [
        "+callbacks.record._target_=tests.faults.inject.RecordLosses",
        f"+callbacks.record.out={run_dir}/losses.jsonl",
    ]
    cmd = [sys.executable, "train.py", *overrides, f"hydra.run.dir={run_dir}", f"paths.output_dir={run_dir}", *record,
           *injected]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def inject(name: str, **kwargs) -> list[str]:
    """Overrides adding the fault injector ``tests.faults.inject.<name>`` with its arguments."""
    out = [f"+callbacks.fault._target_=tests.faults.inject.{name}"]
    for k, v in kwargs.items():
        out.append(f"+callbacks.fault.{k}={json.dumps(v) if isinstance(v, list) else v}")
    return out


def losses(run_dir: Path) -> dict[int, dict]:
    """step -> the last record of that step (a resumed run appends the steps it redoes)."""
    rows = [json.loads(line) for line in (run_dir / "losses.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "losses.jsonl").read_text().splitlines()]


def tail(r: subprocess.CompletedProcess) -> str:
    return (r.stdout[-2500:] + "\n---stderr---\n" + r.stderr[-2500:]).strip()

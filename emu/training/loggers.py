"""Loggers whose history survives a kill and a resume: a resumed run's curves equal an uninterrupted run's.

Lightning's loggers start over in their folder: ``CSVLogger`` deletes ``metrics.csv`` when it is created, so a run
resumed with ``ckpt_path=last`` keeps only the steps after the checkpoint; TensorBoard starts a second event file
whose steps overlap the first; W&B starts a new run. The rule here, the same for each: **a resumed run's first
metrics, at step S, replace whatever its folder holds for steps >= S** (it redoes exactly the steps after its
checkpoint), and every logged row is on disk when ``log_metrics`` returns, so a SIGKILL loses no row from before the
checkpoint (the file is rewritten atomically). A fresh run (``train.py`` without ``ckpt_path``) calls
:func:`start_fresh` first: its folder's history starts over. Rows logged by hand use
:func:`emu.utils.steps.log_step`, Lightning's own step, so that they are replaced exactly like its rows.

* :class:`ContinuingCSVLogger`: keeps ``metrics.csv``, drops its rows of step >= S, appends (a torn last line from
  a kill mid-write is dropped too).
* :class:`ContinuingTensorBoardLogger`: a new event file opened with ``purge_step=S`` (TensorBoard's own way to
  discard the events of steps >= S that earlier files hold), flushed on every log; a fresh run purges from step 0.
* :class:`ContinuingWandbLogger`: the run id is kept in ``<save_dir>/wandb_run_id`` and the run resumed
  (``resume="allow"``), so every attempt of a preempted job logs into one W&B run (a fresh run gets a new id). W&B
  cannot rewind a run offline: rows logged between the checkpoint and the kill appear twice in its history, with
  the same ``trainer/global_step``.
"""

from __future__ import annotations

import csv
import io
import os
import secrets
import string
from pathlib import Path
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_only

RUN_ID_FILE = "wandb_run_id"


def _int_or_none(value: Any) -> int | None:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def _write_rows(fs, path: str, keys: list[str], rows: list[dict]) -> None:
    """``metrics.csv`` written beside itself and renamed into place: a kill mid-write leaves the old file whole."""
    tmp = path + ".tmp"
    with fs.open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    if "://" in path:  # a remote store: its own move
        fs.mv(tmp, path)
    else:
        os.replace(tmp, path)  # atomic on POSIX


def rows_before(text: str, step: int) -> tuple[list[str], list[dict[str, str]]]:
    """The header and the rows of a ``metrics.csv`` whose step is below ``step``, without empty columns.

    A last line without its newline (a kill mid-write) and rows whose step does not parse are dropped.
    """
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    kept = [r for r in csv.DictReader(io.StringIO(text)) if (s := _int_or_none(r.get("step"))) is not None and s < step]
    keys = sorted({k for r in kept for k, v in r.items() if k is not None and v not in ("", None)})
    return keys, [{k: r.get(k, "") for k in keys} for r in kept]


class _ContinuingWriter(ExperimentWriter):
    """Lightning's CSV writer, continuing an existing ``metrics.csv`` from the first step it is given."""

    def __init__(self, log_dir: str) -> None:
        self._continued = False
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # the parent deletes metrics.csv here; the first log decides instead
        pass

    def log_metrics(self, metrics_dict: dict[str, float], step: int | None = None) -> None:
        if not self._continued:
            self._continue_from(len(self.metrics) if step is None else step)
        super().log_metrics(metrics_dict, step)

    def start_fresh(self) -> None:
        self._continue_from(0)

    def _continue_from(self, step: int) -> None:
        self._continued = True
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            keys, rows = rows_before(f.read(), step)
        if not rows:
            self._fs.rm_file(self.metrics_file_path)
            return
        _write_rows(self._fs, self.metrics_file_path, keys, rows)
        self.metrics_keys = keys

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:  # a new column: atomically, unlike Lightning's
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            rows = list(csv.DictReader(f))
        _write_rows(self._fs, self.metrics_file_path, fieldnames, rows)


class ContinuingCSVLogger(CSVLogger):
    """``CSVLogger`` that continues its ``metrics.csv`` on resume (see the module docstring); flushes every row by
    default (an append of one line per step), so that a kill loses nothing from before the checkpoint."""

    def __init__(
        self,
        save_dir: str | os.PathLike,
        name: str | None = "lightning_logs",
        version: int | str | None = None,
        prefix: str = "",
        flush_logs_every_n_steps: int = 1,
    ) -> None:
        super().__init__(save_dir, name, version, prefix, flush_logs_every_n_steps)

    @property
    @rank_zero_experiment
    def experiment(self) -> _ContinuingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def start_fresh(self) -> None:
        """This folder's history starts over (a fresh run, not a resume)."""
        self.experiment.start_fresh()


class ContinuingTensorBoardLogger(TensorBoardLogger):
    """``TensorBoardLogger`` whose first logged step S purges the steps >= S of earlier event files in its folder."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._continued = False

    @property
    @rank_zero_experiment
    def experiment(self):
        experiment = super().experiment
        self._kwargs.pop("purge_step", None)  # once: a writer made again later must not purge this run's steps
        return experiment

    @rank_zero_only
    def start_fresh(self) -> None:
        """This folder's history starts over: the first event file purges every step of the older ones."""
        self._purge_from(0)

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self._continued and step:
            self._purge_from(int(step))
        self._continued = True
        super().log_metrics(metrics, step)
        self.experiment.flush()

    def _purge_from(self, step: int) -> None:
        self._continued = True
        if not any(Path(self.log_dir).glob("events.out.tfevents.*")):
            return
        if self._experiment is not None:  # what it wrote (hyperparameters) stays in its own, earlier file
            self._experiment.close()
            self._experiment = None
        self._kwargs["purge_step"] = step


def stored_run_id(save_dir: str | os.PathLike) -> str:
    """The W&B run id of the run folder ``save_dir``: read from ``wandb_run_id`` there, made and written once."""
    path = Path(save_dir) / RUN_ID_FILE
    if path.is_file() and (run_id := path.read_text().strip()):
        return run_id
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's own form
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


class ContinuingWandbLogger(WandbLogger):
    """``WandbLogger`` that resumes the W&B run of its run folder (id in ``<save_dir>/wandb_run_id``)."""

    def __init__(self, *args: Any, save_dir: str, id: str | None = None, **kwargs: Any) -> None:
        if id is None and rank_zero_only.rank == 0:
            id = stored_run_id(save_dir)
        kwargs.setdefault("resume", "allow")
        super().__init__(*args, save_dir=save_dir, id=id, **kwargs)

    @rank_zero_only
    def start_fresh(self) -> None:
        """A new W&B run for this folder (its id replaces the stored one), unless the experiment already began."""
        if self._experiment is None:
            (Path(self.save_dir) / RUN_ID_FILE).unlink(missing_ok=True)
            self._wandb_init["id"] = self._id = stored_run_id(self.save_dir)


def start_fresh(loggers: list) -> None:
    """Each logger's folder starts its history over (``train.py`` for a run without ``ckpt_path``)."""
    for logger in loggers:
        if hasattr(logger, "start_fresh"):
            logger.start_fresh()

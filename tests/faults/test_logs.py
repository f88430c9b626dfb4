"""Training logs survive a SIGKILL and a resume: the resumed run's CSV and TensorBoard histories equal an
uninterrupted run's (every step once, same values), resuming a finished run leaves them as they were, and a W&B
run folder keeps its run id (emu/training/loggers.py)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from emu.training.loggers import ContinuingCSVLogger, ContinuingWandbLogger, rows_before, stored_run_id
from tests.faults.common import stage_overrides, tail, train
from tests.faults.test_resume import STEPS, _assert_same_continuation, _kill_and_resume

BOTH = ["logger=[csv,tensorboard]"]


def csv_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "csv" / "metrics.csv", newline="") as f:
        return [{k: v for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


def tb_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))  # purges orphaned steps as TensorBoard itself does
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_same_history(got: list[dict], want: list[dict]) -> None:
    assert [(r["step"], sorted(r)) for r in got] == [(r["step"], sorted(r)) for r in want]
    for a, b in zip(got, want, strict=True):
        for k in b:
            assert float(a[k]) == pytest.approx(float(b[k]), abs=1e-6), f"step {b['step']} {k}"


@pytest.fixture
def tiny(tiny_autoencoder, tiny_clip, tiny_t5):
    return tiny_autoencoder, tiny_clip, tiny_t5


@pytest.mark.slow  # ~50 s: two loggers, a SIGKILL and a resume
def test_csv_and_tensorboard_histories_survive_a_sigkill_and_resume(tmp_path, tiny):
    """Killed in step 7, the run resumes from step 6's last.ckpt, saved again after step 6's validation
    (LastAfterValidation): the continuation is exact as well, and rows 0-5 can only come from the killed attempt's
    files (flushed as logged)."""
    overrides = [*stage_overrides("stage1", tiny), *BOTH]
    expected, rows, straight, run, kill = _kill_and_resume(tmp_path, overrides, kill=7)
    _assert_same_continuation(expected, rows, straight, run, kill)
    overrides.append(f"trainer.max_steps={STEPS}")

    want = csv_rows(straight)
    assert {r["step"] for r in want} == {str(s) for s in range(STEPS + 1)}
    assert_same_history(csv_rows(run), want)  # before the fix: only the steps from the checkpoint on
    tb_want, tb_got = tb_scalars(straight), tb_scalars(run)
    assert "train/loss" in tb_want and tb_got.keys() == tb_want.keys()
    for tag, points in tb_want.items():  # before the fix: the steps from the checkpoint to the kill twice
        assert [s for s, _ in tb_got[tag]] == [s for s, _ in points], tag
        assert [v for _, v in tb_got[tag]] == pytest.approx([v for _, v in points], abs=1e-6), tag

    # resuming the finished run changes nothing (before the fix: a single row was left)
    assert (r := train(run, [*overrides, "ckpt_path=last"])).returncode == 0, tail(r)
    assert_same_history(csv_rows(run), want)
    # a fresh run in the same folder starts the history over, even when its first row is not at step 0
    fresh = [*stage_overrides("stage1", tiny), *BOTH, "trainer.max_steps=3", "trainer.log_every_n_steps=2"]
    for folder in (run, tmp_path / "fresh"):
        assert (r := train(folder, fresh)).returncode == 0, tail(r)
    assert_same_history(csv_rows(run), csv_rows(tmp_path / "fresh"))
    assert tb_scalars(run) == tb_scalars(tmp_path / "fresh")


def test_rows_before_drops_later_steps_a_torn_line_and_empty_columns():
    text = "epoch,lr,step,train/loss,val/loss\n0,0.1,0,1.5,\n0,0.1,1,1.4,\n0,,1,,1.3\n0,0.1,2,1.2,\n0,0.1,3,1."
    keys, rows = rows_before(text, 2)
    assert keys == ["epoch", "lr", "step", "train/loss", "val/loss"] and [r["step"] for r in rows] == ["0", "1", "1"]
    keys, rows = rows_before(text, 1)
    assert keys == ["epoch", "lr", "step", "train/loss"] and len(rows) == 1  # val/loss never reached
    assert rows_before(text, 9)[1][-1]["step"] == "2", "the torn last line (no newline) is dropped"
    assert rows_before("", 5) == ([], [])


def test_the_csv_logger_continues_the_file_of_its_folder(tmp_path):
    first = ContinuingCSVLogger(tmp_path, name="csv", version="")
    for step in range(4):
        first.log_metrics({"loss": 1.0 + step}, step)
    first.save()
    again = ContinuingCSVLogger(tmp_path, name="csv", version="")  # a resume from a checkpoint after step 1
    assert (tmp_path / "csv" / "metrics.csv").is_file(), "not deleted when the logger is made"
    again.log_metrics({"loss": 9.0, "new": 2.0}, 2)
    again.save()
    rows = csv_rows(tmp_path)
    assert [(r["step"], r["loss"]) for r in rows] == [("0", "1.0"), ("1", "2.0"), ("2", "9.0")]
    assert rows[-1]["new"] == "2.0"


def test_a_wandb_run_folder_keeps_its_run_id(tmp_path):
    run_id = stored_run_id(tmp_path)
    assert (tmp_path / "wandb_run_id").read_text().strip() == run_id == stored_run_id(tmp_path)
    logger = ContinuingWandbLogger(save_dir=str(tmp_path), project="emu", offline=True)
    assert logger._wandb_init["id"] == run_id and logger._wandb_init["resume"] == "allow"
    assert stored_run_id(tmp_path / "other") != run_id
    logger.start_fresh()  # a fresh run in the same folder: a new W&B run, remembered for its resumes
    assert logger._wandb_init["id"] != run_id and stored_run_id(tmp_path) == logger._wandb_init["id"]

"""Preemption: SIGTERM or SIGUSR1 makes the run save a checkpoint and exit cleanly at the end of the current step;
resuming from it continues exactly as the uninterrupted run."""

import time

import pytest
import torch

from tests.faults.common import inject, losses, records, stage_overrides, tail, train


@pytest.fixture
def tiny(tiny_autoencoder, tiny_clip, tiny_t5):
    return tiny_autoencoder, tiny_clip, tiny_t5


@pytest.mark.parametrize("sig", ["SIGTERM", pytest.param("SIGUSR1", marks=pytest.mark.slow)])
def test_signal_saves_a_checkpoint_exits_cleanly_and_resumes_exactly(tmp_path, tiny, sig):
    overrides = [*stage_overrides("stage1", tiny), "trainer.max_steps=7"]
    straight = tmp_path / "straight"
    assert train(straight, overrides).returncode == 0

    run = tmp_path / "preempted"
    t0 = time.perf_counter()
    r = train(run, overrides, *inject("KillAt", step=5, sig=sig, at="start"))
    assert r.returncode == 0, tail(r)  # a clean exit: the scheduler may requeue it
    assert f"preempted: {sig} at step 5" in r.stdout and "ckpt_path=last" in r.stdout, tail(r)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 5
    saver = next(v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint"))
    assert saver["last_model_path"] == str(run / "checkpoints" / "last.ckpt"), "the checkpoint callback knows it"
    assert max(losses(run)) == 5, "stopped at the end of the step it was signalled in"
    assert time.perf_counter() - t0 < 120

    r = train(run, [*overrides, "ckpt_path=last"])
    assert r.returncode == 0, tail(r)
    expected, rows = losses(straight), records(run)
    assert [x["step"] for x in rows] == list(range(1, 8)), "no step repeated or skipped"
    for row in rows:
        assert row["keys"] == expected[row["step"]]["keys"]
        assert row["loss"] == pytest.approx(expected[row["step"]]["loss"], abs=1e-6)

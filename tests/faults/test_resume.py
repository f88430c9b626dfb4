"""Exact resume: a run killed with SIGKILL mid-epoch and resumed with ckpt_path=last sees the same samples, in the
same order, and computes the same losses (1e-6) as one that never stopped, for every stage's module; a broken
checkpoint is refused with the newest complete alternative."""

import shutil

import pytest
import torch

from emu.errors import ConfigError
from emu.training.checkpoints import resolve_checkpoint
from tests.faults.common import inject, losses, records, stage_overrides, tail, train

STEPS, KILL = 8, 6  # 16 images in batches of 4: epochs of 4 steps; killed in the second epoch, before step 6's save
# checkpoints taken on an epoch's last batch, before its end hooks: resumed, the next epoch must come next, whole
EPOCH_END_CASES = {
    "validation_end_checkpoint_at_epoch_end": (
        5,
        ["trainer.val_check_interval=1.0", "trainer.check_val_every_n_epoch=1"],
        {},
    ),
    "checkpoint_on_the_last_batch": (5, [], {"save_first": True, "step": 4}),  # as a time-interval one would
}


@pytest.fixture
def tiny(tiny_autoencoder, tiny_clip, tiny_t5):
    return tiny_autoencoder, tiny_clip, tiny_t5


def _kill_and_resume(tmp_path, overrides, kill=KILL, **injected):
    straight = tmp_path / "straight"
    r = train(straight, [*overrides, f"trainer.max_steps={STEPS}"])
    assert r.returncode == 0, tail(r)
    run = tmp_path / "killed"
    r = train(
        run,
        [*overrides, f"trainer.max_steps={STEPS}"],
        *inject("KillAt", **{"step": kill, "sig": "SIGKILL", **injected}),
    )
    assert r.returncode == -9, tail(r)  # killed, no clean-up of any kind
    r = train(run, [*overrides, f"trainer.max_steps={STEPS}", "ckpt_path=last"])
    assert r.returncode == 0, tail(r)
    return losses(straight), records(run), straight, run, kill


def _tensors(x, prefix=""):
    """Every tensor in a nested checkpoint structure, by path."""
    if isinstance(x, torch.Tensor):
        return {prefix: x}
    items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, list | tuple) else ()
    return {k: v for key, value in items for k, v in _tensors(value, f"{prefix}/{key}").items()}


def _assert_same_continuation(expected, rows, straight, run, kill):
    resumed = [r for r in rows if r["pid"] == rows[-1]["pid"]]
    assert len(resumed) < len(rows), "the run was killed and resumed"
    assert resumed[0]["step"] == kill, "resumes after the last checkpoint (step kill - 1)"
    for row in resumed:
        want = expected[row["step"]]
        assert row["keys"] == want["keys"], f"step {row['step']}: other samples than the uninterrupted run"
        assert row["loss"] == pytest.approx(want["loss"], abs=1e-6), f"step {row['step']}"
    assert [r["step"] for r in resumed] == list(range(kill, STEPS + 1))
    # and it ends in the same state: weights, EMA, optimizer moments, LR schedule, step
    a, b = (
        torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False) for d in (straight, run)
    )
    assert a["global_step"] == b["global_step"] >= kill  # the newest save of each run: after the resume
    assert a["lr_schedulers"] == b["lr_schedulers"]
    ta, tb = (
        _tensors({k: a[k] for k in ("state_dict", "optimizer_states")}),
        _tensors({k: b[k] for k in ("state_dict", "optimizer_states")}),
    )
    assert ta.keys() == tb.keys() and any("ema" in k for k in ta) == ("ema" in str(list(a["state_dict"])))
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], atol=1e-6, rtol=1e-5, msg=k)


def test_stage1_resumes_exactly_after_sigkill(tmp_path, tiny):
    _assert_same_continuation(*_kill_and_resume(tmp_path, stage_overrides("stage1", tiny)))


# the validation-end case is slow (~25 s; make test-all): the last-batch case covers the same epoch boundary
@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c.startswith("validation_end") else c
                                  for c in EPOCH_END_CASES])  # fmt: skip
def test_a_checkpoint_from_an_epochs_last_batch_resumes_into_the_next_epoch(tmp_path, tiny, case):
    kill, extra, injected = EPOCH_END_CASES[case]
    _assert_same_continuation(*_kill_and_resume(tmp_path, [*stage_overrides("stage1", tiny), *extra], kill, **injected))


@pytest.mark.slow
def test_stage1_on_webdataset_shards_with_two_workers_resumes_exactly(tmp_path, tiny):
    from emu.mini import haystack

    haystack.write_shards(tmp_path / "shards", 16, resolution=32, shard_size=4, progress=False)
    overrides = [*stage_overrides("stage1", tiny), "data=webdataset", f"data.source.shards={tmp_path}/shards/*.tar",
                 "~data.source.n_train", "~data.source.n_val", "data.source.val_fraction=0.2", "data.num_workers=2",
                 "data.source.shuffle_buffer=8"]  # fmt: skip
    _assert_same_continuation(*_kill_and_resume(tmp_path, overrides))


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["autoencoder", "judge", "clip"])
def test_every_stage_resumes_exactly_after_sigkill(tmp_path, tiny, stage):
    _assert_same_continuation(*_kill_and_resume(tmp_path, stage_overrides(stage, tiny)))


@pytest.mark.slow
def test_two_ddp_ranks_resume_loss_for_loss_after_sigkill(tmp_path, tiny):
    """2 CPU processes (gloo), both killed at the end of step 6 and resumed: each rank sees the same samples and
    computes the same losses as in an uninterrupted 2-process run, and the runs end in the same state."""
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
    _, rows, straight, run, kill = _kill_and_resume(tmp_path, [*stage_overrides("stage1", tiny), *ddp])
    expected = records(straight)
    assert {r["rank"] for r in expected} == {0, 1}
    for rank in (0, 1):
        want = {r["step"]: r for r in expected if r["rank"] == rank}
        mine = [r for r in rows if r["rank"] == rank]
        resumed = mine[-(STEPS - kill + 1) :]
        assert len(mine) == kill + len(resumed) and resumed[0]["pid"] != mine[0]["pid"], f"rank {rank} was killed"
        assert [r["step"] for r in resumed] == list(range(kill, STEPS + 1)), f"rank {rank}"
        for row in resumed:
            assert row["keys"] == want[row["step"]]["keys"], f"rank {rank} step {row['step']}: other samples"
            assert row["loss"] == pytest.approx(want[row["step"]]["loss"], abs=1e-6), f"rank {rank} step {row['step']}"
    a, b = (torch.load(d / "checkpoints/last.ckpt", map_location="cpu", weights_only=False) for d in (straight, run))
    assert a["global_step"] == b["global_step"] >= kill  # the newest save of each: after the resume
    ta, tb = (_tensors({k: c[k] for k in ("state_dict", "optimizer_states")}) for c in (a, b))
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], atol=1e-6, rtol=1e-5, msg=k)


def test_a_corrupt_checkpoint_is_refused_naming_the_newest_complete_one(tmp_path, tiny):
    run = tmp_path / "run"
    r = train(run, [*stage_overrides("stage1", tiny), "trainer.max_steps=3"])
    assert r.returncode == 0, tail(r)
    folder = run / "checkpoints"
    last = folder / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])  # a save cut short by a crash (what the atomic writer prevents)
    newest = max((p for p in folder.glob("step_*.ckpt")), key=lambda p: p.stat().st_mtime)
    with pytest.raises(ConfigError, match="truncated or corrupt") as e:
        resolve_checkpoint("last", folder)
    assert str(newest) in str(e.value) and str(last) in str(e.value)

    r = train(run, [*stage_overrides("stage1", tiny), "trainer.max_steps=4", "ckpt_path=last"])
    assert r.returncode == 2 and f"ckpt_path={newest}" in r.stderr, tail(r)
    shutil.copy(newest, last)
    assert resolve_checkpoint("last", folder) == str(last)

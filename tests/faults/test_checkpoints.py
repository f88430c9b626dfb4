"""Checkpoints that cannot be half-written: a crash during a save leaves the previous file whole; keep-last-N."""

import pytest
import torch

from emu.training.checkpoints import AtomicCheckpointIO, checkpoint_problem, complete_checkpoints
from tests.faults.common import stage_overrides, tail, train


def test_a_crash_during_a_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(1000)}, path)
    assert checkpoint_problem(path) is None

    real_save = torch.save

    def dies_halfway(obj, f, *a, **kw):  # writes part of the file, then the process "dies"
        real_save(obj, f, *a, **kw)
        f.truncate(f.tell() // 2)
        raise KeyboardInterrupt("killed during the write")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert checkpoint_problem(path) is None and torch.load(path)["step"] == 1, "the old checkpoint is intact"
    assert checkpoint_problem(path.with_name("last.ckpt.tmp")) is not None  # the torn one never took its name
    assert complete_checkpoints(tmp_path) == [path]


def test_runs_keep_the_last_three_checkpoints_and_last(tmp_path, tiny_autoencoder, tiny_clip, tiny_t5):
    overrides = [*stage_overrides("stage1", (tiny_autoencoder, tiny_clip, tiny_t5)), "trainer.max_steps=6",
                 "callbacks.model_checkpoint.save_top_k=3"]  # fmt: skip
    r = train(tmp_path / "run", overrides)
    assert r.returncode == 0, tail(r)
    folder = tmp_path / "run" / "checkpoints"
    names = sorted(p.name for p in folder.glob("*.ckpt"))
    assert len(names) == 4 and "last.ckpt" in names, names
    assert not list(folder.glob("*.tmp")), "no temporary file left behind"

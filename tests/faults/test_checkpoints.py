"""Checkpoints that cannot be half-written: a crash during a save leaves the previous file whole; keep-last-N."""

import pytest
import torch

from emu.training.checkpoints import AtomicCheckpointIO, checkpoint_problem, complete_checkpoints, resolve_checkpoint
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


@pytest.mark.parametrize("name", ["best", "hpc", "registry", "s3://bucket/run/last.ckpt"])
def test_lightnings_own_checkpoint_names_and_remote_paths_pass_through(tmp_path, name):
    assert resolve_checkpoint(name, tmp_path) == name


def test_a_missing_checkpoint_is_refused_and_last_without_one_starts_fresh(tmp_path):
    from emu.errors import ConfigError

    assert resolve_checkpoint("last", tmp_path) is None and resolve_checkpoint(None, tmp_path) is None
    with pytest.raises(ConfigError, match="no such file"):
        resolve_checkpoint(str(tmp_path / "step_0000007.ckpt"), tmp_path)


def _folder_checkpoint(path, tag):
    path.mkdir(parents=True)
    for name in (".metadata", "meta.pt", "__0_0.distcp"):
        (path / name).write_text(tag)


def test_a_sharded_checkpoint_replaces_the_previous_one_with_one_always_complete(tmp_path, monkeypatch):
    import os

    from emu.training import checkpoints

    last = tmp_path / "last.ckpt"
    _folder_checkpoint(last, "old")
    _folder_checkpoint(tmp_path / "last.ckpt.partial", "new")
    checkpoints.replace_folder(tmp_path / "last.ckpt.partial", last)
    assert (last / "meta.pt").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]

    # killed between the two renames: the previous checkpoint is only at last.ckpt.old, and a resume finds it
    _folder_checkpoint(tmp_path / "last.ckpt.partial", "newer")
    real_replace = os.replace

    def replace_then_die(src, dst):
        if not str(dst).endswith(".old"):
            raise KeyboardInterrupt  # the second rename never happens
        real_replace(src, dst)

    monkeypatch.setattr(checkpoints.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.replace_folder(tmp_path / "last.ckpt.partial", last)
    monkeypatch.undo()
    assert not last.exists()
    assert resolve_checkpoint("last", tmp_path) == str(tmp_path / "last.ckpt.old")
    # the next save puts its folder in place and only then drops the old one
    checkpoints.replace_folder(tmp_path / "last.ckpt.partial", last)
    assert (last / "meta.pt").read_text() == "newer" and not (tmp_path / "last.ckpt.old").exists()
    assert resolve_checkpoint("last", tmp_path) == str(last)


def test_last_ckpt_and_the_export_agree_on_the_latent_statistics(tmp_path):
    """The final step's validation measures the latent statistics after that step's last.ckpt was written; the
    checkpoint is saved again after it (LastAfterValidation). Before: last.ckpt held the previous validation's."""
    from safetensors.torch import load_file

    run = tmp_path / "ae"
    overrides = [*stage_overrides("autoencoder", None), "trainer.max_steps=6", "model.export_on_fit_end=true"]
    assert (r := train(run, overrides)).returncode == 0, tail(r)
    exported = load_file(run / "export" / "model.safetensors")
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    for name in ("latent_mean", "latent_std"):
        assert not torch.equal(exported[name], torch.zeros_like(exported[name]) + (name == "latent_std")), name
        torch.testing.assert_close(state[f"autoencoder.{name}"], exported[name], rtol=0, atol=0, msg=name)

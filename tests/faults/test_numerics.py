"""Numerical faults: a step with NaN or Inf gradients is skipped (weights untouched), counted and logged; K in a row
stop the run with a clear message and a checkpoint of the last good state. The autoencoder's discriminator too."""

import csv

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from emu.training.numerics import NumericalGuard
from tests.faults.common import inject, stage_overrides, tail, train


@pytest.fixture
def tiny(tiny_autoencoder, tiny_clip, tiny_t5):
    return tiny_autoencoder, tiny_clip, tiny_t5


def _unet(path):
    sd = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    return {k: v for k, v in sd.items() if k.startswith("unet.")}


def test_nonfinite_steps_are_skipped_and_k_in_a_row_stop_the_run(tmp_path, tiny):
    overrides = [*stage_overrides("stage1", tiny), "trainer.max_steps=6", "callbacks.model_checkpoint.save_top_k=-1",
                 "callbacks.numerical_guard.max_consecutive=3"]  # fmt: skip
    run = tmp_path / "one_bad_step"
    r = train(run, overrides, *inject("PoisonGradients", steps=[2], value="nan"))
    assert r.returncode == 0, tail(r)
    assert "step 2: non-finite gradients, step skipped (1 in a row, 1 in all)" in r.stdout, tail(r)
    before, after = _unet(run / "checkpoints" / "step_0000001.ckpt"), _unet(run / "checkpoints" / "step_0000002.ckpt")
    assert all(torch.equal(before[k], after[k]) for k in before), "the skipped step left the weights alone"
    with open(next((run / "csv").rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    assert any(row.get("train/nonfinite_steps") == "1.0" for row in rows), "counted and logged"
    assert all(torch.isfinite(v).all() for v in _unet(run / "checkpoints" / "last.ckpt").values())

    run = tmp_path / "diverged"
    r = train(run, overrides, *inject("PoisonGradients", steps=[3, 4, 5], value="inf"))
    assert r.returncode == 3, tail(r)
    assert "3 steps in a row had non-finite gradients" in r.stderr and "ckpt_path=last" in r.stderr, tail(r)
    good, last = _unet(run / "checkpoints" / "step_0000002.ckpt"), _unet(run / "checkpoints" / "last.ckpt")
    assert all(torch.equal(good[k], last[k]) for k in good), "last.ckpt holds the last good weights"


def _adversarial_autoencoder_run(tmp_path, max_consecutive: int, steps: int):
    """A tiny autoencoder in its adversarial phase from step 0, with a guard and an in-process Trainer."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from tests.conftest import ROOT

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=mini/autoencoder", "model.autoencoder.block_out_channels=[8,8]",
                                          "model.autoencoder.norm_num_groups=4", "model.loss.disc_start=0",
                                          "model.loss.disc_width=8", "model.export_on_fit_end=false"])  # fmt: skip
    guard = NumericalGuard(max_consecutive=max_consecutive)
    trainer = L.Trainer(max_steps=steps, callbacks=[guard], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path)  # fmt: skip
    return instantiate(cfg.model), guard, trainer


def _batches(n: int) -> DataLoader:
    from tests.conftest import haystack_batch

    return DataLoader([haystack_batch(n=4, resolution=16)] * n, batch_size=None)


def test_the_autoencoder_discriminator_step_is_guarded_too(tmp_path):
    """The adversarial phase steps the discriminator's optimizer directly; its non-finite steps are skipped."""
    module, guard, trainer = _adversarial_autoencoder_run(tmp_path, max_consecutive=10, steps=2)
    disc = list(module.loss.discriminator.parameters())
    disc[0].register_hook(lambda g: torch.full_like(g, float("nan")))  # every discriminator gradient is NaN
    before = [p.detach().clone() for p in disc]
    trainer.fit(module, train_dataloaders=_batches(2))
    assert guard.skipped == 2 and all(torch.equal(a, p) for a, p in zip(before, disc, strict=True))
    assert trainer.global_step == 2, "the autoencoder's own steps went on"


def test_a_diverged_generator_stops_the_run_though_the_discriminator_steps_fine(tmp_path):
    """Each optimizer counts its own run of bad steps: the discriminator's good ones do not hide the generator's."""
    from emu.training.numerics import NumericalFault

    module, guard, trainer = _adversarial_autoencoder_run(tmp_path, max_consecutive=3, steps=10)
    conv = module.autoencoder.decoder.conv_out.weight
    conv.register_hook(lambda g: torch.full_like(g, float("nan")))  # every generator step is NaN
    with pytest.raises(NumericalFault, match="3 steps in a row of optimizer 0"):
        trainer.fit(module, train_dataloaders=_batches(10))
    assert (tmp_path / "last.ckpt").is_file() and guard.consecutive["discriminator"] == 0

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


def test_the_autoencoder_discriminator_step_is_guarded_too(tiny_autoencoder):
    """The adversarial phase steps the discriminator's optimizer directly; its non-finite steps are skipped."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from tests.conftest import ROOT, haystack_batch

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=mini/autoencoder", "model.autoencoder.block_out_channels=[8,8]",
                                          "model.autoencoder.norm_num_groups=4", "model.loss.disc_start=0",
                                          "model.loss.disc_width=8", "model.export_on_fit_end=false"])  # fmt: skip
    module = instantiate(cfg.model)
    disc = list(module.loss.discriminator.parameters())
    disc[0].register_hook(lambda g: torch.full_like(g, float("nan")))  # every discriminator gradient is NaN
    batch = haystack_batch(n=4, resolution=16)
    guard = NumericalGuard(max_consecutive=10)
    trainer = L.Trainer(max_steps=2, callbacks=[guard], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    before = [p.detach().clone() for p in disc]
    trainer.fit(module, train_dataloaders=DataLoader([batch, batch], batch_size=None))
    assert guard.skipped == 2 and all(torch.equal(a, p) for a, p in zip(before, disc, strict=True))
    assert trainer.global_step == 2, "the autoencoder's own steps went on"


def test_a_diverged_generator_stops_the_run_though_the_discriminator_steps_fine(tmp_path):
    """Each optimizer counts its own run of bad steps: the discriminator's good ones do not hide the generator's."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from emu.training.numerics import NumericalFault
    from tests.conftest import ROOT, haystack_batch

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=mini/autoencoder", "model.autoencoder.block_out_channels=[8,8]",
                                          "model.autoencoder.norm_num_groups=4", "model.loss.disc_start=0",
                                          "model.loss.disc_width=8", "model.export_on_fit_end=false"])  # fmt: skip
    module = instantiate(cfg.model)
    conv = module.autoencoder.decoder.conv_out.weight
    conv.register_hook(lambda g: torch.full_like(g, float("nan")))  # every generator step is NaN
    batch = haystack_batch(n=4, resolution=16)
    guard = NumericalGuard(max_consecutive=3)
    trainer = L.Trainer(max_steps=10, callbacks=[guard], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path)  # fmt: skip
    with pytest.raises(NumericalFault, match="3 steps in a row of optimizer 0"):
        trainer.fit(module, train_dataloaders=DataLoader([batch] * 10, batch_size=None))
    assert (tmp_path / "last.ckpt").is_file() and guard.consecutive["discriminator"] == 0

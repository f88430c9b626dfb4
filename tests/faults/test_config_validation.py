"""Config validation: unknown keys and mismatches between stages are caught before any work starts, with a message
that names the keys and the fix."""

import pytest
from hydra import compose, initialize_config_dir

from emu.errors import ConfigError
from emu.utils.validate import validate
from tests.conftest import ROOT, tiny_stage1_overrides
from tests.faults.common import stage_overrides, tail, train


def _cfg(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides)


@pytest.fixture
def stage1(tiny_autoencoder, tiny_clip, tiny_t5):
    return [
        "experiment=mini/stage1_pretrain",
        "data.resolution=32",
        *tiny_stage1_overrides(tiny_autoencoder, tiny_clip, tiny_t5),
    ]


@pytest.mark.parametrize(
    "override, keys, fix",
    [
        ("+model.lrr=1e-3", "model.lrr", "did you mean model.lr?"),
        ("+model.unet.block_chanels=[8,8]", "model.unet.block_chanels", "did you mean model.unet.block_channels?"),
        ("+data.source.n_trian=8", "data.source.n_trian", "did you mean data.source.n_train?"),
        ("+trainer.max_step=3", "trainer.max_step", "did you mean trainer.max_steps?"),
        ("+model.val_sampling.sigmas=karras", "model.val_sampling.sigmas", "is now called 'spacing'"),
        ("model.unet.in_channels=4", "model.unet.in_channels", "has 16 latent channels; set model.unet.in_channels=16"),
        ("data.resolution=40", "data.resolution", "not a positive multiple of 16 (autoencoder f=8 x U-Net 2x); try 32"),
        ("model.unet.pooled_dim=99", "model.unet.pooled_dim", "projects to 24; set model.unet.pooled_dim=24"),
        ("model.autoencoder=/nowhere", "model.autoencoder", "neither an autoencoder export folder"),
    ],
)
def test_mismatches_and_unknown_keys_are_named_with_their_fix(stage1, override, keys, fix):
    validate(_cfg(stage1))  # the consistent config passes
    with pytest.raises(ConfigError) as e:
        validate(_cfg([*stage1, override]))
    assert e.value.key == keys and fix in str(e.value)


def test_init_from_a_checkpoint_of_another_unet_is_refused(stage1, tiny_stage1_checkpoint):
    validate(_cfg([*stage1, f"model.init_from={tiny_stage1_checkpoint}"]))
    with pytest.raises(ConfigError, match=r"model\.unet\.block_channels is \[32, 64\] but model\.init_from's U-Net"):
        validate(_cfg([*stage1, f"model.init_from={tiny_stage1_checkpoint}", "model.unet.block_channels=[32,64]"]))


def test_train_py_stops_before_building_anything(tmp_path, tiny_autoencoder, tiny_clip, tiny_t5):
    tiny = (tiny_autoencoder, tiny_clip, tiny_t5)
    r = train(tmp_path / "run", [*stage_overrides("stage1", tiny), "model.unet.in_channels=4", "+model.lrr=1"])
    assert r.returncode == 2, tail(r)
    assert "config error: model.lrr, model.unet.in_channels: 2 problem(s)" in r.stderr, tail(r)
    assert "model: emu.diffusion" not in r.stdout + r.stderr, "nothing was instantiated"

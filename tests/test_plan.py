"""The memory plan (``python -m emu.plan``): the parts it adds up, DDP against FSDP, its JSON line, the activation
estimate against a measured CPU run, and train.py refusing a run that cannot fit."""

from __future__ import annotations

import json

import pytest

from emu.errors import ConfigError
from emu.plan import GIB, check_fits, check_on_cpu, compose_train, layout, main, plan_config, unet_activations
from tests.test_train import run_train

PAPER_UNET_PARAMS = 2_856_107_152  # conf/model/unet/emu_2p8b.yaml


def test_layout_counts_ranks_and_shards():
    def lay(*o):
        return layout(compose_train(list(o)).trainer)

    assert lay("trainer=gpu")["strategy"] == "single device"
    ddp = lay("trainer=ddp", "trainer.devices=8", "trainer.num_nodes=2")
    assert (ddp["strategy"], ddp["ranks"], ddp["shard"]) == ("ddp", 16, 1)
    full = lay("trainer=fsdp", "trainer.devices=8", "trainer.num_nodes=4")
    assert (full["strategy"], full["ranks"], full["shard"]) == ("fsdp", 32, 32)
    hybrid = lay("trainer=fsdp", "trainer.devices=8", "trainer.num_nodes=4", "trainer.strategy.sharding=hybrid")
    assert hybrid["shard"] == 8
    assert lay("trainer=fsdp")["ranks"] == 8  # devices: auto is planned as 8 a node, with a note


def test_paper_stage1_plan_adds_up_its_parts():
    """The 2.8B U-Net's states are 4 + 4 + 8 + 4 bytes a parameter on one GPU (T5-XXL in bf16 beside them), and
    FSDP over 32 ranks divides exactly those by 32 while the frozen encoders stay whole."""
    one = plan_config(compose_train(["experiment=stage1_pretrain", "trainer=gpu", "trainer.devices=1",
                                     "trainer.num_nodes=1"]))  # fmt: skip
    trained = one.setup["trained_params"]
    assert PAPER_UNET_PARAMS < trained < PAPER_UNET_PARAMS * 1.01  # + the text projections
    assert one.train["weights (float32)"] == one.train["gradients (float32)"] == 4 * trained
    assert one.train["AdamW moments"] == 8 * trained and one.train["EMA copy"] == 4 * trained
    assert one.train["autocast bf16 weight copies"] == 2 * trained
    assert 9.0 * GIB < one.train["text encoders (frozen)"] < 9.5 * GIB  # T5-XXL + CLIP-L in bf16
    assert one.validation["EMA swap (live weights kept)"] == 4 * trained
    assert one.peak > 70 * GIB  # no room left on an 80 GB card
    sharded = plan_config(compose_train(["experiment=stage1_pretrain"]))  # its default: FSDP, 4 nodes of 8
    assert sharded.setup["strategy"] == "fsdp" and sharded.setup["ranks"] == 32
    assert sharded.train["AdamW moments"] == pytest.approx(8 * trained / 32)
    assert sharded.train["text encoders (frozen)"] == one.train["text encoders (frozen)"]
    assert "autocast bf16 weight copies" not in sharded.train  # FSDP computes in bf16 parameters
    assert sharded.peak < one.peak / 2


def test_activations_grow_with_the_batch_and_checkpointing_cuts_them():
    from tests.conftest import TINY_UNET

    cfg = dict(TINY_UNET, linear_projection=True)
    full = unet_activations(cfg, 4, (16, 16), 8, amp=False, checkpointing=False)["activations (saved for backward)"]
    double = unet_activations(cfg, 8, (16, 16), 8, amp=False, checkpointing=False)["activations (saved for backward)"]
    assert 1.8 < double / full < 2.05
    ckpt = sum(unet_activations(cfg, 4, (16, 16), 8, amp=False, checkpointing=True).values())
    assert ckpt < 0.8 * full
    half = unet_activations(cfg, 4, (16, 16), 8, amp=True, checkpointing=False)["activations (saved for backward)"]
    assert 0.4 < half / full < 0.8  # bf16 activations (norms and softmax stay float32)


def test_activation_estimate_is_close_to_a_measured_cpu_run():
    check = check_on_cpu()
    assert abs(check["difference_pct"]) < 30, check


def test_json_line_and_exit_status(capsys):
    assert main(["experiment=stage2_quality_tune", "--json"]) == 0
    line = capsys.readouterr().out.strip().splitlines()
    assert len(line) == 1
    out = json.loads(line[0])
    assert isinstance(out["per_rank_gib"], float) and out["fits"] is True and out["strategy"] == "fsdp"
    assert main(["experiment=stage2_quality_tune", "--gpu-gib", "16"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_train_refuses_a_run_that_cannot_fit(tmp_path, tiny_autoencoder):
    over = ["experiment=stage1_pretrain", "data.source.shards='/x/{0..1}.tar'", f"model.autoencoder={tiny_autoencoder}",
            "trainer=gpu", "trainer.devices=1", "trainer.num_nodes=1", "plan.gpu_gib=40"]  # fmt: skip
    with pytest.raises(ConfigError, match="does not fit its GPUs"):
        check_fits(compose_train(over))
    assert check_fits(compose_train([*over, "plan.enforce=false"])) is None
    out = run_train(*over, f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "config error: plan: this run does not fit its GPUs" in out.stderr
    assert "memory plan: DiffusionModule on 1 rank(s)" in out.stderr and "AdamW moments" in out.stderr

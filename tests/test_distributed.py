"""Strategies: DDP over 2 CPU processes (gloo) keeps the ranks' weights equal; the FSDP config composes, and FSDP2
over 2 CPU processes trains, shards the EMA with the weights, and saves and resumes its sharded checkpoint."""

import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from tests.conftest import ROOT, tiny_stage1_overrides


def _train(tmp_path, name, tiny, extra, timeout=600):
    out = tmp_path / name
    cmd = [sys.executable, "train.py", "experiment=mini/stage1_pretrain", f"paths.output_dir={out}",
           f"hydra.run.dir={out}", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
           "data.batch_size=4", "data.num_workers=0", "data.source.n_train=32", "data.resolution=32",
           "trainer.limit_val_batches=0", "model.val_prompts=null", "logger=csv", "callbacks.progress_bar=null",
           "+callbacks.dump._target_=tests.dist_helpers.DumpWeights", f"+callbacks.dump.out={out}/weights",
           *tiny_stage1_overrides(*tiny), *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, [torch.load(out / "weights" / f"rank{i}.pt") for i in range(2)]


@pytest.fixture
def tiny(tiny_autoencoder, tiny_clip, tiny_t5):
    return tiny_autoencoder, tiny_clip, tiny_t5


def test_ddp_two_cpu_processes_agree_on_weights_and_draw_different_noise(tmp_path, tiny):
    out, (r0, r1) = _train(tmp_path, "ddp", tiny, ["trainer=ddp", "trainer.max_steps=2"])
    assert r0["step"] == r1["step"] == 2
    s0, s1 = (torch.load(out / "weights" / f"start_rank{i}.pt") for i in range(2))
    assert not torch.equal(s0["rng"], s1["rng"]), "both ranks would draw the same noise for different images"
    assert r0["weights"].keys() == r1["weights"].keys()
    for k, v in r0["weights"].items():
        assert torch.equal(v, r1["weights"][k]), k


def test_fsdp_config_composes_with_the_paper_stage():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=stage1_pretrain", "trainer=fsdp", "trainer.num_nodes=4",
                                          "trainer.strategy.sharding=hybrid"])  # fmt: skip
    assert cfg.trainer.strategy._target_ == "emu.training.distributed.FSDPStrategy"
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.num_nodes == 4
    assert cfg.model.unet.block_channels == [384, 768, 1536]  # the 2.8B U-Net
    from hydra.utils import instantiate

    strategy = instantiate(cfg.trainer.strategy)
    assert strategy.sharding == "hybrid" and strategy.activation_checkpointing and strategy.param_dtype == "bfloat16"


@pytest.mark.slow
def test_fsdp_two_cpu_processes_train_and_resume_a_sharded_checkpoint(tmp_path, tiny):
    fsdp = ["trainer=fsdp", "trainer.strategy.param_dtype=float32", "trainer.strategy.activation_checkpointing=true"]
    first, (a0, a1) = _train(tmp_path, "first", tiny, [*fsdp, "trainer.max_steps=2"])
    for k, v in a0["weights"].items():  # gathered: both ranks see the same full weights
        assert torch.equal(v, a1["weights"][k]), k
    assert any(not torch.equal(v, a0["weights"][f"ema.shadow.{k}"]) for k, v in a0["weights"].items()
               if not k.startswith("ema.")), "the sharded EMA moved away from the live weights"  # fmt: skip
    ckpt = first / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir() and len(list(ckpt.glob("*.distcp"))) == 2, "a sharded checkpoint: one file per rank"
    assert not list(ckpt.parent.glob("*.partial")) + list(ckpt.parent.glob("*.old")), "written aside, then moved"

    resumed, (b0, _) = _train(tmp_path, "resumed", tiny, [*fsdp, "trainer.max_steps=3", f"ckpt_path={ckpt}"])
    start = torch.load(resumed / "weights" / "start_rank0.pt")
    assert start["step"] == 2 and b0["step"] == 3
    for k, v in a0["weights"].items():  # weights and EMA come back exactly from the shards
        assert torch.equal(start["weights"][k], v), k
    assert not torch.equal(b0["weights"]["unet.conv_in.weight"], a0["weights"]["unet.conv_in.weight"])

    # one file from the shards, loadable for sampling like any stage-1 checkpoint
    single = tmp_path / "consolidated.ckpt"
    subprocess.run([sys.executable, "-m", "emu.training.distributed", "consolidate", str(ckpt), "--out", str(single)],
                   check=True, capture_output=True, cwd=ROOT)  # fmt: skip
    from emu.diffusion.checkpoints import load_for_sampling

    module = load_for_sampling(single, ema=False)
    assert torch.equal(module.unet.conv_in.weight, a0["weights"]["unet.conv_in.weight"])


@pytest.mark.parametrize("variant", [
    pytest.param(["--strategy", "ddp"], id="ddp"),
    pytest.param(["--strategy", "fsdp"], id="fsdp", marks=pytest.mark.slow),
    pytest.param(["--strategy", "ddp", "--manual"], id="ddp-manual-optimization", marks=pytest.mark.slow),
])  # fmt: skip
def test_two_ranks_skip_batches_with_no_good_sample_in_step(tmp_path, variant):
    """Batch size 1 on 2 CPU ranks over a folder of good and bad files: a rank whose batch is empty trains its
    stand-in at weight 0 while the other trains; when both are empty the step leaves weights and momentum alone. The
    run ends (no rank waits forever), both ranks take the same steps, every good file is trained on once, and every
    update is that of the mean over the step's good samples of both ranks (tests/good_samples_run.py)."""
    from tests.conftest import png_bytes, rgb_image
    from tests.good_samples_run import replay

    root = tmp_path / "folder"
    root.mkdir()
    for i in range(24):
        data = b"not an image" if i % 2 else png_bytes(rgb_image(16, 16, seed=i))
        (root / f"f{i:02d}.png").write_bytes(data)
        (root / f"f{i:02d}.txt").write_text(f"caption {i}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "tests.good_samples_run", str(root), str(tmp_path / "out"), "--devices", "2", *variant]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ranks = [torch.load(tmp_path / "out" / f"rank{i}.pt", weights_only=False) for i in range(2)]
    kinds = replay([rank["records"] for rank in ranks])
    assert kinds[0] and kinds[1] and kinds[2], f"the seed gives steps with 0, 1 and 2 ranks holding data: {kinds}"
    assert ranks[0]["global_step"] == ranks[1]["global_step"]
    keys = [k for rank in ranks for rec in rank["records"] for k in rec["keys"]]
    assert sorted(keys) == [f"f{i:02d}.png" for i in range(0, 24, 2)]  # each good file once
    assert sum(rank["empty_batches"] for rank in ranks) == kinds[1] + 2 * kinds[0]


def test_slurm_launcher_config_composes_for_a_multi_node_sweep():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "experiment=stage1_pretrain", "trainer=fsdp",
                                          "trainer.num_nodes=4"], return_hydra_config=True)  # fmt: skip
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.nodes == 4 and launcher.tasks_per_node == launcher.gpus_per_node == 8
    assert launcher.signal_delay_s > 0

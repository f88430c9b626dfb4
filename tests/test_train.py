"""The entry point: every experiment composes and runs; config errors are one clear line; sweeps work."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from emu.data.samples import SamplePreparer, collate
from emu.errors import ConfigError
from emu.mini.source import HaystackSource
from emu.utils.config import check_required, experiments
from tests.conftest import ROOT, arch_of, expected_skips, tiny_stage1_overrides

EXPERIMENTS = experiments(ROOT / "conf", "train")


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides)


def run_train(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_there_are_experiments():
    assert {"mini/judge", "mini/autoencoder", "mini/autoencoder_4ch", "autoencoder"} <= set(EXPERIMENTS)
    assert experiments(ROOT / "conf", "eval") == ["mini/eval"] and experiments(ROOT / "conf", "curate") == [
        "mini/curate"
    ]
    assert not {"mini/eval", "mini/curate"} & set(EXPERIMENTS)
    assert not [e for e in EXPERIMENTS if "common/" in e]  # what the stages share (common/) is not an experiment


@pytest.mark.parametrize("entry, config, needs", [
    ("train", "train", r"experiment: train.py trains what an experiment names: experiment=<one of: .*mini/judge"),
    ("eval", "eval", r"^a: required value not set"),
    ("sample", "sample", r"^ckpt: required value not set"),
    ("curate", "curate", r"clip, data\.source\.shards, stages\.aesthetic\.head, stages\.balance\.concepts"),
])  # fmt: skip
def test_bare_entry_points_say_what_they_need_and_run_nothing_of_the_miniature(entry, config, needs, tmp_path):
    """Bare ``python train.py`` (eval.py, sample.py, curate.py) stops with what it needs, before building anything:
    none of them trains, curates or grades the miniature unasked."""
    import importlib

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config, overrides=[f"paths.output_dir={tmp_path}"] + ([f"out={tmp_path}"] * (entry != "train")))
    assert "haystack" not in OmegaConf.to_yaml(cfg) and "emu.mini" not in OmegaConf.to_yaml(cfg)
    run = {"train": "train", "eval": "run", "sample": "run", "curate": "run"}[entry]
    with pytest.raises(ConfigError, match=needs):
        getattr(importlib.import_module(entry), run)(cfg)
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes(experiment, tmp_path):
    cfg = compose_train([f"experiment={experiment}", f"paths.output_dir={tmp_path}"])
    assert cfg.data.source._target_ and cfg.model._target_ and cfg.trainer._target_
    if not experiment.startswith("mini/"):  # paper scale: real data is the one thing it asks for
        with pytest.raises(ConfigError, match=r"data\.source\.(shards|root)[\w., ]*: required value not set"):
            check_required(cfg)


# make generality's stage-2 arms start from their own stage 1: tests/test_architectures.py runs each arm's chain
# mini/common/ holds what the stage files share (they run here)
@pytest.mark.parametrize("experiment", [e for e in EXPERIMENTS if e.startswith("mini/") and "/common/" not in e
                                        and not (e.startswith("mini/stage2") and arch_of(e) != "unet")])  # fmt: skip
def test_mini_experiment_survives_fast_dev_run(experiment, tmp_path, request):
    import train

    extra = []
    if "stage" in experiment:  # the demo's encoders, autoencoder and runs do not exist in CI: use tiny ones
        extra = tiny_stage1_overrides(
            *(request.getfixturevalue(f) for f in ("tiny_autoencoder", "tiny_clip", "tiny_t5")),
            arch=arch_of(experiment),
            tokenizer=request.getfixturevalue("tiny_tokenizer") if arch_of(experiment) == "maskgit" else None,
        )
    if experiment == "mini/tokenizer":
        extra = [f"model.autoencoder={request.getfixturevalue('tiny_autoencoder')}"]
    if "stage2" in experiment:
        ckpt, folder = request.getfixturevalue("tiny_stage1_checkpoint"), request.getfixturevalue("tiny_curated")
        if experiment.endswith(("_dpo", "_kto")):  # preference pairs, or images labelled desirable or not
            folder = request.getfixturevalue("tiny_preference_data")["pairs" if "dpo" in experiment else "likes"]
        extra += [f"model.init_from={ckpt}", f"data.source.root={folder}", "data.source.val_fraction=0.25",
                  f"callbacks.selection.judge.clip={request.getfixturevalue('tiny_clip')}",
                  f"callbacks.selection.judge.head={request.getfixturevalue('aesthetic_head')}",
                  "callbacks.selection.limit=2", "callbacks.selection.sampling.steps=2"]  # fmt: skip
    cfg = compose_train([f"experiment={experiment}", "debug=fast_dev_run", f"paths.output_dir={tmp_path}", *extra])
    metrics = train.train(cfg)
    assert "train/loss" in metrics and torch.isfinite(torch.tensor(metrics["train/loss"]))


@pytest.mark.parametrize(
    "group,options",
    [
        ("trainer", ["cpu", "gpu", "ddp", "fsdp"]),
        ("logger", ["csv", "tensorboard", "wandb"]),
        ("data", ["haystack", "folder", "webdataset"]),
    ],
)
def test_every_group_option_composes(group, options):
    for option in options:
        cfg = compose_train([f"{group}={option}"])
        assert cfg[group]


def test_missing_required_value_is_one_clear_line(tmp_path):
    out = run_train("data=webdataset", "model=autoencoder", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "config error: data.source.shards: required value not set: add it to the command line; "
        "e.g. data.source.shards='/data/laion/{00000..00999}.tar'"
    ]


def test_bad_path_and_unknown_experiment(tmp_path):
    out = run_train(
        "data=folder",
        "model=autoencoder",
        f"data.source.root={tmp_path}/nowhere",
        f"hydra.run.dir={tmp_path}/run",
        cwd=tmp_path,
    )
    assert out.returncode == 2 and "config error: data.source.root:" in out.stderr and "not a directory" in out.stderr
    assert "Traceback" not in out.stderr
    out = run_train("experiment=no_such_experiment", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "config error: experiment=no_such_experiment: no train.py experiment conf/experiment/no_such_experiment.yaml; "
        f"available: {', '.join(EXPERIMENTS)}"
    ]


def test_training_on_the_bad_corpus_skips_counts_and_finishes(bad_folder, tmp_path):
    run = tmp_path / "run"
    out = run_train(
        "data=folder",
        "model=judge",  # the miniature's pixel judge: a small model that trains on any captioned folder
        f"data.source.root={bad_folder}",
        "data.source.val_fraction=0",
        "data.min_size=16",
        # dropped bad samples can leave a batch of one: BatchNorm refuses it where the judge's last map is 1x1 (32 px)
        "data.resolution=64",
        "data.batch_size=3",
        "data.drop_last=false",
        "trainer.max_epochs=1",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    expected = ", ".join(f"{k} {v}" for k, v in sorted(expected_skips().items()))
    assert f"train: {sum(expected_skips().values())} skipped ({expected})" in out.stdout
    with open(run / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [float(r["data/skipped/train"]) for r in rows if r.get("data/skipped/train")]
    assert logged and logged[-1] == sum(expected_skips().values())
    assert (run / "checkpoints" / "last.ckpt").exists()


def test_two_job_multirun(tmp_path):
    sweep = tmp_path / "sweep"
    out = run_train(
        "-m", "experiment=mini/judge", "debug=fast_dev_run", "seed=0,1", f"hydra.sweep.dir={sweep}", cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for job, seed in (("0", 0), ("1", 1)):
        config = (sweep / job / ".hydra" / "config.yaml").read_text()
        assert f"seed: {seed}\n" in config
    assert out.stdout.count("finished at step 1") == 2


def test_judge_overfits_a_batch():
    from emu.mini.judge import HaystackJudge

    torch.manual_seed(0)
    source, prepare = HaystackSource(n_train=8, n_val=0, resolution=64), SamplePreparer(resolution=64)
    batch = collate([prepare(source.raw("train", i)) for i in range(8)])
    model = HaystackJudge(backbone="resnet10t")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(40):
        loss, _, _ = model._losses(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses

"""A CPU rehearsal of every paper-scale experiment (``slow``): stage 0, stage 1 at 256 / 512 / 1024 and stage 2, each
composed from its experiment file as it is, with only widths, depths, encoders and length shrunk by one override group
(``+rehearsal=cpu``, ``+rehearsal=cpu_autoencoder``: conf/rehearsal/). Each runs as 2 CPU processes (FSDP on gloo for
stages 1 and 2, DDP for stage 0, which refuses FSDP) in the experiment's own precision, is killed (SIGKILL, every rank)
after its step-2 checkpoint and resumed from it with ``ckpt_path=last``, logs a sample grid, and hands its checkpoint to
the next stage as the paper's chain does: stage 0's export is stage 1's autoencoder, each resolution initialises the
next from its sharded ``last.ckpt``, stage 2 starts from 1024's and stops by its patience rule.

    make rehearsal        # = pytest -m slow tests/test_rehearsal.py
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, save_clip, save_t5, write_shards

pytestmark = pytest.mark.slow
TRAIN, VAL = 32, 16  # images, rendered at 256 px and enlarged to 1024: every stage's min_size keeps them; 4 a shard,
# so that each of the 2 ranks reads val shards of its own (a rank without validation data would wait for the other)


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """rehearsal.dir (tiny CLIP, T5, aesthetic head; the autoencoder comes from stage 0), 1024 px shards and a curated
    folder; the stages' outputs are added as they run."""
    from PIL import Image

    from emu.curation.aesthetic import train_head
    from emu.mini import haystack
    from emu.mini.aesthetic import haystack_ratings
    from emu.text.clip import ClipEmbedder

    root = tmp_path_factory.mktemp("rehearsal")
    models = root / "models"
    save_clip(models / "clip")
    save_t5(models / "t5")
    emb, ratings = haystack_ratings(ClipEmbedder(models / "clip"), 64, seed=1, resolution=32)
    train_head(emb, ratings, epochs=2)[0].save(models / "aesthetic_head.safetensors")
    samples, curated, rows = [], root / "curated", []
    curated.mkdir()
    for i in range(TRAIN + VAL):
        image, meta = haystack.make_sample(0, i, 256)
        image = image.resize((1024, 1024), Image.BICUBIC)
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=90)
        samples.append({"__key__": meta["key"], "jpg": buf.getvalue(), "txt": meta["caption"]})
        if i < 12:
            image.save(curated / f"{meta['key']}.png")
            rows.append(json.dumps({"file_name": f"{meta['key']}.png", "text": meta["caption"]}))
    (curated / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    data = [
        f"data.source.shards='{write_shards(root / 'train', samples[:TRAIN], per_shard=4)}'",
        f"data.source.val_shards='{write_shards(root / 'val', samples[TRAIN:], per_shard=4)}'",
    ]
    return {"root": root, "models": models, "data": data, "curated": curated}


def _run(out: Path, overrides: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "train.py", *overrides, f"paths.output_dir={out}", f"hydra.run.dir={out}", "logger=csv"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env,
                          start_new_session=True)  # fmt: skip  # its own process group: KillAt kills every rank


def _killed_and_resumed(out: Path, overrides: list[str], last_step: int) -> None:
    """Run to the step-2 checkpoint and SIGKILL every rank; resume with ckpt_path=last to the end."""
    killed = _run(out, [*overrides, "+callbacks.kill._target_=tests.dist_helpers.KillAt", "+callbacks.kill.step=2"])
    assert killed.returncode == -9, killed.stdout[-3000:] + killed.stderr[-3000:]
    last = out / "checkpoints" / "last.ckpt"
    assert last.exists(), "the step-2 checkpoint is on disk"
    resumed = _run(out, [*overrides, "ckpt_path=last"])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "Restored all states from the checkpoint" in resumed.stdout + resumed.stderr
    saved = torch.load(last / "meta.pt" if last.is_dir() else last, map_location="cpu", weights_only=False)
    assert saved["global_step"] == last_step, f"last.ckpt is at step {saved['global_step']}"


def _grid(out: Path, name: str) -> Path:
    grids = sorted(out.glob(f"csv/**/images/{name}_step*.png"))
    assert grids, f"no {name} grid logged under {out}"
    return grids[-1]


def test_every_paper_experiment_rehearses_on_two_cpu_processes(rehearsal):
    root, models, data = rehearsal["root"], rehearsal["models"], rehearsal["data"]
    common = [f"rehearsal.dir={models}"]

    # stage 0: the paper autoencoder config; its export becomes stage 1's autoencoder
    ae = root / "autoencoder"
    _killed_and_resumed(ae, ["experiment=autoencoder", "+rehearsal=cpu_autoencoder", *common, *data], last_step=4)
    _grid(ae, "val_inputs_over_reconstructions")
    export = json.loads((ae / "export" / "config.json").read_text())
    assert export["latent_statistics"]["step"] == 4 and export["latent_statistics"]["images"] > 0
    shutil.copytree(ae / "export", models / "autoencoder")

    # stage 1 at 256, 512 and 1024, each initialised from the one before it (a sharded checkpoint folder)
    previous = None
    for experiment in ("stage1_pretrain", "stage1_pretrain_512", "stage1_pretrain_1024"):
        out = root / experiment
        init = [f"model.init_from={previous}"] if previous else []
        _killed_and_resumed(out, [f"experiment={experiment}", "+rehearsal=cpu", *common, *data, *init], last_step=4)
        _grid(out, "val_samples")
        last = out / "checkpoints" / "last.ckpt"
        assert last.is_dir() and len(list(last.glob("*.distcp"))) == 2, "FSDP: one shard file per rank"
        previous = last

    # stage 2: from 1024's checkpoint, selection every 2 steps, stopped by its patience rule, EMA-only weights kept
    out = root / "stage2"
    _killed_and_resumed(out, ["experiment=stage2_quality_tune", "+rehearsal=cpu", *common,
                              f"data.source.root={rehearsal['curated']}", f"model.init_from={previous}",
                              "trainer.max_steps=12"], last_step=4)  # fmt: skip
    select = out / "checkpoints" / "select"
    summary = json.loads((select / "selection.json").read_text())
    assert summary["stopped"] and summary["stopped"].startswith("step 4: appeal has not improved"), summary["stopped"]
    assert [r["step"] for r in summary["rows"]] == [0, 2, 4]
    assert summary["keep"] == "ema" and (select / "best" / "model.safetensors").is_file()
    _grid(out, "select_samples")
    from emu.diffusion.checkpoints import load_diffusion

    model = load_diffusion(select / "best")
    assert model.exported_weights == "ema" and torch.isfinite(next(model.unet.parameters())).all()

    # stage 2 by Diffusion-DPO: from 1024's checkpoint on pairs of the curated images in Pick-a-Pic's layout (each image
    # preferred to the next), its reference a second sharded copy; 2 micro-batches a step, not the config's 64
    rows = [json.loads(line) for line in (rehearsal["curated"] / "metadata.jsonl").read_text().splitlines()]
    pairs = root / "pairs"
    pairs.mkdir()
    (pairs / "pairs.jsonl").write_text("".join(json.dumps(
        {"caption": a["text"], "jpg_0": str(rehearsal["curated"] / a["file_name"]),
         "jpg_1": str(rehearsal["curated"] / b["file_name"]), "label_0": 1}) + "\n"
        for a, b in zip(rows[0::2], rows[1::2], strict=True)))  # fmt: skip
    out = root / "stage2_dpo"
    _killed_and_resumed(out, ["experiment=stage2_dpo", "+rehearsal=cpu", *common, f"data.source.root={pairs}",
                              f"model.init_from={previous}", "trainer.max_steps=12",
                              "trainer.accumulate_grad_batches=2"], last_step=4)  # fmt: skip
    summary = json.loads((out / "checkpoints" / "select" / "selection.json").read_text())
    assert [r["step"] for r in summary["rows"]] == [0, 2, 4] and summary["keep"] == "ema"
    logged = (next(out.glob("csv/**/metrics.csv"))).read_text()
    assert "train/accuracy" in logged and "train/logits" in logged
    assert load_diffusion(out / "checkpoints" / "select" / "best").hparams.objective == "dpo"


@pytest.mark.parametrize("experiment, rehearse", [("stage1_dit", "cpu_dit"), ("stage1_pixel", "cpu_pixel")])
def test_other_architectures_rehearse_on_two_cpu_processes(rehearsal, experiment, rehearse):
    """experiment=stage1_dit (the DiT by rectified flow) and stage1_pixel (pixel space) as written, networks shrunk:
    FSDP over 2 CPU processes with activation checkpointing, killed after step 2 and resumed, a sample grid logged."""
    from tests.conftest import save_tiny_autoencoder

    root, models, data = rehearsal["root"], rehearsal["models"], rehearsal["data"]
    if not (models / "autoencoder").exists():  # stage 0's export when the chain above ran first; else a tiny one
        save_tiny_autoencoder(models / "autoencoder")
    out = root / experiment
    _killed_and_resumed(out, [f"experiment={experiment}", f"+rehearsal={rehearse}", f"rehearsal.dir={models}", *data],
                        last_step=4)  # fmt: skip
    _grid(out, "val_samples")
    last = out / "checkpoints" / "last.ckpt"
    assert last.is_dir() and len(list(last.glob("*.distcp"))) == 2, "FSDP: one shard file per rank"


def test_the_masked_transformer_rehearses_its_tokenizer_then_stage1_on_two_cpu_processes(rehearsal):
    """experiment=tokenizer (DDP) and then experiment=stage1_maskgit over its checkpoint (FSDP with activation
    checkpointing) as written, networks shrunk: each killed after step 2 and resumed; the transformer logs its sample
    grid, and its sharded checkpoint, consolidated, samples."""
    from emu.diffusion.pipeline import SamplingSettings
    from emu.maskgit.module import load_text_to_image
    from emu.training.distributed import consolidate
    from tests.conftest import save_tiny_autoencoder

    root, models, data = rehearsal["root"], rehearsal["models"], rehearsal["data"]
    if not (models / "autoencoder").exists():  # stage 0's export when the chain above ran first; else a tiny one
        save_tiny_autoencoder(models / "autoencoder")
    common = [f"rehearsal.dir={models}", *data]
    tokenizer = root / "tokenizer"
    _killed_and_resumed(tokenizer, ["experiment=tokenizer", "+rehearsal=cpu_tokenizer", *common], last_step=4)
    shutil.copy(tokenizer / "checkpoints" / "last.ckpt", models / "tokenizer.ckpt")
    out = root / "stage1_maskgit"
    _killed_and_resumed(out, ["experiment=stage1_maskgit", "+rehearsal=cpu_maskgit", *common], last_step=4)
    _grid(out, "val_samples")
    last = out / "checkpoints" / "last.ckpt"
    assert last.is_dir() and len(list(last.glob("*.distcp"))) == 2, "FSDP: one shard file per rank"
    model = load_text_to_image(consolidate(last))
    images = model.sample(["a red circle"], [0], SamplingSettings(sampler="maskgit", steps=2))
    assert images.shape == (1, 3, 256, 256) and torch.isfinite(images).all()

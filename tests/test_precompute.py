"""Precomputed latents and text embeddings (emu.diffusion.precompute / emu.diffusion.latents) reproduce the on-the-fly
ones."""

import tarfile

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir

from emu.diffusion.precompute import check_precomputed, precompute
from emu.errors import ConfigError
from emu.mini import haystack
from tests.conftest import ROOT, tiny_stage1_overrides


def _compose(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_autoencoder, tiny_clip, tiny_t5):
    """12 haystack images in 3 shards, and their precomputed latents (a quarter held out as val by key)."""
    root = tmp_path_factory.mktemp("precompute")
    haystack.write_shards(root / "images", 12, resolution=32, shard_size=5, progress=False)
    model = tiny_stage1_overrides(tiny_autoencoder, tiny_clip, tiny_t5)
    images = ["experiment=mini/stage1_pretrain", "data=webdataset", f"data.source.shards={root}/images/*.tar",
              "~data.source.n_train", "~data.source.n_val", "data.source.val_fraction=0.25", "data.resolution=32",
              "data.batch_size=5", "data.num_workers=0", f"paths.output_dir={root}/run", *model]  # fmt: skip
    manifest = precompute(_compose(images), root / "latents", shard_size=4, progress=False)
    latents = [
        *images[:1],
        "data=latents",
        f"data.source.shards={root}/latents/train/*.tar",
        *images[3:],
        "data.hflip=0",
    ]
    return {"root": root, "images": images, "latents": latents, "manifest": manifest}


def test_shards_hold_every_sample_once_with_a_manifest(corpus):
    m = corpus["manifest"]
    assert sum(m["counts"].values()) == 12 and m["counts"]["val"] > 0
    assert m["latent_shape"] == [32, 4, 4] and m["resolution"] == 32 and set(m["encoders"]) == {"clip", "t5"}
    keys = []
    for tar in sorted((corpus["root"] / "latents").glob("*/*.tar")):
        with tarfile.open(tar) as t:
            keys += [n.rsplit(".", 1)[0] for n in t.getnames() if n.endswith(".safetensors")]
    assert len(keys) == len(set(keys)) == 12


def test_moved_shards_find_their_own_val_split(corpus, tmp_path):
    import shutil

    from emu.diffusion.latents import LatentSource

    moved = tmp_path / "moved"
    shutil.copytree(corpus["root"] / "latents", moved)
    source = LatentSource(f"{moved}/train/*.tar")
    assert source.manifest["out"] == str(corpus["root"] / "latents")  # where they were written
    assert source.val_shards and all(str(u).startswith(str(moved / "val")) for u in source.val_shards)


def test_precomputed_batches_reproduce_on_the_fly_latents_embeddings_and_loss(corpus):
    cfg = _compose(corpus["latents"])
    dm = hydra.utils.instantiate(cfg.data)
    module = hydra.utils.instantiate(cfg.model).eval()
    check_precomputed(dm.source.manifest, module)  # same autoencoder and encoders: accepted
    batch = next(iter(dm.dataloader("train")))
    assert batch["latent"].shape == (5, 32, 4, 4) and set(batch["text"]) == {"clip", "t5"}

    # the same images, decoded and encoded on the fly (center crops, no flip: what the precompute wrote)
    on_the_fly = hydra.utils.instantiate(_compose([*corpus["images"], "data.hflip=0", "data.drop_last=false"]).data)
    by_key = {}
    for b in on_the_fly.dataloader("train", shuffle=False):
        by_key.update({k: (im, c) for k, im, c in zip(b["key"], b["image"], b["caption"], strict=True)})
    images = {
        "image": torch.stack([by_key[k][0] for k in batch["key"]]),
        "caption": [by_key[k][1] for k in batch["key"]],
    }
    assert images["caption"] == batch["caption"]

    with torch.no_grad():
        posterior = module.autoencoder.encode(images["image"])
        torch.testing.assert_close(batch["latent"][:, :16], posterior.mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batch["latent"][:, 16:], posterior.logvar, atol=1e-5, rtol=1e-5)
        for name, emb in module.conditioner.encode(images["caption"]).items():
            mask = batch["text"][name].mask
            assert torch.equal(mask, emb.mask)
            torch.testing.assert_close(batch["text"][name].tokens[mask], emb.tokens[mask], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(batch["text"][name].pooled, emb.pooled, atol=1e-5, rtol=1e-5)
        loss = [float(module.diffusion_loss(b, torch.Generator().manual_seed(3), drop=False)) for b in (batch, images)]
    assert loss[0] == pytest.approx(loss[1], rel=1e-5)


def test_training_reads_precomputed_shards_and_refuses_mismatches(corpus, tmp_path):
    import train

    cfg = _compose([*corpus["latents"], "trainer.max_steps=2", "trainer.limit_val_batches=1",
                    "trainer.val_check_interval=2", f"paths.output_dir={tmp_path}"])  # fmt: skip
    metrics = train.train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"])) and "val/loss" in metrics

    with pytest.raises(Exception, match=r"data\.flip_captions"):  # hydra wraps the ConfigError
        hydra.utils.instantiate(_compose([*corpus["latents"], "data.hflip=0.5", "data.flip_captions=false"]).data)
    with pytest.raises(Exception, match=r"data\.resolution"):
        hydra.utils.instantiate(_compose([*corpus["latents"], "data.resolution=64"]).data)
    module = hydra.utils.instantiate(cfg.model)
    with pytest.raises(ConfigError, match="autoencoder"):
        check_precomputed({**corpus["manifest"], "autoencoder_fingerprint": "0" * 16}, module)
    encoders = {**corpus["manifest"]["encoders"], "t5": {**corpus["manifest"]["encoders"]["t5"], "max_length": 77}}
    with pytest.raises(ConfigError, match=r"model\.text\.encoders"):
        check_precomputed({**corpus["manifest"], "encoders": encoders}, module)
    t5 = corpus["manifest"]["encoders"]["t5"]  # the same settings, other weights (a retrained encoder, same path)
    encoders = {**corpus["manifest"]["encoders"], "t5": {**t5, "fingerprint": "0" * 16}}
    with pytest.raises(ConfigError, match=r"t5 encoder .* whose weights differ"):
        check_precomputed({**corpus["manifest"], "encoders": encoders}, module)
    assert t5["hidden_state"] == "last" and t5["mask_padding"] is True  # what the embeddings are is recorded
    encoders = {**corpus["manifest"]["encoders"], "t5": {**t5, "hidden_state": "penultimate"}}  # SDXL-style states
    with pytest.raises(ConfigError, match=r"precomputed t5 embeddings are .*'penultimate'"):
        check_precomputed({**corpus["manifest"], "encoders": encoders}, module)


def test_flipped_copies_are_the_flipped_images_and_swapped_captions_and_training_draws_them_resumably(corpus, tmp_path):
    from emu.data.samples import swap_left_right

    m = corpus["manifest"]
    assert m["flips"] == {"captions": True}  # the stage trains with data.hflip 0.5: both orientations were written
    stored, _ = _tensors_by_key(corpus["root"] / "latents")
    assert all(("flipped.latent" in t) == k.startswith("train/") for k, t in stored.items())  # val is never flipped

    cfg = _compose([*corpus["latents"][:-1], "data.hflip=0.5"])
    module = hydra.utils.instantiate(cfg.model).eval()
    on_the_fly = hydra.utils.instantiate(_compose([*corpus["images"], "data.hflip=0", "data.drop_last=false"]).data)
    images = {}
    for b in on_the_fly.dataloader("train", shuffle=False):
        images.update({k: (im, c) for k, im, c in zip(b["key"], b["image"], b["caption"], strict=True)})
    assert any(swap_left_right(c) != c for _, c in images.values())  # some captions name a side
    keys = sorted(images)
    with torch.no_grad():
        posterior = module.autoencoder.encode(torch.stack([images[k][0] for k in keys]).flip(-1))
        swapped = module.conditioner.encode([swap_left_right(images[k][1]) for k in keys])
    for i, k in enumerate(keys):
        t = stored[f"train/{k}.safetensors"]
        torch.testing.assert_close(t["flipped.latent"][:16], posterior.mean[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(t["flipped.latent"][16:], posterior.logvar[i], atol=1e-5, rtol=1e-5)
        assert not torch.equal(t["flipped.latent"], t["latent"])
        for name, emb in swapped.items():
            n = int(emb.mask[i].sum())
            torch.testing.assert_close(t[f"flipped.{name}.tokens"], emb.tokens[i, :n], atol=1e-5, rtol=1e-5)
            if emb.pooled is None:  # the T5 has no pooled output
                assert f"flipped.{name}.pooled" not in t
            else:
                torch.testing.assert_close(t[f"flipped.{name}.pooled"], emb.pooled[i], atol=1e-5, rtol=1e-5)

    def epoch(dm, n):  # {key: (flipped, caption, crop, moments or image)} of training epoch n
        loader = dm.source.stream("train", dm.train_prepare, dm._skips["train"], 5, False, epoch=n)
        return {k: (m.get("flipped", False), c, m["crop_top_left"], x) for b in loader
                for k, m, c, x in zip(b["key"], b["meta"], b["caption"], b.get("latent", b.get("image")),
                                      strict=True)}  # fmt: skip

    dm = hydra.utils.instantiate(_compose([*corpus["latents"][:-1], "data.hflip=0.5", "data.drop_last=false"]).data)
    first, again, other = epoch(dm, 0), epoch(dm, 0), epoch(dm, 1)
    assert {k: v[:3] for k, v in first.items()} == {k: v[:3] for k, v in again.items()}  # resumable: same draws
    assert {k: v[0] for k, v in first.items()} != {k: v[0] for k, v in other.items()}  # a new epoch draws anew
    flips = [v[0] for e in (first, other) for v in e.values()]
    assert 0 < sum(flips) < len(flips)
    for e in (first, other):
        for k, (flipped, caption, _, latent) in e.items():
            t = stored[f"train/{k}.safetensors"]
            assert torch.equal(latent, t["flipped.latent" if flipped else "latent"])
            assert caption == (swap_left_right(images[k][1]) if flipped else images[k][1])
    # the image path, same seed and epochs: the same images flipped, the same captions and crop records
    dm_images = hydra.utils.instantiate(_compose([*corpus["images"], "data.hflip=0.5", "data.drop_last=false"]).data)
    for n, e in ((0, first), (1, other)):
        assert {k: v[:3] for k, v in epoch(dm_images, n).items()} == {k: v[:3] for k, v in e.items()}

    unflipped = tmp_path / "unflipped"  # a stage that trains without flips: one orientation, and flips are refused
    manifest = precompute(_compose([*corpus["images"], "data.hflip=0"]), unflipped, shard_size=4, progress=False)
    assert manifest["flips"] is None
    assert not any(k.startswith("flipped.") for t in _tensors_by_key(unflipped)[0].values() for k in t)
    with pytest.raises(Exception, match=r"data\.hflip"):  # hydra wraps the ConfigError
        hydra.utils.instantiate(_compose([*corpus["latents"][:-1], f"data.source.shards={unflipped}/train/*.tar",
                                          "data.hflip=0.5"]).data)  # fmt: skip


def _tensors_by_key(folder):
    """{split/key: {name: tensor}} of every precomputed sample under ``folder`` (and the tar names per split)."""
    from safetensors.torch import load

    out, names = {}, set()
    for tar in sorted(folder.glob("*/*.tar")):
        names.add(f"{tar.parent.name}/{tar.name}")
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.name.endswith(".safetensors"):
                    out[f"{tar.parent.name}/{m.name}"] = load(t.extractfile(m).read())
    return out, names


def test_two_ranks_launched_like_torchrun_write_what_one_process_writes(corpus, tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "latents"
    cmd = [sys.executable, "-m", "emu.diffusion.precompute", "--out", str(out), "--shard-size", "4", *corpus["images"]]
    procs = []
    for rank in (0, 1):  # the variables torchrun sets (TORCHELASTIC_RUN_ID marks a torchelastic launch)
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "t"}
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    logs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    import json

    manifest = json.loads((out / "precompute.json").read_text())
    ref = corpus["manifest"]
    assert manifest["counts"] == ref["counts"] and manifest["latent_shapes"] == [ref["latent_shape"]]
    records = [json.loads(p.read_text()) for p in out.glob("*/*.json")]
    assert {r["rank"] for r in records} == {0, 1}  # both ranks did pieces
    ours, names = _tensors_by_key(out)
    theirs, ref_names = _tensors_by_key(corpus["root"] / "latents")
    assert names == ref_names and ours.keys() == theirs.keys()
    for key, tensors in ours.items():
        for name, t in tensors.items():
            torch.testing.assert_close(t, theirs[key][name], atol=1e-6, rtol=1e-6)


def test_a_killed_precompute_resumes_without_redoing_or_losing_pieces(corpus, tmp_path, monkeypatch):
    import json

    from emu.training.ranks import Ranks
    from emu.training.threads import ENV, write_budget

    cfg, out = _compose(corpus["images"]), tmp_path / "latents"
    threads = torch.get_num_threads()
    write_budget(tmp_path / "budget", threads + 1)  # a scheduler's budget (make demo): followed from the first batch
    monkeypatch.setenv(ENV, str(tmp_path / "budget"))
    try:
        assert precompute(cfg, out, progress=False, ranks=Ranks(0, 2)) is None  # rank 1 of the job never ran
        assert torch.get_num_threads() == threads + 1
    finally:
        torch.set_num_threads(threads)
        monkeypatch.delenv(ENV)
    done = {p: p.stat().st_mtime_ns for p in out.glob("*/*.tar")}
    assert done and not (out / "precompute.json").exists()
    (out / "train" / "00001.tar.partial").write_bytes(b"half a shard")  # killed while writing a piece
    manifest = precompute(cfg, out, progress=False)  # restarted as one process: does what is left
    assert all(p.stat().st_mtime_ns == t for p, t in done.items())  # finished pieces untouched
    assert manifest["counts"] == corpus["manifest"]["counts"] and not list(out.glob("*/*.partial"))
    ours, _ = _tensors_by_key(out)
    assert len(ours) == 12
    with pytest.raises(ConfigError, match=r"--out.*source"):  # other data into the same folder
        precompute(_compose([*corpus["images"], "data.source.val_fraction=0.5"]), out, progress=False)
    assert json.loads((out / "precompute.plan.json").read_text())["source"]["val_fraction"] == 0.25


def test_bucketed_latents_keep_their_bucket_and_the_frozen_networks_stay_off_the_device(
    tmp_path, tiny_autoencoder, tiny_clip, tiny_t5
):
    import train

    model = tiny_stage1_overrides(tiny_autoencoder, tiny_clip, tiny_t5)
    images = ["experiment=mini/stage1_pretrain", "data.source.n_train=48", "data.source.n_val=8", "data.resolution=64",
              "data.buckets={multiple: 16, max_aspect: 2.0}", "data.batch_size=4", "data.num_workers=0",
              f"paths.output_dir={tmp_path}/run", *model]  # fmt: skip
    manifest = precompute(_compose(images), tmp_path / "latents", shard_size=16, progress=False)
    assert len(manifest["latent_shapes"]) > 1 and manifest["latent_shape"] is None  # the haystack's odd aspects
    latents = ["experiment=mini/stage1_pretrain", "data=latents", f"data.source.shards={tmp_path}/latents/train/*.tar",
               "~data.source.n_train", "~data.source.n_val",
               "data.resolution=64", "data.hflip=0", "data.batch_size=4", "data.drop_last=false", "data.num_workers=0",
               *model]  # fmt: skip
    cfg = _compose([*latents, "trainer.max_steps=2", "trainer.limit_val_batches=1", "trainer.val_check_interval=2",
                    f"paths.output_dir={tmp_path}"])  # fmt: skip
    dm = hydra.utils.instantiate(cfg.data)
    shapes = set()
    for batch in dm.dataloader("train"):
        shapes.add(tuple(batch["latent"].shape[1:]))
    assert len(shapes) > 1 and all(list(s) in manifest["latent_shapes"] for s in shapes)

    module = hydra.utils.instantiate(cfg.model)
    module.trainer = type("T", (), {"datamodule": dm})()
    module.setup("fit")
    assert module.frozen.offloaded and "autoencoder.encoder.conv_in.weight" in module._ddp_params_and_buffers_to_ignore
    with pytest.raises(ConfigError, match="do not divide"):  # latents the U-Net cannot take
        check_precomputed({**manifest, "latent_shapes": [[32, 5, 3]]}, module)
    module.to(torch.float64)  # moves and casts pass the frozen networks by
    assert next(module.unet.parameters()).dtype == torch.float64
    assert next(module.autoencoder.parameters()).dtype == torch.float32
    assert all(p.dtype == torch.float32 for e in module.conditioner.encoders.values() for p in e.parameters())
    assert list(dict(module.named_children())) == list(dict(type(module)(**module.hparams).named_children()))
    metrics = train.train(cfg)  # trains and validates (sampling with the frozen networks) on bucketed latents
    assert torch.isfinite(torch.tensor(metrics["train/loss"])) and "val/loss" in metrics

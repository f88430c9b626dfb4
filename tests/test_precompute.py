"""Precomputed latents and text embeddings (emu.diffusion.precompute / emu.diffusion.latents) reproduce the on-the-fly
ones."""

import tarfile

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir

from emu.data import haystack
from emu.diffusion.precompute import precompute
from emu.errors import ConfigError
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
    module.check_precomputed(dm.source.manifest)  # same autoencoder and encoders: accepted
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

    with pytest.raises(Exception, match=r"data\.hflip"):  # hydra wraps the ConfigError
        hydra.utils.instantiate(_compose([*corpus["latents"], "data.hflip=0.5"]).data)
    with pytest.raises(Exception, match=r"data\.resolution"):
        hydra.utils.instantiate(_compose([*corpus["latents"], "data.resolution=64"]).data)
    module = hydra.utils.instantiate(cfg.model)
    with pytest.raises(ConfigError, match="autoencoder"):
        module.check_precomputed({**corpus["manifest"], "autoencoder_fingerprint": "0" * 16})
    encoders = {**corpus["manifest"]["encoders"], "t5": {**corpus["manifest"]["encoders"]["t5"], "max_length": 77}}
    with pytest.raises(ConfigError, match=r"model\.text\.encoders"):
        module.check_precomputed({**corpus["manifest"], "encoders": encoders})

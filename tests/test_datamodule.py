import json
from collections import Counter

import pytest
import torch

from emu.data import EmuDataModule, FolderSource, WebDatasetSource
from emu.errors import ConfigError
from emu.mini.source import HaystackSource
from tests.conftest import expected_skips, png_bytes, rgb_image, write_shards

GOOD_KEYS = {"good_0", "good_1", "good_2", "good_3", "cmyk", "gray16", "gray", "palette_alpha", "exif"}


def check_batch(batch, batch_size, resolution):
    assert set(batch) == {"image", "caption", "key", "meta"}
    assert batch["image"].shape == (batch_size, 3, resolution, resolution)
    assert batch["image"].dtype == torch.float32
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert len(batch["caption"]) == len(batch["key"]) == len(batch["meta"]) == batch_size
    assert all(isinstance(c, str) and c for c in batch["caption"])
    assert all(isinstance(m, dict) for m in batch["meta"])


def iterate(dm, split="train"):
    return list(dm.dataloader(split))


def test_haystack_source_yields_documented_batches():
    dm = EmuDataModule(HaystackSource(n_train=16, n_val=8, seed=3, resolution=32), resolution=32, batch_size=4)
    batches = iterate(dm)
    assert len(batches) == 4
    for b in batches:
        check_batch(b, 4, 32)
        for caption, meta in zip(b["caption"], b["meta"]):
            assert caption == meta["caption"] and {"appeal", "needle", "flaws", "objects"} <= set(meta)
    val = iterate(dm, "val")
    assert sorted(k for b in val for k in b["key"]) == [f"{i:09d}" for i in range(16, 24)]  # disjoint from train


def test_cached_haystack_renders_each_image_once_and_gives_the_same_pixels(monkeypatch):
    import numpy as np

    from emu.mini import source as sources

    plain, cached = HaystackSource(n_train=6, n_val=2, seed=4), HaystackSource(n_train=6, n_val=2, seed=4, cache=True)
    calls = []
    render = sources.haystack.make_sample
    monkeypatch.setattr(sources.haystack, "make_sample", lambda *a: calls.append(a) or render(*a))
    for _ in range(3):  # three epochs
        for split, n in (("train", 6), ("val", 2)):
            for i in range(n):
                a, b = plain.raw(split, i), cached.raw(split, i)
                assert a["key"] == b["key"] and np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
                b["image"].paste((0, 0, 0), (0, 0, 8, 8))  # a consumer changing its image leaves the cache alone
    assert len(calls) == 3 * 8 + 8  # the plain source renders every time, the cached one once per image


def test_folder_with_metadata_jsonl(tmp_path):
    rows = []
    for i in range(10):
        (tmp_path / f"img{i}.png").write_bytes(png_bytes(rgb_image(40, 30, seed=i)))
        rows.append({"file_name": f"img{i}.png", "text": f"caption {i}", "score": i})
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    source = FolderSource(str(tmp_path), val_fraction=0.3)
    assert source.malformed_metadata == 1
    assert source.size("train") + source.size("val") == 10 and source.size("val") > 0
    dm = EmuDataModule(source, resolution=16, batch_size=2, drop_last=False)
    batches = iterate(dm)
    for b in batches:
        check_batch(b, len(b["key"]), 16)
        for key, caption, meta in zip(b["key"], b["caption"], b["meta"]):
            i = int(key[3:-4])
            assert caption == f"caption {i}"  # the sizes: 40x30 resized to 21x16, its 16x16 center (2 columns in)
            assert meta == {"score": i, "source_size": [40, 30], "original_size": [30, 40], "crop_top_left": [0, 2],
                            "target_size": [16, 16]}  # fmt: skip
            assert len(meta["source_size"]) == 2  # the size before resizing, for curation's size filter
    assert sum(len(b["key"]) for b in batches) == source.size("train")


def test_bad_folder_is_skipped_with_exact_counts(bad_folder):
    dm = EmuDataModule(
        FolderSource(str(bad_folder), val_fraction=0.0), resolution=16, min_size=16, batch_size=3, drop_last=False
    )
    loader = dm.dataloader("train", shuffle=False)
    keys = []
    for b in loader:
        check_batch(b, len(b["key"]), 16)
        keys += b["key"]
    assert dm.skipped["train"] == expected_skips()
    assert {k.rsplit(".", 1)[0] for k in keys} == GOOD_KEYS  # replacements are good samples only
    assert "corrupt_image" not in dm.skip_summary() and "not_an_image 2" in dm.skip_summary()


def _folder_with_a_run_of_bad_files(root, n_good=19, n_bad=5):
    """``n_good`` images with captions, and ``n_bad`` unreadable files that sort together after the 10th."""
    root.mkdir()
    for i in range(n_good):
        name = f"img_{i:02d}" if i < 10 else f"img_{i + n_bad:02d}"
        (root / f"{name}.png").write_bytes(png_bytes(rgb_image(16, 16, seed=i)))
        (root / f"{name}.txt").write_text(f"caption {i}")
    for j in range(n_bad):
        (root / f"img_{10 + j:02d}.png").write_bytes(b"not an image")
        (root / f"img_{10 + j:02d}.txt").write_text("broken")
    return root


@pytest.mark.parametrize("shuffle", [False, True])
def test_a_run_of_bad_files_is_dropped_not_replaced(tmp_path, shuffle):
    """Before: each bad file was replaced by the next good one, so the image after a run of 5 bad files came 6
    times per epoch. Now no image comes twice in an epoch, and the skips are counted exactly."""
    root = _folder_with_a_run_of_bad_files(tmp_path / "run")
    dm = EmuDataModule(FolderSource(str(root), val_fraction=0.0), resolution=16, batch_size=4, drop_last=False)
    for epoch in range(2):
        keys = [k for b in dm.dataloader("train", shuffle=shuffle) for k in b["key"]]
        assert sorted(Counter(keys).values()) == [1] * 19, f"epoch {epoch}: an image delivered more than once"
        assert dm.skipped["train"] == Counter(not_an_image=5 * (epoch + 1))


def _bad_folder_data(root, batch_size, **kw):
    return EmuDataModule(FolderSource(str(root), val_fraction=0.0), resolution=16, min_size=16, batch_size=batch_size,
                         drop_last=False, **kw)  # fmt: skip


@pytest.mark.parametrize("batch_size", [1, 4])
def test_a_batch_with_no_good_sample_is_skipped_never_refilled(bad_folder, batch_size):
    """Before: a batch whose samples were all bad got the next good sample, which its own batch delivered again: at
    data.batch_size=1 a good file came up to 4 times an epoch after a run of bad ones (a bad-input corpus: exif_rot.jpg
    4 times, anim.gif 3). Now such a batch is empty (counted), with a stand-in that is read, not delivered, and the
    training step skips it (emu.data.batches); a plain loop over the loader never sees it."""
    dm = _bad_folder_data(bad_folder, batch_size)
    n = dm.source.size("train")
    batches = list(dm.train_dataloader())  # the Trainer's loader
    assert len(batches) == -(-n // batch_size)  # every batch the sampler made: the resume position counts them all
    keys = [k.rsplit(".", 1)[0] for b in batches for k in b["key"]]
    assert Counter(keys) == Counter(GOOD_KEYS), "a good file delivered twice, or not at all"
    assert dm.skipped["train"] == expected_skips()  # each bad file counted once
    empty = [b for b in batches if not b["key"]]
    assert dm.empty_batches["train"] == len(empty) and (batch_size > 1 or len(empty) == n - len(GOOD_KEYS))
    for b in empty:
        assert b["image"].shape == (0, 3, 16, 16) and b["caption"] == b["meta"] == []
        assert len(b["stand_in"]["key"]) == 1 and b["stand_in"]["key"][0].rsplit(".", 1)[0] in GOOD_KEYS
    assert all("stand_in" not in b for b in batches if b["key"])
    plain = [b["key"] for b in dm.dataloader("train")]  # a plain loop (precompute, statistics): no empty batch
    assert plain == [b["key"] for b in batches if b["key"]]
    assert "batches with none left skipped" in dm.skip_summary() or not empty


@pytest.mark.parametrize("batch_size", [1, 4])
def test_a_resume_among_empty_batches_is_exact(bad_folder, batch_size):
    """Resumed at any batch (its skip and empty-batch counts from the checkpoint's DataModule state), a run sees the
    batches, crops, flips and stand-ins of an uninterrupted one, and ends with the same counts."""

    def data(epoch, done):
        dm = _bad_folder_data(bad_folder, batch_size, crop="random", hflip=0.5, seed=1)
        dm._position = lambda: (epoch, done)
        return dm

    def same(a, b):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])
        assert ("stand_in" in a) == ("stand_in" in b)
        if "stand_in" in a:
            assert a["stand_in"]["key"] == b["stand_in"]["key"]
            assert torch.equal(a["stand_in"]["image"], b["stand_in"]["image"])

    whole = data(1, 0)
    full = list(whole.train_dataloader())
    assert any(not b["key"] for b in full) and any(b["key"] for b in full)
    for k in sorted({1, len(full) // 2, len(full) - 1}):
        first = data(1, 0)
        batches = iter(first.train_dataloader())
        done = [next(batches) for _ in range(k)]  # then the run is killed; its checkpoint holds first.state_dict()
        resumed = data(1, k)
        resumed.load_state_dict(first.state_dict())
        for a, b in zip(full, done + list(resumed.train_dataloader()), strict=True):
            same(a, b)
        assert resumed.skipped == whole.skipped and resumed.empty_batches == whole.empty_batches


def test_a_fit_on_one_process_skips_the_steps_of_empty_batches(bad_folder, one_thread):
    """Lightning on one process: the step of an empty batch returns None; the weights and the optimizer's momentum
    stay as they were, every other step is that of the mean over its good samples, each good file trained on once."""
    import lightning as L

    from emu.data.callbacks import DataHealth
    from tests.good_samples_run import Linear, replay

    dm = _bad_folder_data(bad_folder, 1, seed=3)
    module = Linear()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[DataHealth()],
                        limit_val_batches=0, num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(module, datamodule=dm)
    n = dm.source.size("train")
    assert len(module.records) == n and trainer.global_step == n  # Lightning counts a skipped step as a step
    kinds = replay([module.records])
    assert kinds == {0: n - len(GOOD_KEYS), 1: len(GOOD_KEYS)}
    assert Counter(k.rsplit(".", 1)[0] for r in module.records for k in r["keys"]) == Counter(GOOD_KEYS)


def test_a_split_of_only_bad_files_says_how_many_it_has(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    for i in range(19):
        (root / f"{i}.png").write_bytes(b"not an image")
        (root / f"{i}.txt").write_text("broken")
    dm = EmuDataModule(FolderSource(str(root), val_fraction=0.0), resolution=16, batch_size=4, max_skip_rate=1.0)
    with pytest.raises(RuntimeError, match="all 19 samples of the train split are unusable"):
        next(iter(dm.train_dataloader()))  # before: "64 consecutive unusable samples"; found looking for a stand-in
    assert list(dm.dataloader("train")) == [] and dm.skipped["train"]["not_an_image"] == 4 + 16  # a plain loop: none


@pytest.mark.parametrize("workers", [0, 2])
def test_webdataset_bad_shards_skipped_and_counted(bad_shards, workers):
    dm = EmuDataModule(
        WebDatasetSource(bad_shards, val_fraction=0.0, shuffle_buffer=0),
        resolution=16,
        min_size=16,
        batch_size=2,
        drop_last=False,
        num_workers=workers,
    )
    keys = [k for b in iterate(dm) for k in b["key"]]
    assert sorted(keys) == sorted(GOOD_KEYS)
    assert dm.skipped["train"] == expected_skips()


def test_webdataset_truncated_and_missing_shards(tmp_path):
    samples = [
        {"__key__": f"s{i:03d}", "png": png_bytes(rgb_image(seed=i)), "txt": f"c{i}".encode()} for i in range(12)
    ]
    write_shards(tmp_path, samples, per_shard=6)
    shard = tmp_path / "00001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # cut mid-member
    spec = [str(tmp_path / "{00000..00001}.tar"), str(tmp_path / "00009.tar")]  # the last one is missing
    dm = EmuDataModule(
        WebDatasetSource(spec, val_fraction=0.0, shuffle_buffer=0), resolution=16, batch_size=4, drop_last=False
    )
    keys = [k for b in iterate(dm) for k in b["key"]]
    assert set(keys) >= {f"s{i:03d}" for i in range(6)} and 6 <= len(keys) < 12  # shard 0 whole, 1 in part
    assert dm.skipped["train"]["truncated_shard"] == 1 and dm.skipped["train"]["missing_shard"] == 1


def test_webdataset_split_by_key_and_val_shards(tmp_path):
    samples = [
        {"__key__": f"k{i:04d}", "png": png_bytes(rgb_image(16, 16, i)), "txt": b"x", "json": b"{}"} for i in range(200)
    ]
    pattern = write_shards(tmp_path / "a", samples, per_shard=50)
    dm = EmuDataModule(WebDatasetSource(pattern, val_fraction=0.1), resolution=16, batch_size=8, drop_last=False)
    train = {k for b in iterate(dm) for k in b["key"]}
    val = {k for b in iterate(dm, "val") for k in b["key"]}
    assert not train & val and len(train | val) == 200 and 5 <= len(val) <= 40
    other = write_shards(tmp_path / "b", samples[:20], per_shard=50)
    dm = EmuDataModule(WebDatasetSource(pattern, val_shards=other), resolution=16, batch_size=8, drop_last=False)
    assert {k for b in iterate(dm, "val") for k in b["key"]} == {f"k{i:04d}" for i in range(20)}


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.source\.root: .* is not a directory"):
        FolderSource(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="no image files"):
        FolderSource(str(tmp_path))
    with pytest.raises(ConfigError, match=r"data\.source\.shards: .* matches no shards"):
        WebDatasetSource(str(tmp_path / "*.tar"))
    with pytest.raises(ConfigError, match="none of the 3 shard paths"):
        WebDatasetSource(str(tmp_path / "{0..2}.tar"))
    with pytest.raises(ConfigError, match=r"data\.resolution: must be positive, got 0"):
        EmuDataModule(HaystackSource(n_train=8, n_val=0), resolution=0)
    with pytest.raises(ConfigError, match=r"data\.batch_size: 16 is larger than the 8"):
        EmuDataModule(HaystackSource(n_train=8, n_val=0), batch_size=16)
    with pytest.raises(ConfigError, match="epoch_size"):
        (tmp_path / "0.tar").write_bytes(b"")
        WebDatasetSource(str(tmp_path / "0.tar"), resampled=True)


def test_multi_rank_webdataset_settings_that_would_hang_are_refused(tmp_path):
    """Found by the CPU rehearsal (tests/test_rehearsal.py): ranks reading shards once get different numbers of
    batches, and a rank without val shards never joins the metrics' all-gather; both hung, now both are errors."""
    from emu.data.sources import SkipCounter

    samples = [{"__key__": f"k{i:04d}", "png": png_bytes(rgb_image(16, 16, i)), "txt": b"x"} for i in range(8)]
    pattern = write_shards(tmp_path / "a", samples, per_shard=4)
    one_val = write_shards(tmp_path / "v", samples[:2], per_shard=4)
    args = dict(prepare=lambda s: s, skips=SkipCounter(), batch_size=2, drop_last=False, workers=0)
    with pytest.raises(ConfigError, match=r"data\.source\.resampled: must be true when 2 ranks"):
        WebDatasetSource(pattern).stream("train", world_size=2, **args)
    WebDatasetSource(pattern, resampled=True, epoch_size=8).stream("train", world_size=2, **args)
    WebDatasetSource(pattern).stream("train", world_size=1, **args)  # one rank: read once, as before
    with pytest.raises(ConfigError, match=r"data\.source\.val_shards: 1 shards for 2 ranks"):
        WebDatasetSource(pattern, val_shards=one_val, resampled=True, epoch_size=8).stream("val", world_size=2, **args)


def test_skip_counts_survive_checkpoint_state():
    dm = EmuDataModule(HaystackSource(n_train=8, n_val=0), batch_size=4)
    dm.load_state_dict({"skipped": {"train": {"corrupt_image": 3}}})
    dm._skips["train"].count("empty_file", "test")
    other = EmuDataModule(HaystackSource(n_train=8, n_val=0), batch_size=4)
    other.load_state_dict(dm.state_dict())
    assert other.skipped["train"] == Counter({"corrupt_image": 3, "empty_file": 1})


def test_persistent_workers_see_each_epoch_as_fresh_workers_do(tmp_path):
    """A small folder re-read every few steps (stage 2) keeps its loader worker between epochs
    (``data.persistent_workers``): the epochs' orders and flips must be those of fresh workers, since they come
    from the sampler in the main process, not from state a kept worker would carry over."""
    for i in range(6):
        img = rgb_image(16, 16, seed=i)
        img.paste((255, 255, 255), (0, 0, 4, 16))  # a white left edge: a flip moves it to the right
        (tmp_path / f"img{i}.png").write_bytes(png_bytes(img))
        (tmp_path / f"img{i}.txt").write_text(f"a star on the left {i}")

    def epochs(persistent: bool) -> list[list[tuple]]:
        dm = EmuDataModule(FolderSource(str(tmp_path), val_fraction=0.0), resolution=16, hflip=0.5, batch_size=2,
                           num_workers=1, persistent_workers=persistent, seed=5)  # fmt: skip
        epoch = {"n": 0}
        dm._position = lambda: (epoch["n"], 0)  # the Trainer's progress: which epoch the loader starts
        loader = dm.dataloader("train")
        out = []
        for n in range(3):
            epoch["n"] = n
            out.append([(k, c, b["image"][j].sum().item()) for b in loader
                        for j, (k, c) in enumerate(zip(b["key"], b["caption"], strict=True))])  # fmt: skip
        return out

    kept, fresh = epochs(True), epochs(False)
    assert kept == fresh
    assert len({tuple(e) for e in kept}) == 3  # each epoch its own order and flips
    assert any("right" in c for e in kept for _, c, _ in e) and any("left" in c for e in kept for _, c, _ in e)

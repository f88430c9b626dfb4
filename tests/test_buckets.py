"""Aspect-ratio buckets (emu.data.buckets): the bucket lists, one shape per batch for map-style sources and streams,
every image once, exact resume, several ranks, the square path unchanged, and training, precompute and sampling on
mixed aspect ratios."""

import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from emu.data.buckets import BucketSampler, bucket_batches, make_buckets, nearest_bucket, resolve_buckets
from emu.data.datamodule import EmuDataModule
from emu.data.samples import SamplePreparer
from emu.data.sources import WebDatasetSource
from emu.errors import ConfigError
from emu.mini import haystack
from emu.mini.source import HaystackSource
from tests.conftest import ROOT, png_bytes, rgb_image, tiny_stage1_overrides

MINI = {"multiple": 16, "max_aspect": 2.0}


def test_bucket_lists_keep_the_area_the_multiple_and_the_aspect_limit():
    assert make_buckets(64, 16, 2.0) == [(48, 96), (48, 80), (64, 64), (80, 48), (96, 48)]
    sdxl = make_buckets(1024, 64, 4.0)  # SDXL's list is made this way
    assert (1024, 1024) in sdxl and (1152, 896) in sdxl and (512, 2048) in sdxl and (2048, 512) in sdxl
    for w, h in sdxl:
        assert w % 64 == 0 and h % 64 == 0 and max(w / h, h / w) <= 4.0
        assert abs(w * h / 1024**2 - 1) < 0.13  # about the same number of pixels
        assert (h, w) in sdxl  # every wide bucket has its tall twin
    assert make_buckets(64, 32, 2.0) == [(64, 64)]  # too coarse a multiple for anything but the square
    assert resolve_buckets([[96, 48], [64, 64]], 64) == [(96, 48), (64, 64)] and resolve_buckets(None, 64) is None
    for bad in ([], [[64, 0]], [[64, 64], [64, 64]], {"max_aspect": 2}, "square"):
        with pytest.raises(ConfigError, match=r"data\.buckets"):
            resolve_buckets(bad, 64)
    with pytest.raises(ConfigError, match="divide"):
        make_buckets(64, 24, 2.0)


def test_nearest_bucket_goes_by_aspect_ratio():
    buckets = make_buckets(64, 16, 2.0)
    assert nearest_bucket(500, 500, buckets) == (64, 64)
    assert nearest_bucket(96, 64, buckets) == (80, 48)  # 1.5 is nearer 5:3 than 2:1 (in log ratio)
    assert nearest_bucket(128, 64, buckets) == (96, 48) and nearest_bucket(10, 100, buckets) == (48, 96)


def test_the_square_path_is_torchvisions_resize_and_crop_bit_for_bit():
    """Without buckets the preparer's one resize-and-crop path gives what the Resize + CenterCrop / RandomCrop
    pipeline it replaced gave, random crops included (same draws from the seeded RNG)."""
    rng = np.random.default_rng(0)
    for w, h in [(64, 64), (96, 64), (64, 128), (131, 67), (50, 77), (33, 500)]:
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        for crop in ("center", "random"):
            res = 32
            resize = v2.Resize(res, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
            old = v2.Compose([v2.PILToTensor(), resize,
                              v2.CenterCrop(res) if crop == "center" else v2.RandomCrop(res),
                              v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3)])  # fmt: skip
            torch.manual_seed(5)
            expected = old(img).clamp(-1, 1)
            torch.manual_seed(5)
            got = SamplePreparer(resolution=res, crop=crop)({"key": "k", "image": img, "caption": "c"})
            assert torch.equal(got["image"], expected), (w, h, crop)


def test_a_bucketed_sample_covers_its_bucket_and_records_its_crop():
    prepare = SamplePreparer(buckets=make_buckets(64, 16, 2.0), crop="center")
    out = prepare({"key": "k", "image": rgb_image(200, 100), "caption": "a circle on the left"})
    assert out["image"].shape == (3, 48, 96)  # 2:1 -> 96x48, resized to 96x48 exactly: nothing cropped
    assert out["meta"]["original_size"] == [100, 200] and out["meta"]["crop_top_left"] == [0, 0]
    out = prepare({"key": "k", "image": rgb_image(150, 100), "caption": "c"})  # 1.5 -> 80x48: resized to 80x53
    assert out["image"].shape == (3, 48, 80) and out["meta"]["crop_top_left"] == [2, 0]
    assert out["meta"]["target_size"] == [48, 80]
    flipped = SamplePreparer(buckets=[(80, 48)], hflip=1.0)({"key": "k", "image": rgb_image(160, 80), "caption": "c"})
    assert flipped["meta"]["flipped"] and flipped["meta"]["crop_top_left"] == [0, 8]  # 96x48 resized, left 8 mirrored


def test_haystack_sizes_are_known_without_rendering():
    source = HaystackSource(n_train=120, n_val=8, resolution=32)
    sizes = source.image_sizes("train")
    assert len(set(sizes)) > 1  # the haystack has odd aspect ratios
    for i in range(0, 120, 3):
        assert haystack.make_sample(0, i, 32)[0].size == sizes[i]


def _keys_and_shapes(loader):
    keys, shapes = [], []
    for batch in loader:
        assert len({tuple(x.shape) for x in batch["image"]}) == 1
        keys += batch["key"]
        shapes.append(tuple(batch["image"].shape[1:]))
    return keys, shapes


def test_map_style_batches_hold_one_bucket_and_every_image_once():
    source = HaystackSource(n_train=300, n_val=20, resolution=64)
    dm = EmuDataModule(source, resolution=64, batch_size=8, buckets=MINI, drop_last=False, crop="random", hflip=0.5)
    keys, shapes = _keys_and_shapes(dm.dataloader("train"))
    assert sorted(keys) == sorted(source.raw("train", i)["key"] for i in range(300))  # each once
    assert len(set(shapes)) > 2  # several buckets seen
    expected = Counter(nearest_bucket(*wh, dm.buckets) for wh in source.image_sizes("train"))
    got = Counter()
    for batch in dm.dataloader("train"):
        got[(batch["image"].shape[-1], batch["image"].shape[-2])] += len(batch["key"])
    assert got == expected  # every image in its own bucket
    val_keys, _ = _keys_and_shapes(dm.dataloader("val"))
    assert len(val_keys) == 20
    dropped = EmuDataModule(source, resolution=64, batch_size=8, buckets=MINI, drop_last=True)
    assert all(len(b["key"]) == 8 for b in dropped.dataloader("train"))


def test_bucketed_order_depends_on_seed_and_epoch_and_resumes_exactly():
    source = HaystackSource(n_train=200, n_val=0, resolution=64)
    dm = EmuDataModule(source, resolution=64, batch_size=6, buckets=MINI, crop="random", hflip=0.5, seed=3)
    loader = dm.dataloader("train")
    loader.position = lambda: (1, 0)
    full = list(loader)
    loader.position = lambda: (1, 4)  # a resume four batches into epoch 1
    resumed = list(loader)
    assert len(resumed) == len(full) - 4
    for a, b in zip(full[4:], resumed, strict=True):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])  # same crops and flips
    loader.position = lambda: (2, 0)
    assert [b["key"] for b in loader] != [b["key"] for b in full]  # another epoch, another order


def test_ranks_get_disjoint_whole_batches_of_equal_count():
    bucket_of = [i % 3 for i in range(100)]
    samplers = [BucketSampler(bucket_of, 5, True, 0, num_replicas=2, rank=r) for r in (0, 1)]
    batches = [[[i for i, _ in b] for b in s] for s in samplers]
    assert len(batches[0]) == len(batches[1]) > 0
    seen = [i for rank in batches for b in rank for i in b]
    assert len(seen) == len(set(seen))
    for rank in batches:
        assert all(len({bucket_of[i] for i in b}) == 1 and len(b) == 5 for b in rank)
    samplers[0].set_position(0, 2)
    assert [[i for i, _ in b] for b in samplers[0]] == batches[0][2:]


def test_stream_batches_hold_one_shape_and_partial_ones_come_last():
    samples = [{"image": torch.zeros(3, h, w), "key": str(i)} for i, (w, h) in enumerate([(4, 2), (2, 2)] * 5)]
    out = list(bucket_batches(iter(samples), 3, lambda s: [x["key"] for x in s], True, lambda s: s["image"].shape))
    assert out == [["0", "2", "4"], ["1", "3", "5"], ["7", "9"], ["6", "8"]]  # full ones first, then (2,2) < (2,4)
    full = list(bucket_batches(iter(samples), 3, lambda s: len(s), False, lambda s: s["image"].shape))
    assert full == [3, 3]


def test_webdataset_stream_is_bucketed(tmp_path):
    haystack.write_shards(tmp_path, 60, resolution=64, shard_size=20, progress=False)
    source = WebDatasetSource(str(tmp_path / "*.tar"), val_fraction=0.0, shuffle_buffer=0)
    dm = EmuDataModule(source, resolution=64, batch_size=4, buckets=MINI, drop_last=False)
    keys, shapes = _keys_and_shapes(dm.dataloader("train"))
    assert len(keys) == len(set(keys)) == 60 and len(set(shapes)) > 1


def test_pieces_cover_a_split_once_whatever_the_source():
    source = HaystackSource(n_train=50, n_val=0, resolution=64)
    dm = EmuDataModule(source, resolution=64, batch_size=8, buckets=MINI)
    assert dm.num_pieces("train", 16) == 4
    keys = [k for j in range(4) for b in dm.piece_loader("train", j, 16) for k in b["key"]]
    assert keys and sorted(keys) == sorted(source.raw("train", i)["key"] for i in range(50))


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides)


class RecordShapes(L.Callback):
    """``+callbacks.shapes._target_=tests.test_buckets.RecordShapes``: the image shape of every batch trained on, into
    a text file."""

    def __init__(self, out: str):
        self.out = out

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        out = self.out if trainer.world_size == 1 else f"{self.out}.rank{trainer.global_rank}"
        with open(out, "a") as f:
            f.write(" ".join(map(str, batch["image"].shape[-2:])) + "\n")


@pytest.fixture()
def wide_and_tall_folder(tmp_path):
    """Images of three shapes, two of them far from square."""
    shapes = [(96, 48), (48, 96), (64, 64)]
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(24):
        w, h = shapes[i % 3]
        (folder / f"{i:02d}.png").write_bytes(png_bytes(rgb_image(w, h, seed=i)))
        (folder / f"{i:02d}.txt").write_text(f"a large red circle number {i}")
    return folder


def test_stage1_trains_on_mixed_aspect_ratios_size_conditioned_and_samples_a_non_square_bucket(
    wide_and_tall_folder, tmp_path, tiny_autoencoder, tiny_clip, tiny_t5
):
    import hydra

    import train
    from emu.diffusion.checkpoints import load_for_sampling
    from emu.diffusion.pipeline import SamplingSettings

    shapes = tmp_path / "shapes.txt"
    overrides = ["experiment=mini/stage1_pretrain", "data=folder", f"data.source.root={wide_and_tall_folder}",
                 "~data.source.n_train", "~data.source.n_val", "~data.source.seed", "data.source.val_fraction=0.0",
                 "data.resolution=64", "data.buckets=[[96,48],[48,96],[64,64]]",
                 "data.batch_size=4", "data.num_workers=0", "trainer.max_steps=6", "trainer.limit_val_batches=0",
                 "model.unet.size_conditioning=true",
                 "+callbacks.shapes._target_=tests.test_buckets.RecordShapes", f"+callbacks.shapes.out={shapes}",
                 f"paths.output_dir={tmp_path / 'run'}",
                 *tiny_stage1_overrides(tiny_autoencoder, tiny_clip, tiny_t5)]  # fmt: skip
    metrics = train.train(_compose(overrides))
    assert math.isfinite(float(metrics["train/loss"]))
    assert set(shapes.read_text().splitlines()) == {"48 96", "96 48", "64 64"}  # 6 steps over all three buckets
    loaded = load_for_sampling(sorted((tmp_path / "run").rglob("last.ckpt"))[0])
    assert loaded.trained_on["buckets"] == [[96, 48], [48, 96], [64, 64]]
    image = loaded.sample(["a large red circle"], [0], SamplingSettings(width=96, height=48, steps=2))
    assert image.shape == (1, 3, 48, 96)

    module = hydra.utils.instantiate(_compose(overrides).model)
    dm = hydra.utils.instantiate(_compose([*overrides, "data.buckets=[[72,56]]"]).data)
    module.trainer = type("T", (), {"datamodule": dm})()
    with pytest.raises(ConfigError, match=r"data\.buckets.*multiples of"):
        module.setup("fit")


def test_ddp_over_two_processes_trains_every_bucket_with_whole_batches_per_rank(
    wide_and_tall_folder, tmp_path, tiny_autoencoder, tiny_clip, tiny_t5
):
    """A real ``trainer=ddp`` fit (2 CPU processes, gloo) on mixed aspect ratios: every batch of every rank holds one
    bucket, the ranks share every bucket, and their weights stay equal."""
    out, shapes = tmp_path / "ddp", tmp_path / "shapes.txt"
    cmd = [sys.executable, "train.py", "experiment=mini/stage1_pretrain", "trainer=ddp", "trainer.accelerator=cpu",
           "trainer.devices=2", "trainer.precision=32-true", "trainer.max_steps=6", "trainer.limit_val_batches=0",
           "data=folder", f"data.source.root={wide_and_tall_folder}", "~data.source.n_train", "~data.source.n_val",
           "~data.source.seed", "data.source.val_fraction=0.0", "data.resolution=64",
           "data.buckets=[[96,48],[48,96],[64,64]]", "data.batch_size=2", "data.num_workers=0",
           "model.val_prompts=null", "logger=csv", "callbacks.progress_bar=null",
           "+callbacks.shapes._target_=tests.test_buckets.RecordShapes", f"+callbacks.shapes.out={shapes}",
           "+callbacks.dump._target_=tests.dist_helpers.DumpWeights", f"+callbacks.dump.out={out}/weights",
           f"paths.output_dir={out}", f"hydra.run.dir={out}",
           *tiny_stage1_overrides(tiny_autoencoder, tiny_clip, tiny_t5)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    per_rank = [Path(f"{shapes}.rank{i}").read_text().splitlines() for i in range(2)]
    assert [len(s) for s in per_rank] == [6, 6]  # 6 whole batches each (collate refuses mixed shapes)
    assert set(per_rank[0]) | set(per_rank[1]) == {"48 96", "96 48", "64 64"}
    w0, w1 = (torch.load(out / "weights" / f"rank{i}.pt") for i in range(2))
    assert w0["step"] == w1["step"] == 6
    assert all(torch.equal(v, w1["weights"][k]) for k, v in w0["weights"].items())


def test_size_and_crop_conditioning_moves_the_output_drops_out_and_refuses_diffusers():
    from emu.data.samples import size_conditions
    from emu.diffusion.convert import to_diffusers
    from emu.diffusion.unet import UNet

    torch.manual_seed(0)
    net = UNet(in_channels=4, out_channels=4, block_channels=[32, 64], layers_per_block=1, transformer_depth=[0, 1],
               head_dim=16, context_dim=16, size_conditioning=True).eval()  # fmt: skip
    x, t, ctx = torch.randn(2, 4, 8, 16), torch.tensor([10.0, 500.0]), torch.randn(2, 3, 16)
    metas = [{"original_size": [100, 200], "crop_top_left": [0, 8], "target_size": [64, 128]},
             {"original_size": [64, 128], "crop_top_left": [0, 0], "target_size": [64, 128]}]  # fmt: skip
    size = size_conditions(metas)
    assert size.tolist()[0] == [100, 200, 0, 8, 64, 128]
    with torch.no_grad():
        a, b = net(x, t, ctx, size_cond=size), net(x, t, ctx, size_cond=torch.zeros_like(size))
    assert a.shape == x.shape and (a - b).abs().max() > 1e-4  # the conditioning reaches the output
    with pytest.raises(ValueError, match="size_cond"):
        net(x, t, ctx)
    with pytest.raises(ValueError, match="size and crop conditioning"):
        to_diffusers(net)
    with pytest.raises(ValueError, match="original_size"):
        size_conditions([{"source_size": [3, 4]}])


@pytest.mark.parametrize("width,height", [(48, 85), (85, 48)])
def test_size_conditioning_of_a_bucketed_sample_is_sdxls_time_ids(width, height):
    """A randomly cropped bucketed sample's ``size_cond`` equals the ``time_ids`` diffusers' SDXL pipeline builds
    (``_get_add_time_ids(original (h, w), crop (top, left), target (h, w))``) from what the image shows: its decoded
    size, the bucket, and the crop's corner read back from pixels that hold their own row and column."""
    diffusers = pytest.importorskip("diffusers")
    from types import SimpleNamespace

    from emu.data.samples import size_conditions
    from emu.diffusion.convert import to_diffusers
    from emu.diffusion.unet import UNet

    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    img = Image.fromarray(np.stack([rows, cols, np.zeros_like(rows)], -1).astype(np.uint8))
    buckets = [(48, 64), (64, 48)]  # each image covers its bucket at its own size: cropped, never resized
    torch.manual_seed(3)
    out = SamplePreparer(buckets=buckets, crop="random")({"key": "k", "image": png_bytes(img), "caption": "c"})
    pixels = torch.round((out["image"] * 0.5 + 0.5) * 255)
    top, left = int(pixels[0, 0, 0]), int(pixels[1, 0, 0])
    assert top + left > 0  # the crop moved
    bucket_w, bucket_h = nearest_bucket(width, height, buckets)
    unet = to_diffusers(UNet(in_channels=4, out_channels=4, block_channels=[32, 64], layers_per_block=1,
                             transformer_depth=[0, 1], head_dim=16, context_dim=16, pooled_dim=12,
                             addition_time_embed_dim=8))  # fmt: skip
    sdxl = diffusers.StableDiffusionXLPipeline._get_add_time_ids(
        SimpleNamespace(unet=unet), (height, width), (top, left), (bucket_h, bucket_w), dtype=torch.float32,
        text_encoder_projection_dim=12,
    )  # fmt: skip
    assert torch.equal(size_conditions([out["meta"]]), sdxl)

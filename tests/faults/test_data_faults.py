"""Bad data at scale: missing, truncated and corrupt shards are skipped and counted mid-stream; a run whose skip
rate passes data.max_skip_rate stops with a message instead of training on almost nothing."""

import io

import pytest

from emu.mini import haystack
from tests.conftest import write_shards
from tests.faults.common import stage_overrides, tail, train


@pytest.fixture
def tiny(tiny_autoencoder, tiny_clip, tiny_t5):
    return tiny_autoencoder, tiny_clip, tiny_t5


def _shards(tmp_path):
    folder = tmp_path / "shards"
    haystack.write_shards(folder, 32, resolution=32, shard_size=4, progress=False)  # 00000..00007.tar
    data = (folder / "00002.tar").read_bytes()
    (folder / "00002.tar").write_bytes(data[: len(data) // 3])  # truncated in the middle of a member
    (folder / "00005.tar").write_bytes(b"\x00garbage, not a tar at all" * 100)  # corrupt
    return [str(folder / f"{i:05d}.tar") for i in range(8)] + [str(folder / "00099.tar")]  # one missing


def test_bad_shards_are_skipped_and_counted_mid_stream(tmp_path, tiny):
    shards = ",".join(_shards(tmp_path))
    overrides = [*stage_overrides("stage1", tiny), "data=webdataset", f"data.source.shards=[{shards}]",
                 "~data.source.n_train", "~data.source.n_val", "data.source.val_fraction=0.0", "trainer.max_steps=6",
                 "++trainer.limit_val_batches=0"]  # fmt: skip
    r = train(tmp_path / "run", overrides)
    assert r.returncode == 0, tail(r)
    summary = next(line for line in r.stdout.splitlines() if line.strip().startswith("data:"))
    for reason in ("missing_shard", "truncated_shard"):
        assert reason in summary, summary


def test_a_run_whose_skip_rate_passes_the_limit_stops_with_a_message(tmp_path, tiny):
    folder = tmp_path / "mostly_bad"
    samples = []
    for i in range(40):
        image, meta = haystack.make_sample(0, i, 32)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        png = buf.getvalue() if i % 3 == 0 else b"not an image"  # two thirds unusable
        samples.append({"__key__": meta["key"], "png": png, "txt": meta["caption"]})
    write_shards(folder, samples, per_shard=10)
    overrides = [*stage_overrides("stage1", tiny), "data=webdataset", f"data.source.shards={folder}/*.tar",
                 "~data.source.n_train", "~data.source.n_val", "data.source.val_fraction=0.0", "trainer.max_steps=20",
                 "++trainer.limit_val_batches=0", "data.max_skip_rate=0.3", "data.skip_rate_min_samples=8",
                 "callbacks.data_health.every_n_batches=1"]  # fmt: skip
    r = train(tmp_path / "run", overrides)
    assert r.returncode == 3, tail(r)
    assert "data.max_skip_rate=0.3" in r.stderr and "not_an_image" in r.stderr, tail(r)

"""The benchmark scripts run on their tiny configs (a smoke test, not a timing): the numbers are there and
positive, ours and diffusers compute the same outputs before being timed, and the JSON line comes last."""

import json
import sys

import pytest

from tests.conftest import ROOT

pytest.importorskip("diffusers")
sys.path.insert(0, str(ROOT / "bench"))

import autoencoder_step
import sampling
import unet_step

COMPARISON_KEYS = {"images_per_second", "ms_per_step", "round_seconds", "peak_memory_mb", "tflops_per_second", "mfu"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _last_json_line(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("script", [unet_step, autoencoder_step], ids=["unet_step", "autoencoder_step"])
def test_training_step_benchmarks(script, capsys):
    r = script.main(["--config", "tiny", "--device", "cpu", "--steps", "1", "--rounds", "2", "--warmup", "1"])
    assert _last_json_line(capsys) == json.loads(json.dumps(r))
    assert r["config"] == "tiny" and r["batch"] > 0 and r["params"] > 0
    assert r["max_rel_diff"] < 1e-4  # the same function, checked before timing
    for name in ("ours", "diffusers"):
        assert set(r[name]) == COMPARISON_KEYS
        assert r[name]["images_per_second"] > 0 and len(r[name]["round_seconds"]) == 2
        assert r[name]["peak_memory_mb"] is None and r[name]["mfu"] is None  # CUDA only
    assert r["ratio"] > 0 and r["flops_per_step"] > 0


def test_training_step_benchmark_refuses_different_functions(monkeypatch):
    """If the two networks disagree, nothing is timed."""
    ours = unet_step.ours_forward
    monkeypatch.setattr(unet_step, "ours_forward", lambda net: lambda i: ours(net)(i) + 0.1)
    with pytest.raises(RuntimeError, match="disagree"):
        unet_step.main(["--config", "tiny", "--device", "cpu", "--steps", "1", "--rounds", "1"])


def test_sampling_benchmark(capsys):
    r = sampling.main(["--config", "tiny", "--device", "cpu", "--steps", "2", "3"])
    assert _last_json_line(capsys) == json.loads(json.dumps(r))
    assert [row["steps"] for row in r["results"]] == [2, 3]
    assert all(row["seconds_per_image"] > 0 and row["images_per_second"] > 0 for row in r["results"])
    assert r["decode_seconds_per_image"] > 0 and r["images"] == 2


def test_named_configs_build():
    """The mini and paper configs resolve from conf/ (nothing is instantiated)."""
    assert unet_step.unet_kwargs("mini")["context_dim"] == 128
    paper = unet_step.unet_kwargs("paper_reduced")
    assert paper["block_channels"] == [384, 768, 1536] and paper["transformer_depth"] == [0, 1, 2]
    assert autoencoder_step.autoencoder_kwargs("paper")["latent_channels"] == 16
    assert autoencoder_step.autoencoder_kwargs("mini")["fourier_frequencies"] == []


def test_stage1_step_benchmark_runs_the_real_step_and_pipeline(tiny_autoencoder, tiny_clip, tiny_t5, capsys):
    import stage1_step

    from tests.conftest import tiny_stage1_overrides

    r = stage1_step.main(["experiment=mini/stage1_pretrain", "data.source.n_train=16", "data.batch_size=4",
                          "data.resolution=32", "data.num_workers=0", "steps=1", "batches=2", "warmup=1",
                          *tiny_stage1_overrides(tiny_autoencoder, tiny_clip, tiny_t5)])  # fmt: skip
    assert _last_json_line(capsys) == json.loads(json.dumps(r))
    assert r["pipeline_images_per_second"] > 0 and r["step_images_per_second"] > 0 and not r["precomputed"]
    assert r["pipeline_over_step"] == pytest.approx(r["pipeline_images_per_second"] / r["step_images_per_second"],
                                                    rel=0.01)  # fmt: skip

"""Stage-2 checkpoint selection, the win-rate maths, the judges' faithfulness rule, CLIP score against
torchmetrics, and eval.py end to end on tiny models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from emu.diffusion.selection import CheckpointSelection
from emu.errors import ConfigError
from emu.evaluation.winrate import compare, paired_outcomes, pooled_win_rates, win_rates
from emu.mini.haystack import BACKGROUNDS, parse_caption
from emu.mini.judge import PRESENCE_GROUPS, faithfulness
from tests.conftest import tiny_stage1_overrides

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ win rates
def test_all_wins_is_100_percent_with_a_degenerate_interval():
    r = win_rates(paired_outcomes([2.0] * 50, [1.0] * 50))
    assert r["win"] == 1.0 and r["loss"] == 0.0 and r["win_ci"] == [1.0, 1.0] and r["win_rate"] == 1.0


def test_symmetric_outcomes_give_50_percent_with_an_interval_around_it():
    rng = np.random.default_rng(0)
    a = rng.normal(size=200)
    r = compare(np.concatenate([a, -a]), np.concatenate([-a, a]))  # every win mirrored by a loss
    assert r["win"] == r["loss"] == 0.5 and r["win_rate"] == 0.5
    lo, hi = r["win_rate_ci"]
    assert lo < 0.5 < hi and hi - lo < 0.15
    lo, hi = r["win_ci"]
    assert lo < 0.5 < hi


def test_tie_band_and_missing_scores():
    out = paired_outcomes([1.0, 1.1, 2.0, float("nan"), 0.0], [1.0, 1.0, 1.0, 1.0, 1.0], tie_band=0.25)
    assert out.tolist() == [0, 0, 1, -1]  # the NaN pair is dropped
    r = win_rates(out)
    assert (r["win"], r["tie"], r["loss"], r["n"]) == (0.25, 0.5, 0.25, 4)
    with pytest.raises(ValueError):
        paired_outcomes([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="no judged pairs"):
        win_rates(paired_outcomes([float("nan")], [1.0]))


def test_pooled_win_rates_point_estimates_are_over_every_pair():
    r = pooled_win_rates([[1, 1, 0], [-1, 1, -1]], n_boot=200)
    assert (r["n"], r["n_seeds"], r["n_prompts"], r["n_boot"], r["level"]) == (6, 2, 3, 200, 0.95)
    assert (r["win"], r["tie"], r["loss"]) == (0.5, 1 / 6, 2 / 6) and r["win_rate"] == 0.5 + 1 / 12
    for k in ("win", "tie", "loss", "win_rate"):
        lo, hi = r[f"{k}_ci"]
        assert 0 <= lo <= r[k] <= hi <= 1
    assert pooled_win_rates([[1] * 30, [1] * 30])["win_ci"] == [1.0, 1.0]


def test_pooled_interval_holds_the_spread_between_seeds_and_no_more():
    """Seeds that disagree (one all wins, one all losses): the two-level interval spans nearly everything, the
    prompt-only interval of the same pairs does not. Identical seeds on the same prompts hold no more information
    than one: the interval is one seed's width, not the narrower width of their pairs concatenated (which a draw of
    the prompts per seed would give: the seeds are crossed with the prompts, not nested in them)."""
    disagree = [[1] * 64, [-1] * 64]
    two, flat = pooled_win_rates(disagree), win_rates(np.concatenate(disagree))
    assert two["win"] == flat["win"] == 0.5
    assert two["win_ci"][0] <= 0.05 and two["win_ci"][1] >= 0.95 and flat["win_ci"][1] - flat["win_ci"][0] < 0.3
    o = np.random.default_rng(1).choice([1, 0, -1], size=256, p=[0.7, 0.1, 0.2])

    def width(r):
        return r["win_ci"][1] - r["win_ci"][0]

    three, one, concatenated = pooled_win_rates([o, o, o]), win_rates(o), win_rates(np.concatenate([o, o, o]))
    assert three["win"] == one["win"] and abs(width(three) - width(one)) < 0.1 * width(one)
    assert width(three) > 1.4 * width(concatenated)  # sqrt(3) wider in theory


def test_pooled_win_rates_are_seeded_and_refuse_bad_input():
    runs = np.random.default_rng(0).choice([1, 0, -1], size=(3, 40))
    assert pooled_win_rates(runs, seed=3) == pooled_win_rates(runs, seed=3)
    assert pooled_win_rates(runs, seed=3)["win_ci"] != pooled_win_rates(runs, seed=4)["win_ci"]
    with pytest.raises(ValueError, match="no seeds"):
        pooled_win_rates([])
    with pytest.raises(ValueError, match="the same prompts"):
        pooled_win_rates([[1, 1], [1]])
    with pytest.raises(ValueError, match="the same prompts"):
        pooled_win_rates([[], []])


# ------------------------------------------------------------------------------------------------ judges
def _logits_for(caption: str, wrong: str | None = None) -> dict[str, torch.Tensor]:
    """Judge outputs that show exactly the caption's attributes (except the group named ``wrong``)."""
    parsed = parse_caption(caption)
    pred = {g: torch.zeros(1, len(v)) for g, v in PRESENCE_GROUPS.items()}
    pred["background"] = torch.zeros(1, len(BACKGROUNDS))
    bg = list(BACKGROUNDS).index(parsed["background"])
    pred["background"][0, (bg + 1) % len(BACKGROUNDS) if wrong == "background" else bg] = 5.0
    for obj in parsed["objects"]:
        for g in ("shape", "color", "size", "position"):
            i = PRESENCE_GROUPS[g].index(obj[g])
            pred[g][0, (i + 1) % len(PRESENCE_GROUPS[g]) if wrong == g else i] = 5.0
    return pred


def test_faithfulness_counts_the_prompts_attributes_the_image_shows():
    one = "a large red circle in the top left on a navy background"
    two = "a small blue star at the bottom and a large red circle in the top left on a navy background"
    assert faithfulness(_logits_for(one), [one]).item() == 1.0
    assert faithfulness(_logits_for(one, wrong="background"), [one]).item() == pytest.approx(4 / 5)
    assert faithfulness(_logits_for(one, wrong="shape"), [one]).item() == pytest.approx(4 / 5)
    assert faithfulness(_logits_for(two), [two]).item() == 1.0
    assert torch.isnan(faithfulness(_logits_for(one), ["a photo of a cat"])).all()  # nothing to check


def test_pixel_judge_scores_and_reports_its_accuracy(tiny_judge):
    from emu.mini.judge import PixelJudge
    from emu.mini.sets import heldout_haystack

    judge = PixelJudge.from_checkpoint(tiny_judge)
    images, metas = heldout_haystack(6, seed=2)
    scores = judge.score(images, [m["caption"] for m in metas])
    assert scores["appeal"].shape == scores["faithfulness"].shape == (6,)
    assert ((scores["faithfulness"] >= 0) & (scores["faithfulness"] <= 1)).all()
    acc = judge.accuracy(n=16)
    assert {"appeal_mae", "appeal_pearson_r", "shape_acc", "background_acc", "faithfulness_own_captions"} <= set(acc)
    assert {"shape_acc_clean", "background_acc_clean", "n_single_object_clean"} <= set(acc)
    with pytest.raises(FileNotFoundError, match="experiment=mini/judge"):
        PixelJudge.from_checkpoint(tiny_judge.parent / "missing.ckpt")


def test_judge_with_average_and_max_pooling_sizes_its_heads():
    from emu.mini.judge import HaystackJudge

    judge = HaystackJudge(global_pool="catavgmax").eval()
    assert judge.appeal_head.in_features == 2 * judge.backbone.num_features
    out = judge(torch.zeros(2, 3, 64, 64))
    assert out["appeal"].shape == (2,) and out["shape"].shape == (2, 5) and out["background"].shape == (2, 8)


# ------------------------------------------------------------------------------------------------ CLIP score
def test_clip_score_is_torchmetrics_clipscore(tiny_clip):
    from emu.evaluation.prompt_following import torchmetrics_clip_score
    from emu.text.clip import ClipEmbedder

    torch.manual_seed(0)
    images = torch.rand(6, 3, 32, 32) * 2 - 1
    images = ((images + 1) * 127.5).round() / 127.5 - 1  # exactly representable as uint8
    prompts = ["a large red circle in the top left on a navy background", "a small blue star at the bottom"] * 3
    ours = ClipEmbedder(tiny_clip)
    cos = (ours.embed_images(images) * ours.embed_texts(prompts)).sum(-1)
    expected = max(100 * cos.mean().item(), 0.0)  # torchmetrics clamps the mean, not each pair
    assert torchmetrics_clip_score(tiny_clip, images, prompts, batch_size=4) == pytest.approx(expected, abs=1e-3)


# ------------------------------------------------------------------------------------------------ stage 2
class DecliningJudge:
    """Appeal falls with every scoring: early stopping with patience 1 must end the run."""

    name = "declining"
    moved_to: str | None = None  # where checkpoint selection put it (the class keeps it: Hydra builds the instance)

    def __init__(self):
        self.calls = 0

    def to(self, device):
        DecliningJudge.moved_to = str(device)
        return self

    def score(self, images, prompts):
        self.calls += 1
        n = len(prompts)
        return {"appeal": torch.full((n,), 10.0 - self.calls), "faithfulness": torch.full((n,), 0.5)}


def _stage2_cfg(tmp_path, request, *extra):
    from tests.test_train import compose_train

    fixtures = (request.getfixturevalue(f) for f in ("tiny_autoencoder", "tiny_clip", "tiny_t5"))
    return compose_train([
        "experiment=mini/stage2_quality_tune", f"paths.output_dir={tmp_path}",
        f"model.init_from={request.getfixturevalue('tiny_stage1_checkpoint')}",
        f"data.source.root={request.getfixturevalue('tiny_curated')}", "data.source.val_fraction=0.25",
        "data.batch_size=2", "data.num_workers=0", "trainer.check_val_every_n_epoch=1000", "model.warmup_steps=1",
        f"callbacks.selection.judge.clip={request.getfixturevalue('tiny_clip')}", "callbacks.selection.limit=2",
        f"callbacks.selection.judge.head={request.getfixturevalue('aesthetic_head')}",
        "callbacks.selection.sampling.steps=2", "callbacks.selection.every_n_steps=2",
        *tiny_stage1_overrides(*fixtures), *extra,
    ])  # fmt: skip


def test_quality_tuning_scores_keeps_and_marks_checkpoints(tmp_path, request):
    import train

    train.train(_stage2_cfg(tmp_path, request, "trainer.max_steps=4"))
    select = tmp_path / "checkpoints" / "select"
    summary = json.loads((select / "selection.json").read_text())
    assert [r["step"] for r in summary["rows"]] == [0, 2, 4]  # baseline before the first step, then every 2
    assert summary["rows"][0]["ckpt"] is None and all(Path(r["ckpt"]).is_file() for r in summary["rows"][1:])
    assert summary["best"]["step"] in (2, 4)
    assert (select / "best.ckpt").resolve() == Path(summary["best"]["ckpt"]).resolve()
    ckpt = torch.load(select / "step_0000002.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2  # initialised from stage 1, counted from 0


def test_quality_tuning_can_keep_ema_weights_only(tmp_path, request):
    """keep=ema (the paper-scale setting): at each scoring an export folder with the EMA weights alone, the frozen
    models referenced rather than copied, no optimizer state; best/ links to the best one and loads for sampling."""
    import train
    from emu.diffusion.checkpoints import load_diffusion
    from emu.diffusion.export import read_export_config

    train.train(_stage2_cfg(tmp_path, request, "trainer.max_steps=4", "+callbacks.selection.keep=ema"))
    select = tmp_path / "checkpoints" / "select"
    summary = json.loads((select / "selection.json").read_text())
    assert summary["keep"] == "ema" and [r["step"] for r in summary["rows"]] == [0, 2, 4]
    kept = select / "step_0000002"
    assert sorted(p.name for p in kept.iterdir()) == ["config.json", "model.safetensors"]  # no frozen copies
    config = read_export_config(kept)
    assert config["weights"] == "ema" and config["step"] == 2 and config["frozen"] == "referenced"
    assert (select / "best").resolve() == Path(summary["best"]["ckpt"]).resolve()
    model = load_diffusion(select / "best")
    assert model.exported_weights == "ema" and model.trained_steps == summary["best"]["step"]
    with pytest.raises(ConfigError, match="keep"):
        CheckpointSelection(judge=DecliningJudge(), prompts=["a"], dirpath=tmp_path, keep="everything")


def test_quality_tuning_stops_early_when_appeal_stops_improving(tmp_path, request):
    import train

    judge = "+callbacks.selection.judge._target_=tests.test_evaluation.DecliningJudge"
    cfg = _stage2_cfg(tmp_path, request, "trainer.max_steps=20", "callbacks.selection.patience=1",
                      "~callbacks.selection.judge", judge)  # fmt: skip
    train.train(cfg)
    summary = json.loads((tmp_path / "checkpoints" / "select" / "selection.json").read_text())
    assert summary["stopped"].startswith("step 4: appeal has not improved")
    assert DecliningJudge.moved_to == "cpu"  # the callback moved its judge to the rank's device
    assert [r["step"] for r in summary["rows"]] == [0, 2, 4]
    assert summary["best"]["step"] == 2


# ------------------------------------------------------------------------------------------------ eval.py
def compose_eval(overrides: list[str]):
    out = next(o.split("=", 1)[1] for o in overrides if o.startswith("out="))
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("eval", overrides=[*overrides, f"paths.output_dir={out}"])


def test_eval_compares_two_checkpoints_end_to_end(tmp_path, tiny_stage1_checkpoint, tiny_clip, tiny_judge):
    import eval as eval_py

    cfg = compose_eval([
        "experiment=mini/eval", f"a={tiny_stage1_checkpoint}", f"b={tiny_stage1_checkpoint}", "name_a=tuned",
        "name_b=pretrained", "prompts=haystack:6", "sampling.steps=2", f"clip={tiny_clip}", "aesthetic=null",
        f"judge.path={tiny_judge}", "checks.judge_accuracy.n=16", "checks.clip_accuracy.n=100",
        "fid.reference=haystack_needles:12", "fid.inception=false", f"fid.cache_dir={tmp_path}/cache",
        f"out={tmp_path}/eval", "bootstrap=200", "logger=csv", "checks.headroom.n=4",
    ])  # fmt: skip
    out = eval_py.run(cfg)
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["models"]) == {"tuned", "pretrained"}
    for model in m["models"].values():
        assert model["n_images"] == 6 and 0 <= model["clip_score"] <= 100
        fd = next(v for k, v in model["frechet"].items() if k.startswith("fd_clip"))
        assert fd["value"] >= 0 and fd["n_reference"] == 12
    same = m["paired"]["appeal"]  # the same checkpoint on the same prompts and seeds: identical images, all ties
    assert same["tie"] == 1.0 and same["win"] == same["loss"] == 0.0
    assert "faithfulness" in m["paired"] and "appeal_pearson_r" in m["judge_accuracy"]
    assert {"t2i_top1", "zeroshot_shape", "zeroshot_position", "zeroshot_size"} <= set(m["clip_accuracy"])
    report = (out / "report.md").read_text()
    assert "tuned vs pretrained" in report and "CLIPScore" in report and "trust the judge" in report
    assert "trust the CLIP" in report
    head = m["headroom"]  # the judge on 4 held-out scenes as the corpus shows them and as needles, and reconstructed
    assert head["n"] == 4 and set(head["appeal"]) == {"corpus", "needles", "corpus_reconstructed",
                                                        "needles_reconstructed"}  # fmt: skip
    assert head["needles_vs_corpus_reconstructed"]["n"] == 4 and "Headroom" in report and "generated: tuned" in report
    assert (out / "side_by_side.png").is_file() and len((out / "scores.jsonl").read_text().splitlines()) == 6
    assert len((out / "samples_tuned" / "metadata.jsonl").read_text().splitlines()) == 6
    assert list((tmp_path / "cache").glob("*.npz"))  # the reference statistics are cached
    logged = (out / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "paired/appeal/win_rate" in logged and "models/tuned/clip_score" in logged


def _sample_folder(folder: Path, seeds: list[int]) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    rows = []
    for i, seed in enumerate(seeds):
        Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(folder / f"{i:05d}.png")
        rows.append(json.dumps({"file": f"{i:05d}.png", "prompt": f"prompt {i}", "seed": seed}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def run_eval(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "eval.py"), *args, f"hydra.run.dir={cwd}/run"], cwd=cwd,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_eval_refuses_unpaired_folders_and_missing_inception(tmp_path):
    a = _sample_folder(tmp_path / "a", [0, 1, 2])
    b = _sample_folder(tmp_path / "b", [0, 1, 3])
    out = run_eval(f"a={a}", f"b={b}", "fid.inception=false", cwd=tmp_path)
    assert out.returncode == 2
    assert "config error: b: a paired comparison needs the same seeds" in out.stderr and "#2" in out.stderr
    missing = tmp_path / "weights" / "inception-2015-12-05.pt"
    out = run_eval(f"a={a}", f"fid.inception={missing}", cwd=tmp_path)
    assert out.returncode == 2 and "fid.inception" in out.stderr and "inception-2015-12-05.pt" in out.stderr


def test_eval_measures_autoencoders(tmp_path, tiny_autoencoder, tiny_clip, tiny_judge):
    import eval as eval_py

    cfg = compose_eval(["experiment=mini/eval", f"a={tiny_autoencoder}", f"b={tiny_autoencoder}",
                        "autoencoder.images=haystack_needles:8", f"clip={tiny_clip}", "fid.inception=false",
                        f"out={tmp_path}/eval", f"judge.path={tiny_judge}"])  # fmt: skip
    m = json.loads((eval_py.run(cfg) / "metrics.json").read_text())
    assert len(m["autoencoders"]) == 2  # the same folder twice: named A_... and B_...
    ae = next(iter(m["autoencoders"].values()))
    assert ae["latent_channels"] == 16 and np.isfinite(ae["psnr"]) and 0 <= ae["ssim"] <= 1
    assert any(k.startswith("rfd_clip") for k in ae)
    assert isinstance(ae["lpips"], float) or ae["lpips"].startswith("unavailable")
    assert set(ae["judge_appeal"]) == {"originals", "reconstructions"}
    assert "Autoencoders" in (tmp_path / "eval" / "report.md").read_text()
    base = m["baselines"]  # the fixed maps every autoencoder must beat, on the same images
    assert base["8x8 average pool + bilinear"]["psnr"] > base["mean colour"]["psnr"]


def test_reconstruction_baselines_are_exact_where_they_should_be():
    from emu.evaluation.reconstruction import mean_colour, pool_bilinear, reconstruction_metrics

    flat = torch.rand(4, 3, 1, 1).expand(4, 3, 32, 32) * 2 - 1
    assert torch.allclose(mean_colour(flat), flat) and torch.allclose(pool_bilinear(flat), flat, atol=1e-6)
    ramp = torch.linspace(-1, 1, 32).view(1, 1, 1, 32).expand(2, 3, 32, 32)
    edge = torch.where(ramp > 0, 1.0, -1.0)  # a hard edge: pooling loses it, the mean colour more
    assert reconstruction_metrics(pool_bilinear, edge)["psnr"] > reconstruction_metrics(mean_colour, edge)["psnr"]
    # halves at 0 and 1 (in [0, 1]): the mean 0.5 is off by 0.5 everywhere, PSNR = 10 log10(1 / 0.25)
    assert reconstruction_metrics(mean_colour, edge)["psnr"] == pytest.approx(10 * np.log10(4), abs=1e-4)


class _BrightnessJudge:
    """Appeal = 10 x mean brightness: needles (angled light, no darkening flaw) and corpus scenes differ."""

    resolution = 32

    def score(self, images, prompts):
        return {"appeal": 10 * (images.mean((1, 2, 3)) + 1) / 2, "faithfulness": torch.ones(len(images))}


class _IdentityAutoencoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def encode(self, x):
        from emu.autoencoder.model import DiagonalGaussian

        return DiagonalGaussian(torch.cat([x, torch.full_like(x, -30.0)], 1))

    def decode(self, z):
        return z * self.w

    def forward(self, x):
        return self.decode(self.encode(x).mode())


def test_headroom_scores_the_same_scenes_as_corpus_and_as_needles():
    from emu.mini.headroom import judge_headroom, scene_pairs

    corpus, needles, captions = scene_pairs(6, resolution=32)
    assert corpus.shape == needles.shape == (6, 3, 32, 32) and len(captions) == 6
    assert [parse_caption(c) is not None for c in captions] == [True] * 6
    assert not torch.equal(corpus, needles)
    h = judge_headroom(_BrightnessJudge(), 6, _IdentityAutoencoder(), n_boot=100)
    judge = _BrightnessJudge()
    assert h["appeal"]["needles"] == pytest.approx(judge.score(needles, captions)["appeal"].mean().item())
    assert h["appeal"]["needles_reconstructed"] == pytest.approx(h["appeal"]["needles"])  # an exact autoencoder
    r = h["needles_vs_corpus"]
    assert r["n"] == 6 and r["win"] + r["tie"] + r["loss"] == pytest.approx(1.0)
    assert "needles_vs_corpus" in judge_headroom(_BrightnessJudge(), 3, n_boot=10)  # no autoencoder: no reconstructions


def test_paper_scale_quality_tuning_wires_its_stopping_rule(tmp_path):
    """experiment=stage2_quality_tune spends no image on a validation split, selects by a preference judge given by
    path every 1000 steps, keeps EMA weights only there, stops by patience, and keeps one full checkpoint (last.ckpt);
    PickScore swaps in by its group."""
    from tests.test_train import compose_train

    cfg = compose_train(["experiment=stage2_quality_tune", f"paths.output_dir={tmp_path}"])
    assert cfg.data.source.val_fraction == 0 and cfg.trainer.limit_val_batches == 0
    sel = cfg.callbacks.selection
    assert sel._target_ == "emu.diffusion.selection.CheckpointSelection"
    assert sel.keep == "ema" and sel.patience and sel.every_n_steps == 1000
    assert sel.judge._target_ == "emu.curation.aesthetic.CurationJudge"  # not the evaluation's (pickscore, people)
    missing = {k for k in ("clip", "head") if OmegaConf.is_missing(sel.judge, k)}
    assert missing == {"clip", "head"} and OmegaConf.is_missing(sel, "prompts")  # by path: nothing downloaded
    assert cfg.callbacks.model_checkpoint.save_top_k == 0 and cfg.callbacks.model_checkpoint.save_last  # last only
    swapped = compose_train(["experiment=stage2_quality_tune", "judge@callbacks.selection.judge=pickscore",
                             "callbacks.selection.judge.path=/models/pickscore"])  # fmt: skip
    assert set(swapped.callbacks.selection.judge) == {"_target_", "path", "device"}  # no aesthetic keys left over


def test_eval_warns_when_the_selection_judge_also_scores(tmp_path):
    from emu.evaluation.run import same_judge_note

    select = tmp_path / "select"
    select.mkdir()
    (select / "best.ckpt").write_bytes(b"")
    assert same_judge_note(select / "best.ckpt", "tuned", DecliningJudge()) is None  # no selection record
    (select / "selection.json").write_text(json.dumps({"judge": "declining"}))
    assert "selected by the judge that scores it here (declining" in same_judge_note(
        select / "best.ckpt", "tuned", DecliningJudge()
    )
    (select / "selection.json").write_text(json.dumps({"judge": "aesthetic"}))
    assert same_judge_note(select / "best.ckpt", "tuned", DecliningJudge()) is None


def test_win_rates_by_tie_band_and_their_report_table(tmp_path):
    from emu.demo.report import tie_band_lines
    from emu.evaluation.winrate import tie_band_sweep

    a, b = [1.05, 1.2, 1.3, 0.4], [1.0, 1.0, 1.0, 1.0]  # A ahead by 0.05, 0.2, 0.3, behind by 0.6
    got = [(r["tie_band"], r["win"], r["tie"], r["loss"]) for r in tie_band_sweep(a, b, [0, 0.1, 0.25, 0.5], n_boot=50)]
    assert got == [(0.0, 0.75, 0.0, 0.25), (0.1, 0.5, 0.25, 0.25), (0.25, 0.25, 0.5, 0.25), (0.5, 0.0, 0.75, 0.25)]
    scores = tmp_path / "scores.jsonl"
    scores.write_text("".join(json.dumps({"tuned": {"appeal": x}, "base": {"appeal": y}}) + "\n" for x, y in zip(a, b)))
    table = "\n".join(tie_band_lines(scores, ["tuned", "base"], 0.25))
    assert "| 0.25 | 25.0% [" in table and "| 50.0% |" in table  # the 0.25 band: ties split half 25 + 25
    assert "The headline's band is 0.25. The default, 0.25 (`conf/eval.yaml`), was fixed" in table
    assert "headline's band" not in "\n".join(tie_band_lines(scores, ["tuned", "base"]))

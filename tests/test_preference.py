"""Diffusion-DPO and Diffusion-KTO (model.objective, emu/diffusion/preference.py): the losses against hand-computed
values; the module's reference is exactly the weights init_from gave (the loss is log 2 / KTO's 1/2 at step 0), stays
frozen while the model learns a batch, leaves checkpoints and resumes exactly; LoRA's reference is its base; the data:
Pick-a-Pic pairs, a pair task's confident pairs by the stated rules, the curation's human passes as likes."""

import json
import math

import lightning as L
import pytest
import torch

from emu.diffusion.preference import (
    dpo_logits,
    dpo_loss,
    implicit_reward,
    kto_loss,
    kto_reference_point,
    preference_settings,
)
from emu.errors import ConfigError
from tests.conftest import haystack_batch
from tests.test_lora import _trainer, lora_module


def test_dpo_loss_equals_hand_computed_values_and_diffusers_form():
    err_w, err_l, ref_w, ref_l = (torch.tensor([v]) for v in (0.1, 0.3, 0.2, 0.2))
    # r_w = (0.2 - 0.1) / 2 = 0.05, r_l = -0.05: logits 10 x 0.1 = 1; loss log(1 + e^-1)
    assert dpo_logits(err_w, err_l, ref_w, ref_l, 10.0).item() == pytest.approx(1.0)
    assert dpo_loss(err_w, err_l, ref_w, ref_l, 10.0).item() == pytest.approx(math.log1p(math.exp(-1)))
    g = torch.Generator().manual_seed(0)
    e = torch.rand(4, 8, generator=g)
    diffusers = -torch.nn.functional.logsigmoid(-0.5 * 5000 * ((e[0] - e[2]) - (e[1] - e[3])))
    assert torch.allclose(dpo_loss(e[0], e[1], e[2], e[3], 5000.0), diffusers)
    same = torch.rand(8, generator=g)  # the model equals its reference: log 2, whatever the errors
    assert torch.allclose(dpo_loss(same, same.flip(0), same, same.flip(0), 5000.0), torch.full((8,), math.log(2)))


def test_kto_loss_equals_hand_computed_values():
    err, ref = torch.tensor([0.1, 0.3]), torch.tensor([0.2, 0.2])
    assert implicit_reward(err, ref).tolist() == pytest.approx([0.05, -0.05])
    z0 = kto_reference_point(err, ref)
    assert z0.item() == 0.0  # mean reward 0 (clamped at 0 anyway)
    loss = kto_loss(err, ref, torch.tensor([True, False]), 10.0, z0, desirable_weight=2.0)
    s = 1 / (1 + math.exp(-0.5))  # both rewards are 0.5 on the right side of z0 once scaled by beta
    assert loss.tolist() == pytest.approx([2 * (1 - s), 1 - s])
    err, ref = torch.tensor([0.1, 0.1]), torch.tensor([0.3, 0.2])  # rewards 0.1, 0.05: z0 = 0.075
    z0 = kto_reference_point(err, ref)
    assert z0.item() == pytest.approx(0.075)
    loss = kto_loss(err, ref, torch.tensor([True, True]), 10.0, z0)
    assert loss.tolist() == pytest.approx([1 - 1 / (1 + math.exp(-0.25)), 1 - 1 / (1 + math.exp(0.25))])


def test_settings_are_checked():
    assert preference_settings("dpo", None) == {"beta": 5000.0, "desirable_weight": 1.0, "undesirable_weight": 1.0}
    for objective, settings, key in (("ppo", None, "model.objective"), ("dpo", {"bta": 1}, "model.preference"),
                                     ("kto", {"beta": 0}, "model.preference.beta")):  # fmt: skip
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            preference_settings(objective, settings)


def pair_batch(n=4):
    """Haystack images preferred to their colour-inverted selves (a preference a model can learn)."""
    batch = haystack_batch(n)
    return {**batch, "image_l": -batch["image"]}


class _Pairs(L.LightningDataModule):
    def __init__(self, batch):
        super().__init__()
        self.batch, self.resolution = batch, 32

    def train_dataloader(self):
        return torch.utils.data.DataLoader([self.batch] * 4, batch_size=None)


def dpo_module(ckpt, rank=0, objective="dpo", beta=200.0, **kw):
    return lora_module(ckpt, rank=rank, objective=objective, preference={"beta": beta}, **kw)


def test_dpo_starts_at_log_2_learns_the_pairs_and_keeps_its_reference(tiny_stage1_checkpoint):
    module = dpo_module(tiny_stage1_checkpoint, lr=2e-3)
    start = {k: v.clone() for k, v in module.unet.state_dict().items()}
    batch = pair_batch()
    g = lambda: torch.Generator().manual_seed(1)
    terms = module.objective_terms(batch, g(), drop=False)
    assert terms["loss"].item() == pytest.approx(math.log(2), abs=1e-6)  # the model is its reference, noise shared
    opt = torch.optim.Adam([p for m in module.trained_modules().values() for p in m.parameters()], lr=2e-3)
    for _ in range(25):  # one batch at one noise draw: overfit
        loss = module.diffusion_loss(batch, g(), drop=False)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = module.objective_terms(batch, g(), drop=False)
    assert after["loss"].item() < 0.5 * math.log(2) and after["accuracy"].item() == 1.0
    reference = module.reference.shadow["unet"].state_dict()
    assert all(torch.equal(reference[k], start[k]) for k in start)  # frozen: the weights init_from gave
    assert not all(torch.equal(module.unet.state_dict()[k], start[k]) for k in start)


def test_lora_dpo_refers_to_its_base_and_kto_starts_at_one_half(tiny_stage1_checkpoint):
    base = dpo_module(tiny_stage1_checkpoint, objective="sft")
    module = dpo_module(tiny_stage1_checkpoint, rank=4)
    assert module.reference is None  # LoRA: the base with its adapters bypassed, no copy
    with torch.no_grad():
        for p in module.adapters.parameters():
            p.add_(0.05)
    z = torch.randn(2, base.unet.config["in_channels"], 8, 8, generator=torch.Generator().manual_seed(0))
    cond = base.conditioning(["a red circle", "a blue star"], drop=False)
    sigma = torch.tensor([0.5, 2.0])
    with torch.no_grad():
        with module.reference_weights():
            ref = module.denoiser(z, sigma, **cond)
        moved = module.denoiser(z, sigma, **cond)
        expected = base.denoiser(z, sigma, **cond)
    assert torch.allclose(ref, expected, atol=1e-6) and not torch.allclose(moved, expected, atol=1e-4)

    kto = dpo_module(tiny_stage1_checkpoint, objective="kto")
    batch = haystack_batch()
    batch["meta"] = [{**m, "label": i % 2 == 0} for i, m in enumerate(batch["meta"])]
    terms = kto.objective_terms(batch, torch.Generator().manual_seed(0), drop=False)
    assert terms["loss"].item() == pytest.approx(0.5) and terms["desirable"].item() == 0.5
    batch["meta"][0]["label"] = "yes"
    with pytest.raises(ConfigError, match="label"):
        kto.objective_terms(batch, drop=False)


def test_preference_objectives_refuse_what_they_cannot_train(tiny_stage1_checkpoint):
    module = dpo_module(tiny_stage1_checkpoint)
    with pytest.raises(ConfigError, match="data=pairs"):
        module.objective_terms(haystack_batch(), drop=False)  # no image_l: not pairs
    with pytest.raises(ConfigError, match="precomputed latents"):
        module.objective_terms({**pair_batch(), "latent": torch.zeros(4, 8, 4, 4)}, drop=False)
    hp = dict(torch.load(tiny_stage1_checkpoint, map_location="cpu", weights_only=False)["hyper_parameters"])
    orphan = type(module)(**{**hp, "objective": "dpo", "init_from": None, "val_prompts": None})
    with pytest.raises(ConfigError, match=r"model\.init_from"), orphan.reference_weights():
        pass


def test_fsdp_keeping_gathered_weights_is_refused_and_the_reference_runs_without_dropout(tiny_stage1_checkpoint):
    """Swapping the reference in under FSDP with reshard_after_forward=false would leave its gathered weights in place
    for the model's own pass; and the reference runs in eval mode, as a frozen copy would (no dropout)."""
    from types import SimpleNamespace

    from emu.training.distributed import FSDPStrategy

    module = dpo_module(tiny_stage1_checkpoint)
    strategy = object.__new__(FSDPStrategy)  # no process group needed to refuse
    strategy.reshard_after_forward = False
    module._trainer = SimpleNamespace(strategy=strategy)
    with pytest.raises(ConfigError, match=r"reshard_after_forward"):
        module.configure_model()
    module._trainer = None
    module.train()
    with module.reference_weights():
        assert not module.unet.training and not module.conditioner.proj.training
    assert module.unet.training and module.conditioner.proj.training


def test_dpo_checkpoints_leave_the_reference_out_load_for_sampling_and_resume_exactly(tiny_stage1_checkpoint,
                                                                                      tmp_path):  # fmt: skip
    from emu.diffusion.checkpoints import load_for_sampling

    data = _Pairs(pair_batch())
    straight = dpo_module(tiny_stage1_checkpoint, lr=1e-3, warmup_steps=0)
    _trainer(tmp_path / "a", 4).fit(straight, datamodule=data)
    first = dpo_module(tiny_stage1_checkpoint, lr=1e-3, warmup_steps=0)
    _trainer(tmp_path / "b", 2).fit(first, datamodule=data)
    resumed = dpo_module(tiny_stage1_checkpoint, lr=1e-3, warmup_steps=0)
    _trainer(tmp_path / "b", 4).fit(resumed, datamodule=data, ckpt_path=tmp_path / "b/ckpt/last.ckpt")
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert float(straight.ema.images_seen) == 4 * 4 * 2  # 4 steps of 4 pairs: the EMA counts images
    ckpt = torch.load(tmp_path / "a/ckpt/last.ckpt", map_location="cpu", weights_only=False)
    assert not any(k.startswith("reference.") for k in ckpt["state_dict"])
    assert ckpt["hyper_parameters"]["objective"] == "dpo"
    model = load_for_sampling(tmp_path / "a/ckpt/last.ckpt")
    assert model.reference is None  # sampling needs none
    reference = {f"reference.{k}": v for k, v in straight.reference.state_dict().items()}
    consolidated = {**ckpt, "state_dict": {**ckpt["state_dict"], **reference}}
    torch.save(consolidated, tmp_path / "consolidated.ckpt")  # as a sharded (FSDP) checkpoint consolidated holds it
    assert load_for_sampling(tmp_path / "consolidated.ckpt").reference is None
    images = model.sample(["a red circle"], [0], SamplingSteps())
    assert images.shape[0] == 1 and torch.isfinite(images).all()


def SamplingSteps():
    from emu.diffusion.pipeline import SamplingSettings

    return SamplingSettings(steps=2, resolution=32)


# ------------------------------------------------------------------------------------------------------------ the data
def _png(path, color, size=(40, 40)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, color)
    img.paste((255, 255, 255), (0, 0, size[0] // 4, size[1]))  # a white band on the left: a flip shows
    img.save(path)


def test_pick_a_pic_pairs_read_preferred_first_skip_ties_and_count_bad_pairs(tmp_path):
    from emu.data.datamodule import EmuDataModule
    from emu.data.pairs import PairSource

    for name, color in (("r", (255, 0, 0)), ("g", (0, 255, 0)), ("b", (0, 0, 255))):
        _png(tmp_path / "img" / f"{name}.png", color)
    _png(tmp_path / "img" / "small.png", (0, 0, 0), size=(32, 32))
    rows = [{"caption": "red over green", "jpg_0": "img/r.png", "jpg_1": "img/g.png", "label_0": 1},
            {"caption": "blue over red", "jpg_0": "img/r.png", "jpg_1": "img/b.png", "label_0": 0, "votes": 3},
            {"caption": "a tie", "jpg_0": "img/r.png", "jpg_1": "img/b.png", "label_0": 0.5},
            {"caption": "sizes differ", "jpg_0": "img/r.png", "jpg_1": "img/small.png", "label_0": 1},
            {"caption": "no label", "jpg_0": "img/r.png", "jpg_1": "img/g.png"}]  # fmt: skip
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = PairSource(str(tmp_path), val_fraction=0.0)
    assert (source.size("train"), source.ties, source.malformed) == (3, 1, 1)
    dm = EmuDataModule(source, resolution=32, batch_size=3, hflip=1.0, drop_last=False)
    batch = next(iter(dm.dataloader("train", shuffle=False)))
    assert batch["caption"] == ["red over green", "blue over red"]  # the mismatched pair is skipped, not fed
    assert dm.skipped["train"] == {"pair_mismatch": 1}
    w, other = batch["image"], batch["image_l"]
    assert w[0, 0].mean() > 0.5 and other[0, 1].mean() > 0.5  # red preferred to green
    assert w[1, 2].mean() > 0.5 and other[1, 0].mean() > 0.5  # label_0 = 0: blue (image 1) preferred to red
    assert batch["meta"][1]["votes"] == 3 and batch["meta"][0]["flipped"]
    assert (w[:, :, :, -4:] > 0.9).all() and (other[:, :, :, -4:] > 0.9).all()  # both flipped: the band went right
    with pytest.raises(ConfigError, match=r"data\.source\.root"):
        PairSource(str(tmp_path / "img"))  # no pairs.jsonl


@pytest.fixture
def pair_task(tmp_path):
    from emu.annotate.tasks import make_pair_task
    from emu.utils.sample_folder import write_sample_folder

    g = torch.Generator().manual_seed(0)
    prompts = [f"a red circle number {i}" for i in range(6) for _ in range(2)]  # two images a prompt
    write_sample_folder(tmp_path / "samples", torch.rand(12, 3, 16, 16, generator=g) * 2 - 1, prompts,
                        list(range(12)), guidance=2.0)  # fmt: skip
    return make_pair_task(tmp_path / "samples", tmp_path / "task", raters_per_pair=3, repeat_checks=1,
                          broken_checks=1)  # fmt: skip


def test_a_pair_tasks_votes_become_confident_pairs_by_the_stated_rules(pair_task, tmp_path):
    from emu.annotate.__main__ import main as annotate_main
    from emu.annotate.pairs import confident_pairs
    from emu.annotate.tasks import load_task
    from emu.data.pairs import PairSource
    from emu.mini.raters import simulate_votes

    task = load_task(pair_task)
    assert len(task["pairs"]) == 6 and all(p["seed_b"] == p["seed"] + 1 for p in task["pairs"])
    # pairs 0-1: a clearly better; 2-3: b clearly better; 4-5: the same score (the raters see noise or a tie)
    score = {p["pair"]: (2.0, 0.0) if i < 2 else (0.0, 2.0) if i < 4 else (1.0, 1.0) for i, p in
             enumerate(task["pairs"])}  # fmt: skip
    cast = simulate_votes(pair_task, lambda pair, side: score[pair["pair"]][side == "b"], raters=3, noise=0.1)
    assert cast == 6 * 3 + 3 * 2  # every pair's quota, and each rater's two checks
    assert annotate_main(["export-pairs", str(pair_task), str(tmp_path / "pairs")]) == 0
    acc = json.loads((tmp_path / "pairs" / "pairs.json").read_text())
    assert (acc["votes"], acc["pairs_voted"], acc["confident"], acc["ties"]) == (18, 6, 4, 2)
    assert acc["simulated"] and acc["raters_dropped"] == []
    source = PairSource(str(tmp_path / "pairs"), val_fraction=0.0)
    labels = {r["id"]: r["label_0"] for r in map(json.loads, (tmp_path / "pairs" / "pairs.jsonl").open())}
    assert [labels[p["pair"]] for p in task["pairs"][:4]] == [1, 1, 0, 0] and source.size("train") == 4
    # the budget buys the first pairs whole; a 2-1 split is confident at 2/3, not at 0.8
    votes = [json.loads(line) for line in (pair_task / "votes.jsonl").read_text().splitlines()]
    assert confident_pairs(task, votes, budget=8)[1]["pairs_voted"] == 2  # 2 pairs x 3 votes: a third would pass 8
    first = task["pairs"][0]["pair"]
    flipped = [{**v, "choice": {"left": "right", "right": "left"}[v["choice"]]}
               if v["pair"] == first and v["rater"] == "sim0" else v for v in votes]  # fmt: skip
    assert confident_pairs(task, flipped)[1]["confident"] == 4
    assert confident_pairs(task, flipped, min_agreement=0.8)[1]["unconfident"] == 1
    # a rater who failed both checks is left out
    failing = [{**v, "choice": {"left": "right", "right": "left"}.get(v["choice"], v["choice"])}
               if v["rater"] == "sim2" and v.get("check") else v for v in votes]  # fmt: skip
    rows, acc = confident_pairs(task, failing)
    assert acc["raters_dropped"] == ["sim2"] and all(r["votes"] == 2 for r in rows)
    assert acc["votes"] == 18 and acc["check_votes"] == 6  # a left-out rater's votes were paid for all the same


def test_the_curations_human_passes_become_kto_likes(tmp_path):
    from emu.curation.likes import export_likes
    from emu.data.sources import FolderSource

    curate = tmp_path / "curate"
    labels = {
        "generalist": {"k1": [1, 0], "k2": [0, 0], "k3": [1, 1]},  # the generalists keep with any vote
        "specialist": {"k1": [1, 0], "k3": [1, 1]},
    }  # the specialists with all votes: k1 out, k3 kept
    for stage, keys in labels.items():
        folder = curate / "human" / stage
        rows, label_rows = [], []
        for i, (key, keeps) in enumerate(keys.items()):
            _png(folder / "candidates" / f"c{i}.png", (i * 80, 0, 0))
            rows.append({"key": key, "file": f"c{i}.png"})
            label_rows += [{"key": key, "annotator": f"{stage}_{j}", "keep": k} for j, k in enumerate(keeps)]
        (folder / "candidates.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in label_rows))
    (curate / ".hydra").mkdir()
    (curate / ".hydra" / "config.yaml").write_text("stages:\n  generalist: {combine: any, annotators: []}\n"
                                                   "  specialist: {combine: all, annotators: []}\n")  # fmt: skip
    (curate / "index.jsonl").write_text("".join(json.dumps({"key": k, "caption": f"caption {k}"}) + "\n"
                                                for k in ("k1", "k2", "k3", "k4")))  # fmt: skip
    summary = export_likes(curate, tmp_path / "likes")
    assert (summary["desirable"], summary["undesirable"], summary["labels"]) == (1, 2, 10)
    assert summary["passes"] == {"generalist": ["any", 0.5], "specialist": ["all", 0.5]}
    source = FolderSource(str(tmp_path / "likes"), val_fraction=0.0)
    got = {source.raw("train", i)["caption"]: source.raw("train", i)["meta"]["label"] for i in range(3)}
    assert got == {"caption k1": False, "caption k2": False, "caption k3": True}
    assert export_likes(curate, tmp_path / "likes1", undesirable_ratio=1.0)["undesirable"] == 1
    majority = export_likes(curate, tmp_path / "likes_majority", rule="majority")  # one rule for every pass
    assert majority["desirable"] == 1 and majority["passes"]["generalist"] == ["majority", 0.5]


# ------------------------------------------------------------------------------------------------- make preference
def test_the_plan_runs_the_data_then_each_arm_from_its_own_inputs():
    from emu.demo import driver
    from emu.demo.preference import plan, settings

    scale = driver.load_scale("mini")
    s = settings(scale)
    assert s["votes"] == [250, 500, 1000, 2000] and s["prompts"] == 734  # 2000 / 3 pairs, and 10% for repeats
    data, arms = plan(scale, curated=183)
    names = [a.name for a in arms]
    assert names == ["qt_183", "qt_100", "dpo_250", "dpo_500", "dpo_1000", "dpo_2000", "kto", "qt_dpo"]
    assert arms[0].stage is None and arms[0].metrics == "eval/metrics.json"  # the demo's own: nothing runs
    steps = {st.name: st for st in data.steps}
    assert "haystack:734@0" in " ".join(steps["candidates"].argv)  # training captions, never the held-out ones
    assert "--curation-judge" in steps["pair_votes"].argv  # never the evaluation's judge
    assert steps["pairs_500"].needs == ("pair_votes",) and "--budget" in steps["pairs_500"].argv
    dpo = {a.name: a for a in arms}["dpo_500"].stage.steps
    assert dpo[0].needs == ("pairs_500",) and dpo[1].needs == (dpo[0].name,)
    assert "experiment=mini/stage2_dpo" in dpo[0].argv and "data.source.root={out}/preference/pairs_500" in dpo[0].argv
    qt_dpo = {a.name: a for a in arms}["qt_dpo"].stage.steps[0].argv
    assert "model.init_from={out}/stage2/checkpoints/select/best.ckpt" in qt_dpo
    assert all("b={out}/stage1/checkpoints/last.ckpt" in a.stage.steps[1].argv for a in arms[1:])  # the same baseline
    _, small = plan(scale, curated=90)
    assert "qt_100" not in [a.name for a in small]  # a subset must be smaller than the curated set


def test_the_report_counts_each_arms_judgments_and_plots_appeal_per_judgment(tmp_path):
    import numpy as np

    from emu.demo import driver
    from emu.demo.preference import plan
    from emu.demo.preference_report import write_preference
    from emu.evaluation.winrate import compare

    out = tmp_path
    for stage, n in (("generalist", 30), ("specialist", 10)):
        (out / "curate" / "human" / stage).mkdir(parents=True)
        (out / "curate" / "human" / stage / "labels.jsonl").write_text("{}\n" * n)
    scale = {**driver.load_scale("mini"), "preference": {"votes": [30, 60], "curated": [5], "qt_dpo": False}}
    _, arms = plan(scale, curated=10)
    rng = np.random.default_rng(0)
    for i, arm in enumerate(arms):
        if arm.name == "kto":
            continue  # not run yet
        a, b = rng.normal(5 + i, 1, 64), rng.normal(5, 1, 64)
        paired = {"appeal": compare(a, b, 0.25, n_boot=100), "faithfulness": compare(b, b, 0.0, n_boot=100)}
        (out / arm.metrics).parent.mkdir(parents=True, exist_ok=True)
        (out / arm.metrics).write_text(json.dumps({"prompts": "haystack:64", "n_prompts": 64, "paired": paired}))
    for v, confident in ((30, 8), (60, 15)):
        (out / "preference" / f"pairs_{v}").mkdir(parents=True)
        (out / "preference" / f"pairs_{v}" / "pairs.json").write_text(json.dumps(
            {"votes": v, "pairs_voted": v // 3, "confident": confident, "ties": 2, "unconfident": 0, "budget": v,
             "min_agreement": 2 / 3, "raters_dropped": []}))  # fmt: skip
    report = write_preference(out, scale, arms, {"stages": {"preference_data": {"seconds": 60}}}, {}, 10)
    text = report.read_text()
    results = {r["arm"]: r for r in json.loads((out / "preference" / "results.json").read_text())["arms"]}
    assert results["qt_10"]["judgments"] == 40 and results["qt_5"]["judgments"] == 20  # half the passes: estimated
    assert results["dpo_60"]["judgments"] == 60 and "15 confident pairs" in results["dpo_60"]["judgments_what"]
    assert results["kto"]["appeal"] is None and "| kto |" in text and "not run" in text
    assert (out / "preference" / "curve.png").is_file() and "simulated" in text
    assert "the data from people 1.0 min" in text

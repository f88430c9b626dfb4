"""The ablation harness (``make ablations``): its arms compose, its data draws are what they say, its report judges."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import hydra
import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from emu.curation import subset
from emu.curation.funnel import Funnel
from emu.demo import driver
from emu.demo.ablation_report import write_ablations
from emu.demo.ablations import length_steps, plan
from emu.demo.report import write_report
from emu.demo.stages import command, demo_stages
from emu.evaluation.winrate import compare
from tests.conftest import ENTRY_CONFIGS

ROOT = Path(__file__).resolve().parents[1]
SCALES = sorted(p.stem for p in (ROOT / "conf" / "demo").glob("*.yaml"))


def _selection(steps=(40, 80, 120, 160, 200), best=120) -> dict:
    rows = [{"step": s, "images_seen": 64 * s, "appeal": 5.0 + s / 100, "faithfulness": 0.8, "train_loss": 0.1,
             "ckpt": f"/x/step_{s:07d}.ckpt" if s else None} for s in (0, *steps)]  # fmt: skip
    return {"rows": rows, "best": next(r for r in rows if r["step"] == best), "every_n_steps": steps[0],
            "prompts": 64, "judge": "pixel", "faithfulness_margin": 0.05, "stopped": None}  # fmt: skip


def _facts(curated=164, **kw) -> dict:
    return {"curated": curated, "automatic_stage": "text_overlay", "selection": _selection(**kw)}


def _overrides(argv: list[str], entry: str) -> list[str]:
    i = next(i for i, a in enumerate(argv) if a == entry)
    args = [a for a in argv[i + 1 :] if ("=" in a or a.startswith("~")) and not a.startswith(("hydra.", "--"))]
    return args


def _compose(argv: list[str]):
    entry = next(a for a in argv if a in ENTRY_CONFIGS)
    return entry, compose(ENTRY_CONFIGS[entry], overrides=_overrides(argv, entry))


def test_plan_has_every_arm():
    arms = {a.name: a for a in plan(driver.load_scale("mini"), _facts())}
    # 300 is not below the 164 curated images: the whole set is the demo's own stage 2 (curated_164, no steps)
    assert list(arms) == ["curated_164", "curated_100", "random_100", "random_164", "automatic_164", "steps_40",
                          "steps_200", "steps_800", "seed_1", "seed_2", "lora_r4", "lora_r32"]  # fmt: skip
    assert arms["curated_164"].stage is None and arms["curated_164"].metrics == "eval/metrics.json"
    assert arms["curated_164"].step == 120 and arms["steps_40"].step == 40
    assert {a.images for a in arms.values() if a.group == "random"} == {100, 164}
    assert [s.name for s in arms["steps_40"].stage.steps] == ["steps_40/eval"]  # a checkpoint there: eval only
    assert length_steps(_selection(best=200)) == [80]  # the selected step is the last: half of it only
    assert length_steps({"rows": [], "best": None}) == []


@pytest.mark.parametrize("scale", SCALES)
def test_every_arm_of_every_scale_composes(scale, tmp_path):
    """Each arm's commands name real config keys and evaluate like the demo's own eval step."""
    s = driver.load_scale(scale)
    arms = plan(s, _facts(curated=20, steps=(2, 4), best=4))  # every scale's longer run goes beyond step 4
    assert {a.group for a in arms} == {"curated", "random", "automatic", "length", "seed", "lora"}
    steps = [step for a in arms if a.stage for step in a.stage.steps]
    assert len({st.name for st in steps}) == len(steps), "step names must be unique (the state file keys them)"
    demo_eval = next(st for stage in demo_stages(s) for st in stage.steps if st.name == "eval")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        _, reference = _compose(command(demo_eval, tmp_path, s, resume=False))
        for step in steps:
            assert step.done.startswith(f"ablations/{step.name.split('/')[0]}/")
            for resume in {False, step.resumable}:
                argv = command(step, tmp_path, s, resume)
                if not step.hydra:  # a subset of the curated folder: no config
                    assert "--folder" in argv and f"{tmp_path}/curate/curated" in argv
                    continue
                entry, cfg = _compose(argv)
                assert cfg.paths.demo_dir == str(tmp_path)
                if entry == "train.py":
                    assert cfg.task_name == "mini_stage2"
                    assert argv[-1] == f"hydra.run.dir={tmp_path / step.run_dir}" or resume
                    if resume:  # an interrupted arm resumes from its own last.ckpt, whatever it started from
                        assert cfg.ckpt_path == "last"
                    for o in (s.get("overrides") or {}).get("stage2", []):
                        assert o in argv
                    arm = next(a for a in arms if a.name == step.name.split("/")[0])
                    if arm.group == "lora":  # the adapters alone, at the scale's rate
                        rank = int(arm.name.removeprefix("lora_r"))
                        assert cfg.model.lora.rank == rank and cfg.model.lora.alpha == rank
                        assert cfg.model.lr == s["ablations"]["lora_lr"]
                    else:
                        assert not cfg.model.lora.rank
                elif entry == "eval.py":
                    assert cfg.b == reference.b and cfg.prompts == reference.prompts and cfg.seed == reference.seed
                    assert cfg.judge == reference.judge and cfg.sampling == reference.sampling
                    assert cfg.tie_band == reference.tie_band and cfg.out == f"{tmp_path}/{Path(step.done).parent}"
                else:
                    assert "--funnel" in argv and cfg.data.source.shards == f"{tmp_path}/haystack/*.tar"
    longer = next(a for a in arms if a.group == "length" and a.stage and len(a.stage.steps) == 2)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        _, cfg = _compose(command(longer.stage.steps[0], tmp_path, s, resume=False))
    # the demo's stage 2 continued to the longer step count, whatever step count the scale's overrides set
    assert cfg.ckpt_path == f"{tmp_path}/stage2/checkpoints/last.ckpt" and cfg.trainer.max_steps == longer.step


def _haystack(n: int):
    """A small on-the-fly haystack DataModule, read as curation reads it."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("curate", overrides=["data=haystack", f"data.source.n_train={n}", "data.source.n_val=0",
                                           "data.num_workers=0", "data.batch_size=16"])  # fmt: skip
    return hydra.utils.instantiate(cfg.data)


def test_random_subset_draws_the_stated_number_deterministically(tmp_path):
    dm = _haystack(48)
    funnel = tmp_path / "curate"
    Funnel(dm, [], funnel, progress=False).scan()  # index.jsonl: every image of the corpus
    index = [json.loads(line)["key"] for line in (funnel / "index.jsonl").read_text().splitlines()]
    a = subset.subset_funnel(funnel, 10, 0, tmp_path / "a", dm, progress=False)
    b = subset.subset_funnel(funnel, 10, 0, tmp_path / "b", dm, progress=False)
    c = subset.subset_funnel(funnel, 10, 1, tmp_path / "c", dm, progress=False)
    assert a["n"] == 10 and len(a["keys"]) == 10 and set(a["keys"]) <= set(index)
    assert a["keys"] == b["keys"] and a["keys"] != c["keys"]
    rows = [json.loads(line) for line in (tmp_path / "a" / "curated" / "metadata.jsonl").read_text().splitlines()]
    assert sorted(r["key"] for r in rows) == a["keys"] and all((tmp_path / "a/curated" / r["file_name"]).is_file()
                                                               for r in rows)  # fmt: skip
    assert a["needles"] == sum(r["needle"] for r in rows)
    # the funnel's kept keys only (an automatic stage's table)
    (funnel / "scores").mkdir()
    kept = set(index[::3])
    (funnel / "scores" / "auto.jsonl").write_text("".join(json.dumps({"key": k, "kept": k in kept}) + "\n"
                                                          for k in index))  # fmt: skip
    d = subset.subset_funnel(funnel, 5, 0, tmp_path / "d", dm, kept_by="auto", progress=False)
    assert d["pool"] == len(kept) and set(d["keys"]) <= kept and d["n"] == 5

    # a subset of a curated folder: links to its images, the same draw for the same seed
    e = subset.main(["--folder", str(tmp_path / "a" / "curated"), "--n", "4", "--seed", "3", "--out",
                     str(tmp_path / "e")])  # fmt: skip
    assert e["n"] == 4 and e["keys"] == sorted(subset.draw(a["keys"], 4, 3))
    assert all((tmp_path / "e" / "curated" / f"{k}.png").is_symlink() for k in e["keys"])
    assert subset.main(["--folder", str(tmp_path / "a" / "curated"), "--n", "4", "--seed", "3", "--out",
                        str(tmp_path / "e")])["keys"] == e["keys"]  # fmt: skip
    with pytest.raises(SystemExit, match="holds another draw"):
        subset.main(["--folder", str(tmp_path / "a" / "curated"), "--n", "4", "--seed", "4", "--out",
                     str(tmp_path / "e")])  # fmt: skip
    with pytest.raises(SystemExit, match="asks for 11 images of a pool of 10"):
        subset.main(["--folder", str(tmp_path / "a" / "curated"), "--n", "11", "--out", str(tmp_path / "f")])


def test_draw_is_a_seeded_sample_without_replacement():
    pool = [f"k{i:03d}" for i in range(200)]
    picks = subset.draw(pool, 50, 7)
    assert len(set(picks)) == 50 and set(picks) <= set(pool)
    assert picks == subset.draw(list(reversed(pool)), 50, 7)  # the pool's order does not matter
    assert picks != subset.draw(pool, 50, 8)
    assert subset.draw(pool, "all", 0) == sorted(pool)


def _metrics(path: Path, appeal_a, appeal_b) -> None:
    faith = np.full(len(appeal_a), 0.8)
    paired = {
        "appeal": compare(appeal_a, appeal_b, 0.25, n_boot=200),
        "faithfulness": compare(faith, faith, 0.0, n_boot=200),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"prompts": "haystack:64", "n_prompts": len(appeal_a), "paired": paired, "models": {}}))


def _constructed(out: Path, curated_better: bool, random_better: bool) -> list:
    scale = driver.load_scale("mini")
    arms = plan(scale, _facts())
    rng = np.random.default_rng(0)
    base = rng.uniform(3, 6, 64)
    for arm in arms:
        better = {"curated": curated_better, "random": random_better}.get(arm.group, True) or arm.stage is None
        _metrics(out / arm.metrics, base + (2.0 if better else -2.0), base)
        if arm.selection:
            path = out / arm.selection
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(_selection()))
    return arms


@pytest.mark.parametrize("good", [True, False])
def test_ablation_table_judges_the_targets_both_ways(tmp_path, good):
    """Constructed metrics: the curated arm beats the pre-trained model and the random one does not (met), then the
    other way round (missed)."""
    arms = _constructed(tmp_path, curated_better=good, random_better=not good)
    scale = driver.load_scale("mini")
    state = {"stages": {"curated_100": {"seconds": 120.0}}, "finished": "now"}
    demo_state = {"stages": {"stage2": {"seconds": 300.0}, "eval": {"seconds": 150.0}}}
    text = write_ablations(tmp_path, scale, arms, state, demo_state).read_text()
    verdict = "met" if good else "missed"
    rows = {}  # the main table's row of each arm (the LoRA table repeats the headline's)
    for line in text.splitlines():
        if m := re.match(r"\| \**(\w+)", line):
            rows.setdefault(m[1], line)
    lora = text[text.index("## LoRA vs full quality-tuning") :]
    assert re.search(r"\| lora_r32 \| .*LoRA rank 32 .* \| n/a \| win 100.0%", lora) and "| curated_164 |" in lora
    assert re.search(rf"100 curated images vs pre-trained: appeal win's 95% interval above 50.0%: \*\*{verdict}\*\*",
                     rows["curated_100"])  # fmt: skip
    assert re.search(rf"not above 50.0%: \*\*{verdict}\*\*", rows["random_100"])
    assert ("win 100.0%" if good else "win 0.0%") in rows["curated_100"]
    assert "| 2.0 min |" in rows["curated_100"] and "7.5 min (demo)" in rows["curated_164"] and "not run" in text
    assert "82.9%" in rows["curated_164"]  # the paper's figure beside the headline
    assert re.search(r"Appeal win over 3 seeds of stage 2: \*\*mean 100.0%, std 0.0 points", text)
    assert (tmp_path / "ablations" / "lengths.png").is_file() and "ablations/lengths.png" in text
    targets = json.loads((tmp_path / "ablations" / "targets.json").read_text())["targets"]
    assert [t["met"] for t in targets] == [good, good, None]  # no scores.jsonl: the pooled appeal is not measured
    # REPORT.md links the ablations and carries their targets
    report = write_report(tmp_path, scale, demo_state, demo_stages(scale)).read_text()
    assert "[ABLATIONS.md](ABLATIONS.md)" in report
    assert re.search(rf"\| ablation: 100 curated images .* \| \*\*{'yes' if good else 'no'}\*\* \|", report)


def test_every_stage2_run_has_its_own_selection_curve(tmp_path, monkeypatch):
    """The LoRA arms run with seed 0, as the headline: their curves are named after the arm, not drawn over its."""
    from PIL import Image

    from emu.demo import ablation_report

    arms = _constructed(tmp_path, curated_better=True, random_better=False)
    panels = []
    monkeypatch.setattr(ablation_report, "chart", lambda p, xlabel: panels.extend(p) or Image.new("RGB", (1, 1)))
    ablation_report._plot(tmp_path, arms, {})
    labels = {series.label for series in panels[1].series}
    assert {"seed 0", "seed 1", "seed 2", "lora r4", "lora r32"} <= labels


def _scores(path: Path, tuned: str, appeal_a, appeal_b) -> None:
    """A fake eval ``scores.jsonl``: ``tuned`` vs ``pretrained``, one line per prompt."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pairs = enumerate(zip(appeal_a, appeal_b, strict=True))
    rows = [{"prompt": f"p{i}", "seed": i, tuned: {"appeal": float(a), "faithfulness": 0.8},
             "pretrained": {"appeal": float(b), "faithfulness": 0.8}} for i, (a, b) in pairs]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("agree", [True, False])
def test_ablations_pool_the_appeal_over_the_stage2_seeds(tmp_path, agree):
    """Fake scores of the headline (seed 0) and the seed arms: seeds that agree (wins, 0.2-point ties within the
    headline's 0.25 band) meet the pooled target; a seed that loses everywhere misses it, its interval reaching 0."""
    arms = _constructed(tmp_path, curated_better=True, random_better=False)
    scale = driver.load_scale("mini")
    base = np.random.default_rng(1).uniform(3, 6, 20)
    diff = {0: np.full(20, 2.0), 1: np.r_[np.full(16, 2.0), np.full(4, 0.2)], 2: np.full(20, 2.0 if agree else -2.0)}
    runs = [a for a in arms if a.group == "seed" or (a.group == "curated" and a.stage is None)]
    assert [a.seed for a in runs] == [0, 1, 2]
    for arm in runs:
        tuned = "quality_tuned" if arm.stage is None else arm.name  # as the demo's and the arms' evals name it
        _scores(tmp_path / Path(arm.metrics).parent / "scores.jsonl", tuned, base + diff[arm.seed], base)
    text = write_ablations(tmp_path, scale, arms, {}, {}).read_text()
    win = (20 + 16 + (20 if agree else 0)) / 60
    m = re.search(r"Appeal pooled over 3 stage-2 seeds \(0, 1, 2; the 20 prompts every one was judged on, 60 pairs; "
                  r"tie band 0.25\), 95% "
                  r"intervals from a two-level bootstrap .*: \*\*win ([\d.]+)% \[([\d.]+)%, ([\d.]+)%\] / "
                  r"tie ([\d.]+)%", text)  # fmt: skip
    assert m, text
    assert float(m[1]) == round(100 * win, 1) and float(m[4]) == round(100 * 4 / 60, 1)
    assert (float(m[2]) > 65) == agree and (float(m[2]) == 0.0) == (not agree)
    targets = {t["arm"]: t for t in json.loads((tmp_path / "ablations" / "targets.json").read_text())["targets"]}
    pooled = targets["pooled_seeds"]
    assert (
        pooled["target"] == "appeal pooled over the 3 stage-2 seeds (two-level bootstrap): win >= 75%, interval "
        "above 65%"
    )
    assert pooled["met"] is agree and pooled["measured"].startswith(f"win {100 * win:.1f}% [")
    yes = "yes" if agree else "no"
    assert re.search(rf"## Targets\n(.*\n)*\| appeal pooled over the 3 stage-2 seeds .* \| \*\*{yes}\*\* \|", text)
    # REPORT.md: the headline labelled as one stage-2 seed, the pooled figure linked, its target in the table
    report = write_report(tmp_path, scale, {}, demo_stages(scale)).read_text()
    assert "one stage-2 seed;" in report
    link = r"\(\[ABLATIONS.md\]\(ABLATIONS.md#seeds-is-the-effect-larger-than-the-noise\)\)"
    assert re.search(rf"Its appeal pooled with the other stage-2 seeds' .*: win [\d.]+% .*{link}", report)
    assert re.search(rf"\| ablation: appeal pooled over the 3 stage-2 seeds .* \| \*\*{yes}\*\* \|", report)
    # the headline rerun since (--only stage2 eval): the pooled row held its old scores, so it is judged neither way
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    metrics["paired"]["appeal"]["win"] -= 0.1
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps(metrics))
    report = write_report(tmp_path, scale, {}, demo_stages(scale)).read_text()
    assert re.search(r"\| ablation: appeal pooled over the 3 stage-2 seeds .* \| stale: pooled with an earlier "
                     r"headline run .*rerun `make ablations` \| not measured \|", report)  # fmt: skip
    assert "Its appeal pooled with" not in report
    # a seed not yet evaluated: the figure over the two that are, judged only when all three are
    (tmp_path / Path(runs[2].metrics).parent / "scores.jsonl").unlink()
    write_ablations(tmp_path, scale, arms, {}, {})
    targets = {t["arm"]: t for t in json.loads((tmp_path / "ablations" / "targets.json").read_text())["targets"]}
    assert (
        targets["pooled_seeds"]["met"] is None and "1 seed(s) not yet evaluated" in targets["pooled_seeds"]["measured"]
    )


def test_ablation_table_says_what_has_not_run(tmp_path):
    scale = driver.load_scale("mini")
    arms = plan(scale, _facts())
    text = write_ablations(tmp_path, scale, arms, {}, {}).read_text()
    assert text.count("not run") >= len(arms) and "not measured" in text
    assert "Fewer than two stage-2 seeds" in text


def test_ablations_refuse_an_unfinished_demo(tmp_path):
    with pytest.raises(SystemExit, match=r"not a finished demo: missing .*curate/curated/metadata\.jsonl"):
        driver.run_ablations(tmp_path, driver.load_scale("tiny"))


@pytest.mark.slow
def test_tiny_ablations_end_to_end(tmp_path):
    """The tiny demo, then every ablation arm on top of it, then a rerun that skips them all."""
    out = tmp_path / "demo"
    for extra in ([], ["--ablations"]):
        cmd = [sys.executable, "-m", "emu.demo", "--scale", "tiny", "--out", str(out), *extra]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    text = (out / "ABLATIONS.md").read_text()
    arms = plan(driver.load_scale("tiny"), driver.demo_facts(out))
    for arm in arms:
        assert (out / arm.metrics).is_file(), arm.name
        assert re.search(rf"\| \**{arm.name}\**.* \| win \d+\.\d%", text), arm.name
    assert (out / "ablations" / "lengths.png").is_file() and "ABLATIONS.md" in (out / "REPORT.md").read_text()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.count("- skipped") == sum(1 for a in arms if a.stage)


def _fake_demo(out: Path) -> None:
    """The files a finished tiny demo leaves that the ablations read."""
    rows = [{"file_name": f"{i:03d}.png", "text": "a red circle", "key": f"{i:03d}", "needle": True} for i in range(9)]
    (out / "curate" / "curated").mkdir(parents=True)
    (out / "curate" / "curated" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    stages = [{"stage": "aesthetic", "kind": "automatic", "n_in": 100, "n_out": 40},
              {"stage": "specialist", "kind": "human", "n_in": 40, "n_out": 9}]  # fmt: skip
    final = {"n": 9, "needles_out": 9, "precision": 1.0, "recall": 0.5}
    (out / "curate" / "funnel.json").write_text(json.dumps({"n_images": 100, "needles": 18, "stages": stages,
                                                            "final": final}))  # fmt: skip
    select = out / "stage2" / "checkpoints" / "select"
    select.mkdir(parents=True)
    (select / "selection.json").write_text(json.dumps(_selection(steps=(2, 4), best=4)))
    (out / "stage1" / "checkpoints").mkdir(parents=True)
    (out / "stage1" / "checkpoints" / "last.ckpt").write_text("")
    base = np.random.default_rng(0).uniform(3, 6, 8)
    _metrics(out / "eval" / "metrics.json", base + 1, base)
    (out / "demo_state.json").write_text(json.dumps({"scale": "tiny", "stages": {}, "steps": {}}))


def record_steps(out: Path, monkeypatch) -> list[list[str]]:
    """The driver's steps recorded instead of run (each leaves its ``done`` file in ``out``): their argvs, in order."""
    calls: list[list[str]] = []

    def run_step(step, argv, log_path, env=None, echo=True):
        calls.append(argv)
        done = out / step.done
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text("{}")

    monkeypatch.setattr(driver, "run_step", run_step)
    return calls


def test_ablations_run_every_arm_then_skip_and_resume(tmp_path, monkeypatch):
    """The demo driver's machinery: every arm's steps in order, nothing again once finished, an interrupted stage-2
    run resumed from its own last.ckpt; then ABLATIONS.md and a REPORT.md that links it."""
    _fake_demo(tmp_path)
    scale = driver.load_scale("tiny")
    calls = record_steps(tmp_path, monkeypatch)
    report = driver.run_ablations(tmp_path, scale)
    arms = plan(scale, driver.demo_facts(tmp_path))
    assert len(calls) == sum(len(a.stage.steps) for a in arms if a.stage)
    assert "ABLATIONS.md" in (tmp_path / "REPORT.md").read_text() and report.name == "ABLATIONS.md"
    assert any("seed=1" in c for c in calls) and any("--kept-by" in c and "aesthetic" in c for c in calls)

    calls.clear()
    driver.run_ablations(tmp_path, scale)
    assert calls == []  # every arm finished: nothing reruns

    state = json.loads((tmp_path / "ablations" / "ablation_state.json").read_text())
    del state["steps"]["seed_1/stage2"]  # killed mid-run, its last.ckpt left behind
    (tmp_path / "ablations" / "ablation_state.json").write_text(json.dumps(state))
    (tmp_path / "ablations" / "seed_1" / "stage2" / "checkpoints" / "last.ckpt").write_text("")
    driver.run_ablations(tmp_path, scale)
    assert len(calls) == 1 and "seed=1" in calls[0] and calls[0][-1] == "ckpt_path=last"

    with pytest.raises(SystemExit, match="holds a 'tiny' demo"):
        driver.run_ablations(tmp_path, driver.load_scale("mini"))

"""Curation: stage pieces, the aesthetic head's public layout, labels import, and the funnel end to end + resume."""

import itertools
import json
import shutil

import pytest
import torch
from PIL import Image

from emu.curation.aesthetic import train_head
from emu.curation.funnel import Funnel
from emu.curation.human import HumanStage, combine, read_labels
from emu.curation.neighbours import phash
from emu.curation.pieces import CurationError
from emu.curation.stages import (
    Aesthetic,
    Balance,
    ClipScore,
    KeepRule,
    NearDuplicates,
    SizeAspect,
    TextOverlay,
)
from emu.data import EmuDataModule, FolderSource
from emu.errors import ConfigError
from emu.mini import haystack as hs
from emu.mini.annotators import SimulatedAnnotator
from emu.mini.clip import HaystackAttributes
from emu.mini.source import HaystackSource
from emu.text.aesthetic import AestheticHead
from tests.conftest import haystack_batch


def test_keep_rule():
    scores = {"a": 1.0, "b": 5.0, "c": 3.0, "d": 4.0}
    assert KeepRule(min=3).select(scores) == {"b", "c", "d"}
    assert KeepRule(max=3).select(scores) == {"a", "c"}
    assert KeepRule(top_k=2).select(scores) == {"b", "d"}
    assert KeepRule(top_fraction=0.5, lowest=True).select(scores) == {"a", "c"}
    assert KeepRule(min=2, top_k=1).describe() == "score >= 2, top 1"


def test_phash_finds_near_duplicates():
    image, _ = hs.make_sample(0, 0, 64)
    brighter = Image.eval(image, lambda v: min(255, int(v * 1.05)))
    other, _ = hs.make_sample(0, 1, 64)
    h = phash(image)
    assert bin(h ^ phash(brighter)).count("1") <= 4 < bin(h ^ phash(other)).count("1")


@pytest.mark.parametrize("method,limit", [("thumbnail", 0.2), ("phash", 4)])
def test_near_duplicates_score_against_earlier_images_in_and_across_batches(method, limit):
    batch = haystack_batch(n=12, resolution=64)
    images = batch["image"].clone()
    images[7] = (images[2] * 1.05).clamp(-1, 1)  # a brighter copy of image 2, later in the order
    full = {"image": images}
    stage = NearDuplicates(method=method, max_distance=limit, index="flat")
    scores, _ = stage.score(full)
    assert scores[7] <= limit and scores[0] == (64.0 if method == "phash" else 1e9)
    assert sum(s <= limit for s in scores) <= 2
    split = NearDuplicates(method=method, max_distance=limit)  # in two batches, the approximate index: the same
    again = split.score({"image": images[:5]})[0] + split.score({"image": images[5:]})[0]
    assert again == pytest.approx(scores, rel=1e-5)


def test_aesthetic_head_has_the_public_layout_and_loads_by_path(tmp_path):
    head = AestheticHead(768)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {"layers.0.weight": (1024, 768), "layers.0.bias": (1024,), "layers.2.weight": (128, 1024),
                      "layers.2.bias": (128,), "layers.4.weight": (64, 128), "layers.4.bias": (64,),
                      "layers.6.weight": (16, 64), "layers.6.bias": (16,), "layers.7.weight": (1, 16),
                      "layers.7.bias": (1,)}  # fmt: skip
    torch.save(head.state_dict(), tmp_path / "public.pth")  # the LAION predictor ships as a .pth state dict
    loaded = AestheticHead.from_file(tmp_path / "public.pth")
    x = torch.randn(3, 768)
    torch.testing.assert_close(loaded(x), head.eval()(x))
    torch.testing.assert_close(AestheticHead.from_file(head.save(tmp_path / "h.safetensors"))(x), head(x))
    with pytest.raises(ConfigError, match="no aesthetic head"):
        AestheticHead.from_file(tmp_path / "missing.pth")
    torch.save({"w": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="not an aesthetic predictor"):
        AestheticHead.from_file(tmp_path / "other.pth")


def test_aesthetic_head_learns_ratings():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(600, 16, generator=g)
    ratings = 5 + 2 * torch.nn.functional.normalize(emb, dim=-1)[:, 0]
    _, metrics = train_head(emb, ratings, epochs=40)
    assert metrics["val_pearson"] > 0.9


def test_labels_import_round_trip_and_bad_rows(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("key,annotator,composition,keep\nk1,ann,1,yes\nk2,ann,0,no\nk9,ann,1,1\nk1,bob,1,maybe\n")
    rows, problems = read_labels(path, {"k1", "k2"})
    assert [(r["key"], r["keep"]) for r in rows] == [("k1", 1), ("k2", 0)]
    assert len(problems) == 2 and "labels.csv:4: unknown key 'k9'" in problems[0] and "labels.csv:5" in problems[1]
    with pytest.raises(ConfigError, match="2 bad rows"):
        read_labels(path, {"k1", "k2"}, on_error="stop")
    rows = [{"key": "a", "keep": 1}, {"key": "a", "keep": 0}, {"key": "a", "keep": 1}, {"key": "b", "keep": 0}]
    assert combine(rows, "majority") == {"a": True, "b": False}
    assert combine(rows, "all") == {"a": False, "b": False}
    assert combine(rows, "mean", 0.6) == {"a": True, "b": False} and combine(rows, "mean", 0.8)["a"] is False
    stage = HumanStage("s", "specialist", annotators=[], combine="mean", threshold=0.8)
    assert stage.describe() == "specialist pass, labels file, kept by >= 80% of votes"
    ann = SimulatedAnnotator("x", noise=0.0, appeal_noise=0.0, appeal_threshold=7.5)
    assert ann.label("k", {"flaws": [], "appeal": 8.0})["keep"] == 1
    assert ann.label("k", {"flaws": ["too_dark"], "appeal": 8.0})["keep"] == 0


def test_the_curation_judge_sees_what_the_aesthetic_stage_sees(tiny_clip, aesthetic_head):
    """Checkpoint selection's judge scores appeal exactly as the curation's aesthetic stage ranks images, and
    faithfulness as zero-shot attribute accuracy of one-object captions (NaN for the others)."""
    from emu.curation.aesthetic import CurationJudge
    from emu.curation.stages import Aesthetic
    from emu.text.clip import ClipEmbedder

    batch = haystack_batch(n=6, resolution=32)
    prompts = list(batch["caption"])
    prompts[0] = "a large red circle in the top left and a small white star in the center on a navy background"
    prompts[1] = "not a haystack caption"
    prompts[2] = "a small blue star at the bottom on a sky background"
    judge = CurationJudge(str(tiny_clip), str(aesthetic_head), faithfulness=HaystackAttributes())
    scores = judge.score(batch["image"], prompts)
    stage_scores, _ = Aesthetic(ClipEmbedder(tiny_clip), str(aesthetic_head)).score(batch)
    torch.testing.assert_close(scores["appeal"], torch.tensor(stage_scores))
    plain = CurationJudge(str(tiny_clip), str(aesthetic_head)).score(batch["image"], prompts)  # real prompts: appeal
    assert plain["faithfulness"].isnan().all() and torch.equal(plain["appeal"], scores["appeal"])
    faith = scores["faithfulness"]
    assert faith.shape == (6,) and faith[:2].isnan().all()
    one_object = [i for i in range(2, 6) if " and " not in prompts[i]]
    fifths = faith[one_object] * 5  # five attributes, each right or wrong
    assert 2 in one_object and torch.allclose(fifths, fifths.round()) and ((fifths >= 0) & (fifths <= 5)).all()


def _stages(tiny_clip, head, clip_min=None):
    from emu.text.clip import ClipEmbedder

    clip = ClipEmbedder(tiny_clip)
    annotators = [{"name": f"g{i}", "noise": 0.1, "appeal_noise": 1.0, "appeal_threshold": 5.0, "seed": i}
                  for i in range(2)]  # fmt: skip
    return [
        SizeAspect(min_size=32, max_aspect=1.5),
        NearDuplicates(max_distance=0.2),
        ClipScore(clip, keep={"min": clip_min} if clip_min is not None else {"top_fraction": 0.9}),
        Aesthetic(clip, str(head), keep={"top_fraction": 0.6}),
        TextOverlay(engine="off"),
        Balance(
            clip, {"dark": "on a black background", "light": "on a beige background"}, per_class=30, rank_by="aesthetic"
        ),
        HumanStage("generalist", "generalist", annotators=[SimulatedAnnotator(**a) for a in annotators], combine="any"),
        HumanStage(
            "specialist", "specialist", annotators=[SimulatedAnnotator(**{**annotators[0], "appeal_threshold": 6.0})]
        ),
    ]


def _datamodule(n=160):
    return EmuDataModule(HaystackSource(n_train=n, n_val=0, resolution=32), resolution=32, batch_size=64,
                         drop_last=False)  # fmt: skip


def test_funnel_end_to_end_counts_outputs_and_resume(tmp_path, tiny_clip, aesthetic_head):
    out = tmp_path / "run"
    report = Funnel(_datamodule(), _stages(tiny_clip, aesthetic_head), out, progress=False, piece_size=64).run()
    stages = report["stages"]
    assert stages[0]["n_in"] == report["n_images"] == 160
    for a, b in itertools.pairwise(stages):  # the counts add up: each stage starts where the last ended
        assert b["n_in"] == a["n_out"] and a["n_out"] <= a["n_in"]
    assert report["final"]["n"] == stages[-1]["n_out"]
    assert stages[1]["removed_by_flaw"].get("near_duplicate", 0) >= 1  # the haystack's near-duplicates are caught
    assert stages[4]["rule"].startswith("skipped") and stages[4]["n_out"] == stages[4]["n_in"]
    assert [s.get("role") for s in stages[-2:]] == ["generalist", "specialist"] and "role" not in stages[0]
    for name in (
        "funnel.json",
        "funnel.md",
        "index.jsonl",
        "scores/aesthetic.jsonl",
        "human/generalist/labels.jsonl",
        "human/generalist/labels_template.csv",
        "human/generalist/sheets.md",
        "sheets/clip_score.png",
    ):
        assert (out / name).is_file(), name
    assert "simulated" in (out / "funnel.md").read_text()
    rows = [json.loads(x) for x in (out / "scores/clip_score.jsonl").read_text().splitlines()]
    assert {"key", "stage", "score", "kept"} <= set(rows[0]) and sum(r["kept"] for r in rows) == stages[2]["n_out"]
    curated = FolderSource(str(out / "curated"), val_fraction=0.0)  # the DataModule reads the curated set
    assert curated.size("train") == report["final"]["n"]

    # an interrupt in the middle of the aesthetic stage: later stages gone, one of its three pieces not written
    pieces = sorted((out / "scores/aesthetic").glob("*.jsonl"))
    assert len(pieces) == 3  # 160 images in pieces of 64
    (out / "scores/aesthetic.jsonl").unlink()
    pieces[1].unlink()
    written = {p: p.stat().st_mtime_ns for p in (pieces[0], pieces[2])}
    for later in ("text_overlay", "balance", "generalist", "specialist"):
        (out / f"scores/{later}.jsonl").unlink()
    shutil.rmtree(out / "curated")
    again = Funnel(_datamodule(), _stages(tiny_clip, aesthetic_head), out, progress=False, piece_size=64).run()
    assert all(p.stat().st_mtime_ns == t for p, t in written.items()) and pieces[1].is_file()  # only it redone
    assert [(s["n_in"], s["n_out"]) for s in again["stages"]] == [(s["n_in"], s["n_out"]) for s in stages]
    assert again["final"] == report["final"]
    with pytest.raises(CurationError, match="piece_size"):  # other pieces would not match the tables
        Funnel(_datamodule(), _stages(tiny_clip, aesthetic_head), out, progress=False).run()
    third = Funnel(_datamodule(), _stages(tiny_clip, aesthetic_head), out, progress=False, piece_size=64).run()
    assert [(s["n_in"], s["n_out"]) for s in third["stages"]] == [(s["n_in"], s["n_out"]) for s in stages]
    assert third["final"] == report["final"]


def test_a_rule_that_keeps_nothing_stops_with_the_distribution(tmp_path, tiny_clip, aesthetic_head):
    with pytest.raises(CurationError, match=r"stage 'clip_score' keeps nothing of \d+ images .*median"):
        Funnel(_datamodule(40), _stages(tiny_clip, aesthetic_head, clip_min=101.0), tmp_path, progress=False).run()


def test_curate_py_runs_the_configured_funnel(tmp_path, tiny_clip, aesthetic_head, capsys):
    from hydra import compose, initialize_config_dir

    import curate
    from tests.conftest import ROOT

    overrides = [
        "experiment=mini/curate", f"out={tmp_path}", f"paths.output_dir={tmp_path}", f"clip={tiny_clip}",
        "data=haystack", "data.source.n_train=240", "data.source.n_val=0", "data.resolution=32", "data.batch_size=64",
        "data.num_workers=0", f"stages.aesthetic.head={aesthetic_head}", "stages.aesthetic.keep.top_fraction=0.5",
        "stages.text_overlay.engine=off", "stages.balance.per_class=40", "stages.size_aspect.min_size=32",
    ]  # fmt: skip
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("curate", overrides=overrides)
    report = curate.run(cfg)
    assert [s["stage"] for s in report["stages"]] == list(cfg.stages)
    assert "curated" in capsys.readouterr().out and (tmp_path / "funnel.md").is_file()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        bad = compose("curate", overrides=[*overrides, f"clip={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match="clip"):
        curate.run(bad)


def test_balance_decides_from_rows_and_ranks_alone():
    """Balance's decision needs no files or ranks (emu.curation.pieces reads those): the best ``per_class`` of each
    concept by the ranking stage's score, of equal scores the first in the source's order."""
    from types import SimpleNamespace

    clip = SimpleNamespace(embed_texts=lambda texts: torch.eye(len(texts)))  # Balance embeds its concepts once
    stage = Balance(clip, {"dark": "on a black background", "light": "on a beige background"}, 2, "aesthetic")
    rows = [("a", "dark", 1.0), ("b", "dark", 3.0), ("c", "dark", 2.0), ("d", "light", 0.5), ("e", "dark", 3.0),
            ("f", "light", 0.5), ("g", "light", 0.5)]  # fmt: skip
    assert stage.select(({"key": k, "extra": {"concept": c}}, rank) for k, c, rank in rows) == {"b", "e", "d", "f"}

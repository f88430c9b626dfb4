"""The annotation app end to end in-process: tasks, votes that survive a restart, refusals with 4xx, the token, the
quota and attention checks, and the labels curate.py imports."""

import json

import pytest
import torch

from emu.annotate.__main__ import main as annotate_main
from emu.annotate.tasks import left_side, make_ab_task, make_curation_task
from emu.curation.human import combine, read_labels
from emu.utils.sample_folder import write_sample_folder

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from emu.annotate.app import create_app  # noqa: E402

PROMPTS = [f"a large red circle number {i}" for i in range(6)]


def client(task, **kw) -> "TestClient":
    """The app as a browser on this machine sees it (Host: 127.0.0.1)."""
    return TestClient(create_app(task, **kw), base_url="http://127.0.0.1")


def task_of(folder) -> dict:
    return json.loads((folder / "task.json").read_text())


@pytest.fixture
def ab_task(tmp_path):
    g = torch.Generator().manual_seed(0)
    for name in ("a", "b"):
        images = torch.rand(6, 3, 16, 16, generator=g) * 2 - 1
        write_sample_folder(tmp_path / name, images, PROMPTS, list(range(6)), guidance=2.0)
    return make_ab_task(tmp_path / "a", tmp_path / "b", tmp_path / "task", raters_per_pair=2, repeat_checks=1,
                        broken_checks=1)  # fmt: skip


@pytest.fixture
def curation_task(tmp_path):
    folder = tmp_path / "human" / "generalist"
    (folder / "candidates").mkdir(parents=True)
    rows = []
    for i in range(4):
        write = torch.rand(1, 3, 16, 16) * 2 - 1
        write_sample_folder(tmp_path / "tmp", write, ["x"], [0])
        (tmp_path / "tmp" / "00000.png").rename(folder / "candidates" / f"c{i:06d}.png")
        rows.append(json.dumps({"key": f"shard/{i}", "file": f"c{i:06d}.png"}))
    (folder / "candidates.jsonl").write_text("\n".join(rows) + "\n")
    return make_curation_task(folder)


def vote(c, rater, choice="left"):
    """Answer whatever the server shows ``rater`` next, as the page does."""
    item = c.get("/api/next", params={"rater": rater}).json()["item"]
    return item, c.post("/api/answer", json={"rater": rater, "pair": item["id"], "choice": choice})


def test_votes_survive_a_restart_and_every_pair_gets_its_quota(ab_task):
    c, task = client(ab_task), task_of(ab_task)
    assert "Pairwise evaluation: appeal" in c.get("/").text
    page = c.get("/rate", params={"rater": "ana"}).text
    assert "ana" in page and not any(p in page for p in PROMPTS)  # appeal: the prompt never reaches the page
    first, r = vote(c, "ana")
    assert r.status_code == 200 and r.json()["progress"] == {"done": 1, "total": 8}
    assert c.get(f"/images/{first['left_image']}").status_code == 200
    assert "left" not in first and first["id"] not in first["left_image"]  # nothing says which model is which
    # a new server on the same folder (a restart) has the vote and continues
    c = client(ab_task)
    assert c.get("/api/next", params={"rater": "ana"}).json()["progress"]["done"] == 1
    rows = [json.loads(x) for x in (ab_task / "votes.jsonl").read_text().splitlines()]
    shown_left = next(p for p in task["pairs"] + task["checks"] if p["pair"] == first["id"])
    assert rows[0]["rater"] == "ana" and rows[0]["question"] == "appeal"
    assert rows[0]["left"] == left_side(task, "ana", shown_left) and shown_left[rows[0]["left"]] == first["left_image"]
    # three raters, two per pair: once ana and bo have done everything, cy only gets the attention checks
    for rater in ("ana", "bo"):
        while c.get("/api/next", params={"rater": rater}).json()["item"]:
            assert vote(c, rater)[1].status_code == 200
    seen = []
    while (item := c.get("/api/next", params={"rater": "cy"}).json()["item"]) is not None:
        seen.append(item["id"])
        vote(c, "cy", "tie")
    broken = [ch["pair"] for ch in task["checks"] if ch["check"] == "broken"]
    assert seen == broken  # the repeat check waits for its original, which cy never saw
    full_pair = task["pairs"][0]["pair"]  # a direct post past the quota: refused, with what is next
    r = c.post("/api/answer", json={"rater": "dee", "pair": full_pair, "choice": "left"})
    assert r.status_code == 409 and "all the answers" in r.json()["detail"]["message"] and "item" in r.json()["detail"]
    rows = [json.loads(x) for x in (ab_task / "votes.jsonl").read_text().splitlines()]
    counted = [r["pair"] for r in rows if not r["check"]]
    assert all(counted.count(p) == 2 for p in set(counted)) and len(set(counted)) == 6


def test_repeat_checks_come_after_every_pair(ab_task):
    c, task = client(ab_task), task_of(ab_task)
    repeats = {ch["pair"] for ch in task["checks"] if ch["check"] == "repeat"}
    order = []
    while (item := c.get("/api/next", params={"rater": "ana"}).json()["item"]) is not None:
        order.append(item["id"])
        vote(c, "ana")
    assert set(order[-len(repeats) :]) == repeats and len(order) == 8


def test_bad_requests_get_4xx_and_write_nothing(ab_task, tmp_path):
    c = client(ab_task)
    item, _ = vote(c, "ana")
    assert c.post("/api/answer", json={"rater": "ana", "pair": item["id"], "choice": "left"}).status_code == 409
    item = c.get("/api/next", params={"rater": "ana"}).json()["item"]
    for body, status in [
        ({"rater": "ana", "pair": item["id"], "choice": "maybe"}, 400),
        ({"rater": "ana", "pair": "p99999", "choice": "left"}, 400),
        ({"rater": "ana", "pair": [item["id"]], "choice": "left"}, 400),
        ({"rater": ["ana"], "pair": item["id"], "choice": "left"}, 400),
        ({"rater": "../../etc", "pair": item["id"], "choice": "left"}, 400),
        ({"rater": "ana\n", "pair": item["id"], "choice": "left"}, 400),
        ({"rater": "", "pair": item["id"], "choice": "left"}, 400),
        ([1, 2], 400),
    ]:
        assert c.post("/api/answer", json=body).status_code == status, body
    headers = {"content-type": "application/json"}
    assert c.post("/api/answer", content=b"{not json", headers=headers).status_code == 400
    assert c.post("/api/answer", content=b"x" * 20000, headers=headers).status_code == 413
    chunked = c.post("/api/answer", content=iter([b"x" * 10000, b"x" * 10000]), headers=headers)  # no Content-Length
    assert chunked.status_code == 413
    text_plain = json.dumps({"rater": "ana", "pair": item["id"], "choice": "left"}).encode()
    assert c.post("/api/answer", content=text_plain, headers={"content-type": "text/plain"}).status_code == 415
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not yours")
    (ab_task / "images" / "link.png").symlink_to(secret)  # a link out of the image folder
    for path in ("/images/..%2Ftask.json", "/images/../task.json", "/images/%2e%2e%2fvotes.jsonl", "/images/nope.png",
                 "/images/link.png", "/images/%2e%2e", "/images/%00", "/images/" + "x" * 300):  # fmt: skip
        assert c.get(path).status_code == 404, path
    assert c.get("/rate", params={"rater": "a b"}).status_code == 400
    assert len((ab_task / "votes.jsonl").read_text().splitlines()) == 1  # only the first vote


def test_a_token_is_required_when_given_and_only_this_machine_is_served_without(ab_task):
    c = client(ab_task, token="s3cret")
    assert c.get("/").status_code == 401 and c.get("/api/next", params={"rater": "ana"}).status_code == 401
    assert c.get("/", params={"token": "wrong"}).status_code == 401
    assert c.get("/", params={"token": "s3cret"}).status_code == 200
    item = c.get("/api/next", params={"rater": "ana", "token": "s3cret"}).json()["item"]
    body = {"rater": "ana", "pair": item["id"], "choice": "left"}
    assert c.post("/api/answer", json=body).status_code == 401
    assert c.post("/api/answer", json=body, headers={"X-Emu-Token": "s3cret"}).status_code == 200
    elsewhere = TestClient(create_app(ab_task), base_url="http://attacker.example")  # DNS rebinding
    assert elsewhere.get("/api/next", params={"rater": "ana"}).status_code == 403
    assert TestClient(create_app(ab_task), base_url="http://[::1]:8765").get("/").status_code == 200


def test_a_torn_last_line_is_skipped_and_the_next_vote_starts_a_fresh_line(ab_task):
    c = client(ab_task)
    vote(c, "ana")
    with (ab_task / "votes.jsonl").open("a") as f:
        f.write('{"pair": "p00001", "rat')  # a crash in the middle of a write
    c = client(ab_task)
    assert vote(c, "bo")[1].status_code == 200
    lines = (ab_task / "votes.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["rater"] == "bo"


def test_results_from_unanimous_raters(ab_task, capsys):
    c, task = client(ab_task), task_of(ab_task)
    for rater in ("ana", "bo"):  # both always prefer model A, wherever it is shown
        while (item := c.get("/api/next", params={"rater": rater}).json()["item"]) is not None:
            full = next(p for p in task["pairs"] + task["checks"] if p["pair"] == item["id"])
            wanted = full.get("expect", "a")  # A, or the unbroken image
            choice = "left" if left_side(task, rater, full) == wanted else "right"
            assert c.post("/api/answer", json={"rater": rater, "pair": item["id"], "choice": choice}).status_code == 200
    assert annotate_main(["results", str(ab_task)]) == 0
    out = json.loads(capsys.readouterr().out)
    appeal = out["appeal"]
    assert appeal["win"] == 1.0 and appeal["pairs"] == 6 and appeal["votes_per_pair"] == {"2": 6}
    assert appeal["raters"]["ana"]["checks"] == 2 and appeal["raters"]["ana"]["checks_failed"] == 0


def test_curation_labels_are_what_curate_py_imports(curation_task):
    c = client(curation_task)
    assert "Curation pass: generalist" in c.get("/").text
    page = c.get("/rate", params={"rater": "ana"})
    assert page.status_code == 200 and "Composition" in page.text
    for rater, keep in (("ana", True), ("bo", False), ("cy", True)):
        while (item := c.get("/api/next", params={"rater": rater}).json()["item"]) is not None:
            body = {"rater": rater, "key": item["id"], "keep": keep, "composition": True, "lighting": keep,
                    "color_contrast": True, "subject_background": True, "subjective": keep}  # fmt: skip
            assert c.post("/api/answer", json=body).status_code == 200
    bad = {"rater": "dee", "key": "shard/0", "keep": "yes"}
    assert c.post("/api/answer", json=bad).status_code == 400
    rows, problems = read_labels(curation_task / "app_labels.jsonl", {f"shard/{i}" for i in range(4)}, "stop")
    assert not problems and len(rows) == 12 and all(combine(rows, "majority").values())


def test_cli_errors(tmp_path, capsys):
    assert annotate_main(["curation-task", str(tmp_path)]) == 2
    assert "no candidates.jsonl" in capsys.readouterr().err
    assert annotate_main(["serve", str(tmp_path)]) == 2
    assert "not an annotation task" in capsys.readouterr().err
    (tmp_path / "a").mkdir()
    assert annotate_main(["ab-task", str(tmp_path / "a"), str(tmp_path / "a"), str(tmp_path / "t")]) == 2


def test_eval_reads_the_votes(ab_task):
    from emu.evaluation.report import human_lines
    from emu.evaluation.run import human_votes_metrics

    c = client(ab_task)
    for rater in ("ana", "bo"):
        while c.get("/api/next", params={"rater": rater}).json()["item"] is not None:
            vote(c, rater, "right")  # whichever model is on the right
    h = human_votes_metrics(ab_task, n_boot=200)
    appeal = h["questions"]["appeal"]
    assert appeal["pairs"] == 6 and abs(appeal["win"] + appeal["loss"] + appeal["tie"] - 1) < 1e-9
    assert appeal["raters"]["ana"]["left_rate"] == 0.0  # position bias, visible per rater
    text = "\n".join(human_lines(h))
    assert "## Human raters: a (A) vs b (B)" in text and "| ana | 6 |" in text and "Krippendorff" in text
    with pytest.raises(ValueError, match="not an A/B task folder"):
        human_votes_metrics(ab_task / "images", 10)
    with pytest.raises(ValueError, match="no votes at"):
        human_votes_metrics(ab_task / "missing.jsonl", 10)


def test_preference_and_aesthetic_judges_load_by_path(tiny_clip, tmp_path):
    import numpy as np
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from transformers import CLIPModel, CLIPProcessor

    from emu.text.aesthetic import AestheticHead
    from tests.conftest import ROOT

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("eval", overrides=["a=x", "judge=pickscore", f"judge.path={tiny_clip}"])
    judge = instantiate(cfg.judge)
    pixels = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    images = pixels.float() / 127.5 - 1
    prompts = ["a large red circle in the center", "a small blue star at the top", "a green square"]
    scores = judge.score(images, prompts)
    # PickScore's own recipe with transformers' processor gives the same numbers
    model, processor = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    pil = [np.asarray(p.permute(1, 2, 0)) for p in pixels]
    inputs = processor(images=pil, text=prompts, padding="max_length", truncation=True, max_length=16,
                       return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        img = model.get_image_features(pixel_values=inputs["pixel_values"])
        txt = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    img, txt = (getattr(t, "pooler_output", t) for t in (img, txt))
    expected = model.logit_scale.exp() * torch.nn.functional.cosine_similarity(img, txt)
    torch.testing.assert_close(scores["appeal"], expected, atol=1e-4, rtol=1e-4)
    assert scores["faithfulness"].shape == (3,) and (scores["faithfulness"] >= 0).all()
    from emu.evaluation.judges import PreferenceJudge

    with pytest.raises(ValueError, match="not a CLIPModel folder"):
        PreferenceJudge(tmp_path)
    # the LAION-layout aesthetic head on the same CLIP
    head = tmp_path / "head.safetensors"
    AestheticHead(24).save(head)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("eval", overrides=["a=x", "judge=aesthetic", f"judge.clip={tiny_clip}", f"judge.head={head}"])
    appeal = instantiate(cfg.judge).score(images, prompts)["appeal"]
    assert appeal.shape == (3,) and torch.isfinite(appeal).all()


def test_simulated_raters_vote_through_the_apps_store(ab_task, tmp_path, capsys):
    task = json.loads((ab_task / "task.json").read_text())
    scores = tmp_path / "scores.jsonl"
    rows = [{"prompt": p["prompt"], "seed": p["seed"], "a": {"appeal": 5.0 + i % 2}, "b": {"appeal": 3.0}}
            for i, p in enumerate(task["pairs"])]  # fmt: skip
    scores.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from emu.mini.raters import main as raters_main

    assert raters_main([str(ab_task), "--scores", str(scores), "--raters", "3", "--noise", "0.1"]) == 0
    assert raters_main([str(tmp_path / "no_task"), "--scores", str(scores)]) == 2
    assert annotate_main(["results", str(ab_task), "--out", str(tmp_path / "results.json")]) == 0
    results = json.loads((tmp_path / "results.json").read_text())["appeal"]
    assert results["win"] == 1.0 and results["pairs"] == 6 and results["votes_per_pair"] == {"2": 6}  # the quota
    assert sum(s["checks_failed"] for s in results["raters"].values()) == 0
    votes = [json.loads(x) for x in (ab_task / "votes.jsonl").read_text().splitlines()]
    assert all(v["simulated"] for v in votes) and {v["left"] for v in votes} == {"a", "b"}  # sides were randomised
    # a server started on the same task sees the simulated votes as answers
    assert client(ab_task).get("/api/progress").json()["answers"] == len(votes)

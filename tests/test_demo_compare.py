"""``python -m emu.demo.compare``: two demo folders file by file, numbers as numbers, tensors exactly."""

import json

import torch

from emu.demo.compare import compare, main


def _demo(root, appeal=0.875, weight=1.0, seconds=12.0):
    (root / "eval").mkdir(parents=True)
    (root / "eval" / "metrics.json").write_text(json.dumps(
        {"paired": {"appeal": {"win": appeal}}, "seconds": seconds, "config": {"out": str(root)}}))  # fmt: skip
    (root / "eval" / "scores.jsonl").write_text(json.dumps({"prompt": "p", "a": {"appeal": 6.0}}) + "\n")
    torch.save({"state_dict": {"w": torch.full((2,), weight)}, "time": seconds}, root / "last.ckpt")
    (root / "run.log").write_text(f"took {seconds}s")


def test_a_rerun_is_the_same_and_a_moved_number_or_weight_is_found(tmp_path, capsys):
    _demo(tmp_path / "a")
    _demo(tmp_path / "b", seconds=99.0)  # only times, configs and logs differ
    assert compare(tmp_path / "a", tmp_path / "b") == {"same": 3, "differ": {}, "missing": [], "extra": []}
    assert main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    _demo(tmp_path / "c", appeal=0.86, weight=1.0 + 1e-6)
    result = compare(tmp_path / "a", tmp_path / "c")
    assert set(result["differ"]) == {"eval/metrics.json", "last.ckpt"}
    where, diff = result["differ"]["eval/metrics.json"][0]
    assert where == ".paired.appeal.win" and abs(diff - 0.015) < 1e-9
    assert compare(tmp_path / "a", tmp_path / "c", tolerance=0.02)["differ"] == {}  # within float noise
    assert main([str(tmp_path / "a"), str(tmp_path / "c")]) == 1 and "DIFFERS last.ckpt" in capsys.readouterr().out
    (tmp_path / "c" / "eval" / "scores.jsonl").unlink()
    assert compare(tmp_path / "a", tmp_path / "c")["missing"] == ["eval/scores.jsonl"]


def test_only_times_and_commands_are_ignored_not_counts_named_like_them():
    from emu.demo.compare import diff_values

    old, new = {"n_out": 1, "needles_out": 2, "source_size": 3}, {"n_out": 2, "needles_out": 2, "source_size": 4}
    assert diff_values(old, new) == [(".n_out", 1.0), (".source_size", 1.0)]
    old = {"seconds_per_1k": 1.0, "images_per_second_per_rank": 5.0, "config": {"a": 1}}
    assert diff_values(old, {"seconds_per_1k": 2.0, "images_per_second_per_rank": 9.0, "config": {"a": 2}}) == []

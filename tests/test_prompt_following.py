"""CLIP score and zero-shot attribute accuracy of images against their prompts, with a CLIP loaded by path."""

import json

import torch

from emu.evaluation.prompt_following import load_sample_folder, main
from emu.mini.clip import HaystackAttributes
from emu.text.clip import ClipEmbedder
from emu.utils.images import to_uint8
from tests.conftest import haystack_batch


def test_clip_judge_scores_prompts_and_attributes(tiny_clip, tmp_path):
    from PIL import Image

    batch = haystack_batch(n=6)
    judge = ClipEmbedder(tiny_clip)
    prompts = list(batch["caption"])
    scores = judge.clip_score(batch["image"], prompts)
    assert scores.shape == (6,) and (scores >= 0).all() and (scores <= 100).all()
    # the score is the scaled cosine of the two embeddings
    cos = (judge.embed_images(batch["image"][:1]) @ judge.embed_texts(prompts[:1]).T).item()
    assert abs(float(scores[0]) - 100 * max(cos, 0)) < 1e-3

    metrics = HaystackAttributes().accuracy(judge, batch["image"], [*prompts[:-1], "not a haystack caption"])
    singles = sum(len(m["objects"]) == 1 for m in batch["meta"][:-1])
    assert metrics["n_scored"] == singles
    if singles:
        assert {"color_acc", "shape_acc", "background_acc"} <= set(metrics)

    folder = tmp_path / "samples"  # a sample.py-style folder round-trips through the CLI
    folder.mkdir()
    with (folder / "metadata.jsonl").open("w") as f:
        for i, (img, p) in enumerate(zip(to_uint8(batch["image"]), prompts, strict=True)):
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.png")
            f.write(json.dumps({"file": f"{i:05d}.png", "prompt": p}) + "\n")
    images, read = load_sample_folder(folder)
    assert read == prompts and (images - batch["image"]).abs().max() < 1 / 127
    main([str(folder), "--clip", str(tiny_clip)])
    out = json.loads((folder / "prompt_following.json").read_text())
    assert out["n_images"] == 6 and abs(out["clip_score"] - float(scores.mean())) < 0.5
    assert "n_scored" not in out  # no attribute scorer named: CLIP score only
    main([str(folder), "--clip", str(tiny_clip), "--attributes", "emu.mini.clip.HaystackAttributes"])
    out = json.loads((folder / "prompt_following.json").read_text())
    assert out["n_scored"] == sum(len(m["objects"]) == 1 for m in batch["meta"])
    assert torch.isfinite(torch.tensor(out["clip_score"]))

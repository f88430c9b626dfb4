"""Curation never loses labels: curate.py killed with SIGKILL mid-stage (twice, at different points) and re-run
gives the same funnel and the same curated set as a run that was never interrupted; what it had written stays
readable (tables, piece tables and labels are written whole, then renamed into place)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT


@pytest.fixture(scope="module")
def head(tiny_clip, tmp_path_factory):
    from emu.curation.aesthetic import train_head
    from emu.mini.aesthetic import haystack_ratings
    from emu.text.clip import ClipEmbedder

    emb, ratings = haystack_ratings(ClipEmbedder(tiny_clip), 64, seed=1, resolution=32)
    return train_head(emb, ratings, epochs=3)[0].save(tmp_path_factory.mktemp("aesthetic") / "head.safetensors")


def _cmd(out, tiny_clip, head):
    data = ["data=haystack", "data.source.n_train=480", "data.source.n_val=0", "data.resolution=32",
            "data.batch_size=8", "data.num_workers=0", "piece_size=96"]  # fmt: skip
    stages = [f"stages.aesthetic.head={head}", "stages.text_overlay.engine=off",
              "stages.aesthetic.keep.top_fraction=0.5", "stages.balance.per_class=120",  # 40 left the specialist pass
              # nothing to keep since the haystack's stripes (2026-12-02): 120 gives 125 -> 9 -> 2
              "stages.size_aspect.min_size=32"]  # fmt: skip
    return [sys.executable, "curate.py", f"out={out}", f"paths.output_dir={out}", f"hydra.run.dir={out}/hydra",
            f"clip={tiny_clip}", *data, *stages]  # fmt: skip


def _kill_when(cmd, ready, timeout=300):
    """Start ``cmd``; SIGKILL it as soon as ``ready()`` holds. Returns True if it was killed (False: it finished)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < timeout:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.02)
    proc.wait()
    return False


def _lines(path):
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _result(out):
    funnel = json.loads((out / "funnel.json").read_text())
    curated = sorted(json.loads(x)["file_name"] for x in (out / "curated" / "metadata.jsonl").read_text().splitlines())
    labels = sorted((out / "human").rglob("labels.jsonl"))
    return [(s["stage"], s["n_in"], s["n_out"]) for s in funnel["stages"]], curated, [p.read_text() for p in labels]


@pytest.mark.slow
def test_curate_py_killed_twice_gives_the_same_funnel(tmp_path, tiny_clip, head):
    straight = tmp_path / "straight"
    subprocess.run(_cmd(straight, tiny_clip, head), cwd=ROOT, check=True, capture_output=True)

    out = tmp_path / "killed"
    cmd = _cmd(out, tiny_clip, head)
    pieces = lambda: len(list((out / "scores" / "clip_score").glob("0*.jsonl")))
    assert _kill_when(cmd, lambda: pieces() >= 1), "killed while scoring (after its first piece of five)"
    assert pieces() < 5, "the stage had finished"
    assert _kill_when(cmd, lambda: (out / "human" / "generalist" / "labels.jsonl").is_file()), "killed after labels"
    for f in (out / "scores").rglob("*.jsonl"):  # what it left is whole (temporary files have other names)
        for line in f.read_text().splitlines():
            json.loads(line)
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _result(out) == _result(straight)

"""Curation at scale: the approximate near-duplicate search against brute force, the funnel shared by two
processes launched as torchrun launches them giving what one process gives, and memory that does not grow with the
corpus (streamed tables, top-k cuts found by histogram passes)."""

import json
import math
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import torch

from emu.curation.funnel import Funnel
from emu.curation.neighbours import Cells, EarlierNeighbours, search_cell
from emu.curation.pieces import CurationError
from emu.curation.stages import KeepRule, SizeAspect, Stage
from emu.curation.tables import kth_best, quantiles
from emu.data import EmuDataModule
from emu.mini.source import HaystackSource
from tests.conftest import ROOT


def _corpus(n: int = 4000, dim: int = 768, planted: int = 300, seed: int = 0) -> np.ndarray:
    """Standardised vectors (as thumbnails are) with ``planted`` near-copies of earlier ones."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    for i in rng.choice(np.arange(100, n), planted, replace=False):
        x[i] = x[rng.integers(0, i)] + rng.normal(0, rng.uniform(0.02, 0.25), dim).astype(np.float32)
    x -= x.mean(1, keepdims=True)
    return x / x.std(1, keepdims=True)


def _nearest_earlier(x: np.ndarray, index: str) -> np.ndarray:
    search = EarlierNeighbours("thumbnail", index)
    return np.concatenate([search.add(x[i : i + 256]) for i in range(0, len(x), 256)])


def test_the_approximate_search_finds_planted_near_duplicates_that_brute_force_finds():
    x = _corpus()
    exact, approx = _nearest_earlier(x, "flat"), _nearest_earlier(x, "hnsw")
    for i in (150, 2000, 3999):  # the exact index is brute force
        assert exact[i] == pytest.approx(np.sqrt(((x[i] - x[:i]) ** 2).mean(1)).min(), rel=1e-4)
    limit = 0.2
    truth = set(np.flatnonzero(exact <= limit))
    found = set(np.flatnonzero(approx <= limit))
    assert 150 < len(truth) < 300  # most of the planted copies are within the limit, no random pair is
    recall = len(found & truth) / len(truth)
    assert recall >= 0.95, recall
    assert found <= truth  # an approximate search can only miss a neighbour, never invent one
    assert np.all(approx >= exact - 1e-3)  # (faiss's flat search expands |x-y|² in float32: ~1e-3 off near 0)


def _cells_nearest_earlier(x: np.ndarray, cells: int, probe: int, index: str = "flat") -> np.ndarray:
    """The search partitioned into cells, as the stage runs it: each cell an ordered pass, the least distance kept."""
    partition = Cells.train(x[:2000], cells, probe)
    probed = partition.assign(x)
    best = np.full(len(x), np.inf)
    for cell in range(cells):
        rows = np.flatnonzero((probed == cell).any(1))  # searched here, in the source's order
        stored = probed[rows, 0] == cell  # stored here: its own cell
        starts = range(0, len(rows), 256)  # in pieces
        chunks = ((x[rows[i : i + 256]], stored[i : i + 256]) for i in starts)
        for i, d in zip(starts, search_cell(chunks, EarlierNeighbours("thumbnail", index)), strict=True):
            np.minimum.at(best, rows[i : i + 256], d)
    return best


@pytest.mark.parametrize("index", ["flat", "hnsw"])
@pytest.mark.parametrize("threads", [1, 2])
def test_near_duplicate_distances_are_exact_whatever_the_threads(index, threads):
    """Thumbnail-like vectors (norm ~16) and copies 1e-3 away, 40 at a time (faiss's exact search switches to BLAS
    from 20 queries): the expanded |x|^2 + |y|^2 - 2xy form in float32 got these small distances wrong by up to 100%
    (0 for some), differently with the threads; from the differences they are exact, in and across batches."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 256)).astype(np.float32)
    copies = (x + rng.normal(scale=1e-3, size=x.shape)).astype(np.float32)
    exact = np.sqrt(((copies.astype(np.float64) - x) ** 2).mean(1))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        across = EarlierNeighbours("thumbnail", index)
        across.add(x)
        d_across = np.array(across.add(copies))
        within = np.array(EarlierNeighbours("thumbnail", index).add(np.concatenate([x, copies])))[40:]
    finally:
        torch.set_num_threads(before)
    np.testing.assert_allclose(d_across, exact, rtol=1e-6)
    np.testing.assert_allclose(within, exact, rtol=1e-6)


def test_one_cell_is_the_single_pass_and_more_cells_find_the_planted_near_duplicates():
    x = _corpus()
    exact = _nearest_earlier(x, "flat")
    assert np.array_equal(_cells_nearest_earlier(x, 1, 1), exact)
    truth = set(np.flatnonzero(exact <= 0.2))
    for cells, probe in ((8, 2), (8, 3)):
        approx = _cells_nearest_earlier(x, cells, probe)
        found = set(np.flatnonzero(approx <= 0.2))
        assert found <= truth and np.all(approx >= exact - 1e-3)  # a cell can only miss a neighbour
        assert len(found & truth) / len(truth) >= 0.95, (cells, probe, len(found & truth) / len(truth))


def _overrides(out, tiny_clip, aesthetic_head, cells=0):
    return [
        "experiment=mini/curate", f"out={out}", f"paths.output_dir={out}", f"clip={tiny_clip}", "data=haystack",
        "data.source.n_train=240",
        "data.source.n_val=0", "data.resolution=32", "data.batch_size=32", "data.num_workers=0", "piece_size=64",
        f"stages.aesthetic.head={aesthetic_head}", "stages.aesthetic.keep.top_fraction=0.5",
        "stages.text_overlay.engine=off", "stages.balance.per_class=40", "stages.size_aspect.min_size=32",
        "poll_seconds=0.2", f"stages.near_duplicates.cells={cells}",
    ]  # fmt: skip


@pytest.mark.parametrize("cells", [pytest.param(0, marks=pytest.mark.slow), 3])  # 0: one ordered search on rank 0
# (slow: make test-all); 3: the cells shared by the ranks
def test_two_ranks_curate_what_one_process_curates(tmp_path, tiny_clip, aesthetic_head, cells):
    from hydra import compose, initialize_config_dir

    import curate

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        one = curate.run(compose("curate", overrides=_overrides(tmp_path / "one", tiny_clip, aesthetic_head, cells)))

    out = tmp_path / "two"
    procs = []
    for rank in (0, 1):  # the variables torchrun sets (TORCHELASTIC_RUN_ID marks a torchelastic launch)
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "t"}
        cmd = [sys.executable, "curate.py", *_overrides(out, tiny_clip, aesthetic_head, cells),
               f"hydra.run.dir={tmp_path}/hydra{rank}"]  # fmt: skip
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    logs = [p.communicate(timeout=600)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    two = json.loads((out / "funnel.json").read_text())
    assert two["ranks"] == 2 and two["pieces"] == one["pieces"] == 4
    assert [(s["stage"], s["n_in"], s["n_out"]) for s in two["stages"]] == [
        (s["stage"], s["n_in"], s["n_out"]) for s in one["stages"]
    ]
    curated = [json.loads(r)["key"] for r in (out / "curated/metadata.jsonl").read_text().splitlines()]
    ref = [json.loads(r)["key"] for r in (tmp_path / "one/curated/metadata.jsonl").read_text().splitlines()]
    assert curated == ref and len(curated) == one["final"]["n"]
    for stage in ("clip_score", "aesthetic", "near_duplicates"):
        rows = {r["key"]: r for r in map(json.loads, (out / f"scores/{stage}.jsonl").read_text().splitlines())}
        ref_rows = {
            r["key"]: r for r in map(json.loads, (tmp_path / f"one/scores/{stage}.jsonl").read_text().splitlines())
        }
        assert rows.keys() == ref_rows.keys()
        assert all(rows[k]["score"] == pytest.approx(ref_rows[k]["score"], rel=1e-5, abs=1e-6) for k in rows)
    ranks = {json.loads(line)["key"] for p in (out / "index").glob("*.jsonl") for line in p.read_text().splitlines()}
    assert len(ranks) == 240


# ------------------------------------------------------------------------------------------------ bounded memory
@pytest.mark.parametrize("lowest", [False, True])
@pytest.mark.parametrize("small", [8, 1 << 16])  # 8: the histogram passes run; 65536: the candidates sort at once
def test_kth_best_streams_to_the_exact_cut(lowest, small):
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0, 3, 3000), rng.integers(-3, 4, 2000).astype(float), [0.0, -0.0, 1e300]])
    rng.shuffle(values)
    chunks = lambda: iter(np.array_split(values, 7))
    ordered = np.sort(values) if lowest else np.sort(values)[::-1]
    for k in (1, 2, 17, 1000, 2500, len(values)):
        cut, better = kth_best(chunks, k, lowest, small=small)
        assert cut == ordered[k - 1]
        assert better == int(((values < cut) if lowest else (values > cut)).sum())
    assert quantiles(chunks, [0, 0.5, 1]) == [ordered.min(), np.sort(values)[(len(values) - 1) // 2], ordered.max()]
    tied = lambda: iter([np.full(3000, 2.5), np.full(2000, -1.0)])  # more equal values than `small` at the cut
    assert kth_best(tied, 3001, lowest, small=small) == ((2.5, 2000) if lowest else (-1.0, 3000))


def test_a_streamed_rule_keeps_what_the_sorted_rule_keeps_ties_in_source_order():
    rng = np.random.default_rng(1)
    scores = {f"k{i}": float(rng.integers(0, 20)) for i in range(600)}  # many ties at every cut
    for rule in (KeepRule(top_k=50), KeepRule(top_fraction=0.3, lowest=True), KeepRule(min=3, max=15, top_k=100)):
        passing = [k for k, s in scores.items() if rule.passes(s)]
        n = min(len(passing), rule.top_k or len(passing), math.ceil((rule.top_fraction or 1) * len(scores)))
        by_score = sorted(passing, key=lambda k: scores[k] if rule.lowest else -scores[k])  # stable: source order
        assert rule.select(scores) == set(by_score[:n])
        keep = rule.stream(lambda: iter(np.array_split(np.array(list(scores.values())), 9)))  # pieces of a stream
        assert {k for k, s in scores.items() if keep(s)} == set(by_score[:n])
    with pytest.raises(CurationError, match="NaN"):
        KeepRule(top_k=1).select({"a": 1.0, "b": float("nan")})


class _Brightness(Stage):
    def score(self, batch):
        return batch["image"].float().mean((1, 2, 3)).tolist(), None


def _peak_bytes(n: int, out) -> int:
    """Python's peak allocations (tracemalloc: numpy's included) over a whole funnel of ``n`` images."""
    dm = EmuDataModule(HaystackSource(n_train=n, n_val=0, resolution=16), resolution=16, batch_size=100,
                       drop_last=False)  # fmt: skip
    stages = [SizeAspect(min_size=16, max_aspect=9), _Brightness("brightness", {"top_fraction": 0.5})]
    tracemalloc.start()
    try:
        report = Funnel(dm, stages, out, progress=False, piece_size=100, examples=2).run()
        assert report["final"]["n"] == n // 2
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.slow  # ~30 s: two corpus sizes through the funnel
def test_the_funnels_memory_does_not_grow_with_the_corpus(tmp_path):
    """Five times the images, the same peak: tables and decisions are streamed a piece at a time. (Holding a row per
    image, as the funnel did before, grows by ~1.7 KB per image: +1.4 MB here.)"""
    _peak_bytes(100, tmp_path / "warm")  # one-time allocations (imports, caches)
    small, large = _peak_bytes(200, tmp_path / "small"), _peak_bytes(1000, tmp_path / "large")
    assert large - small < 400_000, (small, large)

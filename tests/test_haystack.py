import json
import tarfile
from collections import Counter

import numpy as np
import pytest

from emu.mini import haystack
from emu.mini.haystack import FLAWS, caption_for, make_sample, metadata, scene_spec

META_FIELDS = {"caption", "appeal", "needle", "objects", "background", "flaws", "width", "height"}


def test_deterministic_in_seed_and_index():
    a_img, a_meta = make_sample(0, 17)
    b_img, b_meta = make_sample(0, 17)
    assert a_meta == b_meta
    assert np.array_equal(np.asarray(a_img), np.asarray(b_img))
    c_img, c_meta = make_sample(1, 17)
    assert c_meta["caption"] != a_meta["caption"] or not np.array_equal(np.asarray(a_img), np.asarray(c_img))


@pytest.fixture(scope="module")
def metas():
    return [metadata(scene_spec(0, i), 64, 64) for i in range(3000)]


def test_needle_fraction_and_definition(metas):
    frac = np.mean([m["needle"] for m in metas])
    assert 0.03 <= frac <= 0.05, frac
    for m in metas:
        assert 0.0 <= m["appeal"] <= 10.0
        if m["needle"]:
            assert not m["flaws"] and m["appeal"] >= haystack.NEEDLE_APPEAL
    needles = [m["appeal"] for m in metas if m["needle"]]
    others = [m["appeal"] for m in metas if not m["needle"]]
    assert np.mean(needles) > np.mean(others) + 3


def test_every_flaw_occurs_and_costs_appeal(metas):
    counts = Counter(f for m in metas for f in m["flaws"])
    assert set(counts) == set(FLAWS)
    clean = np.mean([m["appeal"] for m in metas if not m["flaws"]])
    for flaw in FLAWS:
        with_flaw = np.mean([m["appeal"] for m in metas if flaw in m["flaws"]])
        assert with_flaw < clean, flaw


def test_captions_state_the_metadata(metas):
    for m in metas[:500]:
        assert m["caption"] == caption_for(m["objects"], m["background"])
        for obj in m["objects"]:
            assert f"{obj['size']} {obj['color']} {obj['shape']}" in m["caption"]
        assert m["caption"].endswith(f"on a {m['background']} background")
        assert len({o["position"] for o in m["objects"]}) == len(m["objects"])  # distinct grid cells


def test_near_duplicates_copy_an_earlier_scene(metas):
    dups = [m for m in metas if "near_duplicate" in m["flaws"]]
    assert dups
    for m in dups[:50]:
        src = metas[int(m["duplicate_of"])]
        assert int(m["duplicate_of"]) < m["index"]
        assert src["caption"] == m["caption"]
        a, _ = make_sample(0, m["index"])
        b, _ = make_sample(0, src["index"])
        diff = np.abs(np.asarray(a, float) - np.asarray(b, float)).mean()
        assert diff < 40  # near, not identical (jitter and exposure)


def test_rendered_size_matches_metadata_and_flaws_show():
    seen_odd = False
    for i in range(200):
        img, meta = make_sample(0, i, resolution=32)
        assert img.mode == "RGB" and img.size == (meta["width"], meta["height"])
        if "odd_aspect" in meta["flaws"]:
            seen_odd = True
            assert img.size[0] != img.size[1] and min(img.size) == 32
        else:
            assert img.size == (32, 32)
    assert seen_odd
    spec = scene_spec(0, next(i for i in range(100) if not scene_spec(0, i)["flaws"]))
    clean = np.asarray(haystack.render(spec, 64), float)
    dark = np.asarray(haystack.render({**spec, "flaws": ["too_dark"]}, 64), float)
    assert dark.mean() < 0.5 * clean.mean()


def test_cli_writes_valid_shards(tmp_path, capsys):
    haystack.main(["--n", "64", "--out", str(tmp_path), "--shard-size", "40", "--resolution", "32"])
    assert "wrote 64 images" in capsys.readouterr().out
    shards = sorted(tmp_path.glob("*.tar"))
    assert [p.name for p in shards] == ["00000.tar", "00001.tar"]
    members = Counter()
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                members[ext] += 1
                if ext == "json":
                    meta = json.loads(tar.extractfile(member).read())
                    assert set(meta) >= META_FIELDS and meta["key"] == key
                    assert {"shape", "color", "size", "position"} == set(meta["objects"][0])
    assert members == {"png": 64, "txt": 64, "json": 64}
    summary = json.loads((tmp_path / "haystack.json").read_text())
    assert summary["n"] == 64 and summary["images_per_second"] > 0


def test_parse_caption_inverts_caption_for():
    for i in range(300):
        spec = haystack.scene_spec(0, i)
        parsed = haystack.parse_caption(haystack.caption_for(spec["objects"], spec["background"]))
        assert parsed["background"] == spec["background"]
        assert parsed["objects"] == [{k: o[k] for k in ("size", "color", "shape", "position")} for o in spec["objects"]]
    for other in ["a cat", "a large red circle in the center on a plaid background", "bond", ""]:
        assert haystack.parse_caption(other) is None


def test_fine_stripes_are_hidden_periodic_detail_that_leaves_the_scene_alone(metas):
    """A share of backgrounds carry stripes of period 1/16 of the side: never captioned, no appeal cost, drawn
    from their own random stream (the scene is otherwise the same), and present in the pixels at that period."""
    share = np.mean([m["style"]["stripes"] is not None for m in metas])
    assert abs(share - haystack.P_STRIPES) < 0.04, share
    striped = [m for m in metas if m["style"]["stripes"] and not m["flaws"]][:5]
    assert len(striped) == 5
    assert {m["style"]["stripes"] for m in metas} == {None, "horizontal", "vertical"}
    for meta in striped:
        spec = scene_spec(0, meta["index"])
        plain = {**spec, "style": {**spec["style"], "stripes": None}}
        assert caption_for(spec["objects"], spec["background"]) == meta["caption"]
        a = np.asarray(haystack.render(spec, 64), float).mean(-1)
        b = np.asarray(haystack.render(plain, 64), float).mean(-1)
        diff = a - b
        profile = diff.mean(1) if spec["style"]["stripes"] == "horizontal" else diff.mean(0)
        spectrum = np.abs(np.fft.rfft(profile - profile.mean()))
        assert spectrum.argmax() == 64 // 4, spectrum.argmax()  # 16 cycles across 64 px: a period of 4 px
        assert np.abs(diff).mean() > 3.0  # visible, not a rounding error


def test_as_needle_keeps_the_scene_and_removes_every_flaw(metas):
    for i in range(40):
        spec = scene_spec(0, i)
        needle = haystack.as_needle(spec)
        assert needle["objects"] == spec["objects"] and needle["background"] == spec["background"]
        assert needle["flaws"] == [] and needle["aspect"] == [1.0, 1.0] and needle["duplicate_of"] is None
        assert needle["style"]["light"] == 1.0 and needle["style"]["depth"] is True
        assert needle["appeal"] == haystack.style_appeal(needle["style"]) >= spec["appeal"] - 0.9  # noise: sd 0.3
        assert haystack.render(needle, 32).size == (32, 32)

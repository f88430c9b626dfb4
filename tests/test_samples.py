import pytest
import torch
from PIL import Image

from emu.data.samples import BadSample, SamplePreparer, collate, decode_image, swap_left_right
from tests.conftest import bad_corpus, exif_rotated_jpeg, rgb_image


@pytest.mark.parametrize("name,data,caption,reason", bad_corpus(), ids=[c[0] for c in bad_corpus()])
def test_each_bad_input_is_converted_or_skipped_with_its_reason(name, data, caption, reason):
    prepare = SamplePreparer(resolution=32, min_size=16)
    raw = {"key": name, "image": data, "caption": caption, "meta": {}}
    if reason is None:
        out = prepare(raw)
        assert out["image"].shape == (3, 32, 32) and out["image"].dtype == torch.float32
        assert out["image"].min() >= -1.0 and out["image"].max() <= 1.0
    else:
        with pytest.raises(BadSample) as e:
            prepare(raw)
        assert e.value.reason == reason


def test_conversions_keep_content():
    assert decode_image(exif_rotated_jpeg()).size == (64, 48)  # EXIF transpose applied
    import numpy as np

    from tests.conftest import png_bytes

    gray16 = Image.fromarray(np.full((8, 8), 65535, np.uint16))
    assert np.asarray(decode_image(png_bytes(gray16))).min() == 255  # scaled, not clipped at 255/65535
    half = Image.fromarray(np.full((8, 8), 32768, np.uint16))
    assert abs(int(np.asarray(decode_image(png_bytes(half)))[0, 0, 0]) - 128) <= 1
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert np.asarray(decode_image(png_bytes(rgba))).min() == 255  # transparent -> white


def test_preparer_crop_flip_and_caption_swap():
    img = Image.new("RGB", (128, 64), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 64, 64))  # left half blue
    raw = {"key": "k", "image": img, "caption": "a red circle on the left", "meta": {}}
    out = SamplePreparer(resolution=32, crop="center")(raw)
    assert out["image"].shape == (3, 32, 32)
    flipped = SamplePreparer(resolution=32, crop="center", hflip=1.0)(raw)
    assert torch.allclose(flipped["image"], out["image"].flip(-1))
    assert flipped["caption"] == "a red circle on the right" and flipped["meta"]["flipped"]
    assert swap_left_right("top left and bottom right, leftover") == "top right and bottom left, leftover"


def test_collate_builds_the_documented_batch():
    prepare = SamplePreparer(resolution=16)
    samples = [
        prepare({"key": str(i), "image": rgb_image(seed=i), "caption": f"c{i}", "meta": {"i": i}}) for i in range(3)
    ]
    batch = collate(samples)
    assert batch["image"].shape == (3, 3, 16, 16)
    assert batch["caption"] == ["c0", "c1", "c2"] and batch["key"] == ["0", "1", "2"]
    assert batch["meta"][2] == {"i": 2, "source_size": [64, 64], "original_size": [64, 64], "crop_top_left": [0, 0],
                                "target_size": [16, 16]}  # fmt: skip
    assert set(batch) == {"image", "caption", "key", "meta"}


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="crop"):
        SamplePreparer(crop="middle")
    with pytest.raises(ValueError, match="hflip"):
        SamplePreparer(hflip=2.0)

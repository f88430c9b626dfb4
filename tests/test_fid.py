"""emu.evaluation.fid: Fréchet distances on in-memory images, cached reference statistics, local Inception loading."""

from __future__ import annotations

import warnings
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cleanfid.resize import build_resizer
from torch import nn

from emu.evaluation import fid


def random_conv_features(dim: int = 24, seed: int = 0):
    """A fixed random conv net with global average pooling: images in [-1, 1] -> ``dim`` features."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, dim, 3, stride=2, padding=1), nn.Tanh(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    ).eval()  # fmt: skip
    return net


def smooth_images(n: int = 200, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Structured images in [-1, 1]: upsampled low-resolution noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 3, 4, 4, generator=g)
    return torch.tanh(F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False))


@pytest.fixture(scope="module")
def extractor() -> fid.FeatureExtractor:
    return fid.custom_extractor("randconv", random_conv_features())


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return smooth_images()


def direct_frechet(f1: np.ndarray, f2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), with Tr sqrt(S1 S2) = sum sqrt eig(S1^1/2 S2 S1^1/2)."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def test_distance_is_zero_on_itself_and_grows_with_noise(extractor, images):
    report = fid.fid_report(extractor, images, images)
    assert report["metric"] == "fd_randconv" and report["features"] == "randconv" and report["mode"] is None
    assert report["n_images"] == report["n_reference"] == 200 and report["feature_dim"] == 24
    assert report["warning"] is None
    assert abs(report["value"]) < 1e-8

    # the reference as statistics (mu, sigma, n) gives the same value as the reference images
    stats = fid.Statistics(*fid.statistics(fid.features(extractor, images)), 200)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    values = []
    for std in (0.05, 0.2, 0.5):
        noisy = (images + std * noise).clamp(-1, 1)
        r = fid.fid_report(extractor, noisy, stats)
        assert r["value"] == pytest.approx(fid.fid_report(extractor, noisy, images)["value"], rel=1e-9)
        values.append(r["value"])
    assert 0 < values[0] < values[1] < values[2], values


def test_distance_matches_direct_computation(extractor, images):
    f1 = fid.features(extractor, images, batch_size=64)
    f2 = fid.features(extractor, smooth_images(150, seed=3) * 0.8 + 0.1)
    assert f1.dtype == np.float64 and f1.shape == (200, 24) and f2.shape == (150, 24)
    expected = direct_frechet(f1, f2)
    assert expected > 0
    assert fid.frechet_distance_from_features(f1, f2) == pytest.approx(expected, rel=1e-6)
    assert fid.frechet(fid.statistics(f1), fid.statistics(f2)) == pytest.approx(expected, rel=1e-6)
    # batches streamed from an iterable give the same features as one tensor
    np.testing.assert_allclose(fid.features(extractor, iter(images.split(37))), f1, rtol=1e-12, atol=1e-12)


def test_distance_is_clean_fids_on_a_scipy_without_sqrtm_disp(monkeypatch):
    """SciPy >= 1.18 (Python >= 3.12) dropped ``sqrtm(..., disp=False)``, which clean-fid 0.1.35 calls: the adapter
    gives clean-fid the old signature; forced here whatever SciPy is installed, the distance is the same."""
    rng = np.random.default_rng(0)
    f1, f2 = rng.normal(size=(60, 8)), rng.normal(0.3, 1.2, size=(50, 8))
    expected = direct_frechet(f1, f2)
    monkeypatch.setattr(fid, "SQRTM_TAKES_DISP", False)
    calls = []
    sqrtm = fid._ScipyLinalgWithDisp.sqrtm
    monkeypatch.setattr(fid._ScipyLinalgWithDisp, "sqrtm", staticmethod(lambda a, disp=True: calls.append(disp)
                                                                       or sqrtm(a, disp)))  # fmt: skip
    assert fid.frechet_distance_from_features(f1, f2) == pytest.approx(expected, rel=1e-6)
    assert calls == [False]  # clean-fid's own call, through the adapter
    a = np.cov(f1, rowvar=False) @ np.cov(f2, rowvar=False)
    root, err = sqrtm(a, disp=False)
    np.testing.assert_allclose(root @ root, a, rtol=1e-8, atol=1e-10)
    assert 0 <= err < 1e-10 and isinstance(sqrtm(a), np.ndarray)


def test_reference_statistics_are_cached(tmp_path, extractor, images):
    calls = []

    def load() -> torch.Tensor:
        calls.append(1)
        return images

    key = "haystack_needles:200|32|randconv"  # not a file name: sanitised + hashed
    first = fid.cached_reference_statistics(tmp_path / "cache", key, extractor, load)
    second = fid.cached_reference_statistics(tmp_path / "cache", key, extractor, load)
    assert len(calls) == 1
    assert first.n == second.n == 200
    np.testing.assert_array_equal(first.mu, second.mu)
    np.testing.assert_array_equal(first.sigma, second.sigma)
    files = list((tmp_path / "cache").iterdir())
    assert files == [fid.cache_path(tmp_path / "cache", key)] and files[0].suffix == ".npz"  # no temp file left
    mu, sigma, n = second  # unpacks as (mu, sigma, n)
    assert mu.shape == (24,) and sigma.shape == (24, 24) and n == 200
    # another extractor under the same key is not served the wrong statistics
    other = fid.custom_extractor("other", random_conv_features(seed=5))
    with pytest.warns(UserWarning, match="other features"):
        fid.cached_reference_statistics(tmp_path / "cache", key, other, load)
    assert len(calls) == 2


def test_few_images_warn_and_one_image_refused(extractor, images):
    with pytest.warns(UserWarning, match=r"fd_randconv from 10 images \(< 24"):
        report = fid.fid_report(extractor, images[:10], images)
    assert "10 images" in report["warning"] and "compare only at equal N" in report["warning"]
    with pytest.warns(UserWarning, match=r"12 reference images \(< 24"):
        fid.fid_report(extractor, images, images[:12])
    message = fid.sample_size_warning("fid", 64, fid.INCEPTION_DIM)
    assert message.startswith("FID from 64 images (< 2048") and "biased upward" in message
    assert fid.sample_size_warning("fid", 2048, 2048) is None
    with pytest.raises(ValueError, match="at least 2 images"):
        fid.fid_report(extractor, images[:1], images)
    with pytest.raises(ValueError, match="at least 2 images"):
        fid.statistics(np.zeros((1, 24)))


def test_missing_inception_weights_say_where_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv(fid.ENV_VAR, str(tmp_path))  # an explicit path is the only place searched
    (tmp_path / fid.TORCHSCRIPT_FILE).write_bytes(b"")
    for missing in (tmp_path / "nope", tmp_path / "weights" / fid.TORCHSCRIPT_FILE):
        with pytest.raises(fid.InceptionWeightsMissing) as err:
            fid.inception_extractor(weights=missing)
        assert isinstance(err.value, FileNotFoundError)
        message = str(err.value)
        for needed in ("fid.inception=", fid.TORCHSCRIPT_FILE, fid.ENV_VAR, fid.TORCHSCRIPT_URL, str(missing)):
            assert needed in message, (needed, message)
        assert err.value.searched == [missing if missing.suffix else missing / fid.TORCHSCRIPT_FILE]
    with pytest.raises(fid.InceptionWeightsMissing, match=r"pt_inception-2015-12-05-6726825d\.pth"):
        fid.inception_extractor(weights=tmp_path / "nope", mode="legacy_pytorch")
    with pytest.raises(ValueError, match="unknown clean-fid mode"):
        fid.inception_extractor(weights=tmp_path, mode="bicubic")


class _Layers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 13, stride=13)
        self.fc = nn.Linear(4, fid.INCEPTION_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean(dim=(2, 3)))[:, :, None, None]


class _FakeInception(nn.Module):
    """Same call signature as the torchscript file clean-fid's InceptionV3W loads: ``.layers`` on normalised 299²
    inputs, and ``forward(x in [0, 255], return_features=True)`` resizing inside."""

    def __init__(self):
        super().__init__()
        self.layers = _Layers()

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.layers((x - 128) / 128)


@pytest.fixture(scope="module")
def fake_inception_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("inception")
    module = _FakeInception().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, but it is clean-fid's format
        torch.jit.script(module).save(str(folder / fid.TORCHSCRIPT_FILE))
    return folder, module


def test_inception_loads_from_a_local_torchscript_file(fake_inception_dir, monkeypatch):
    folder, module = fake_inception_dir
    images = smooth_images(5, size=40, seed=2)
    ex = fid.inception_extractor(folder)  # a folder holding the file
    assert ex.is_inception and ex.metric == "fid" and ex.mode == "clean" and ex.dim == 2048
    feats = fid.features(ex, images, batch_size=2)
    assert feats.shape == (5, 2048)
    # clean mode: uint8 quantisation, clean-fid's PIL bicubic resize, (x - 128) / 128, then the network
    resize = build_resizer("clean")
    u8 = ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    x = torch.from_numpy(np.stack([resize(im) for im in u8])).permute(0, 3, 1, 2)
    with torch.no_grad():
        expected = module.layers((x - 128) / 128).reshape(5, -1).double().numpy()
    np.testing.assert_allclose(feats, expected, rtol=1e-4, atol=1e-5)

    tf = fid.inception_extractor(folder / fid.TORCHSCRIPT_FILE, mode="legacy_tensorflow")  # the file itself
    assert tf.name != ex.name and fid.features(tf, images).shape == (5, 2048)
    monkeypatch.setenv(fid.ENV_VAR, str(folder))  # found through the environment variable
    assert fid.features(fid.inception_extractor(None), images[:2]).shape == (2, 2048)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        fid.features(ex, images * 127.5 + 127.5)


def test_legacy_pytorch_loads_pytorch_fid_weights_from_disk(tmp_path):
    from cleanfid import inception_pytorch

    # the pytorch-fid network with random weights, saved where a user would put the real file
    with (
        mock.patch.object(inception_pytorch, "load_state_dict_from_url", lambda *a, **k: None),
        mock.patch("torchvision.models.Inception3.load_state_dict", lambda self, sd: None),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        net = inception_pytorch.fid_inception_v3()
    torch.manual_seed(0)
    state = {k: torch.randn_like(v) * 0.01 if v.is_floating_point() else v for k, v in net.state_dict().items()}
    torch.save(state, tmp_path / fid.PYTORCH_FID_FILE)

    ex = fid.inception_extractor(tmp_path, mode="legacy_pytorch")
    assert ex.mode == "legacy_pytorch" and ex.metric == "fid"
    assert isinstance(ex.network, inception_pytorch.InceptionV3)
    assert torch.equal(ex.network.blocks[0][0].conv.weight, state["Conv2d_1a_3x3.conv.weight"])
    assert torch.equal(ex.network.blocks[3][2].branch_pool.conv.weight, state["Mixed_7c.branch_pool.conv.weight"])


@pytest.mark.parametrize("mode", ["clean", "legacy_tensorflow"])
def test_in_memory_features_equal_clean_fid_on_a_png_folder(fake_inception_dir, tmp_path, mode):
    """The same images saved as PNG and run through clean-fid's own folder pipeline give the same features."""
    from cleanfid.fid import get_folder_features
    from cleanfid.inception_torchscript import InceptionV3W
    from PIL import Image

    folder, _ = fake_inception_dir
    images = smooth_images(6, size=48, seed=4)
    u8 = ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, im in enumerate(u8):
        Image.fromarray(im).save(tmp_path / f"{i:02d}.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = InceptionV3W(str(folder), download=False, resize_inside=mode == "legacy_tensorflow").eval()
        theirs = get_folder_features(str(tmp_path), net, num_workers=0, batch_size=4, device=torch.device("cpu"),
                                     mode=mode, verbose=False)  # fmt: skip
    ours = fid.features(fid.inception_extractor(folder, mode=mode), images, batch_size=4)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)

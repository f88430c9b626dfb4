"""Fréchet distances on in-memory images: FID with clean-fid's Inception, and the same distance on domain features.

The distance (``cleanfid.fid.frechet_distance``), the Inception network (clean-fid's torchscript ``InceptionV3W``,
or its pytorch-fid port for ``legacy_pytorch``) and the resizing per mode (``cleanfid.resize.build_resizer``) are
clean-fid's own; this module only feeds them tensors instead of folders, never downloads anything, caches reference
statistics, and says when a value is not worth comparing::

    from emu.evaluation import fid

    ex = fid.inception_extractor("weights/", mode="clean")        # or fid.custom_extractor("clip", embed_images)
    ref = fid.cached_reference_statistics("cache/fid", "needles-1024", ex, lambda: reference_images)
    report = fid.fid_report(ex, generated_images, ref)            # {"metric": "fid", "value": 12.3, ...}

Images are float tensors ``N x 3 x H x W`` in [-1, 1] (or an iterable of such batches). For Inception they are
quantised to uint8 first, exactly what saving them as PNG and running clean-fid on the folder would see.

Weights are looked for, in order, at the path given, else ``$EMU_INCEPTION_WEIGHTS``, else clean-fid's own cache
(``/tmp`` for the torchscript file, torch hub's ``checkpoints/`` for the pytorch-fid file); a missing file raises
:class:`InceptionWeightsMissing`, which says where to fetch it. Features other than Inception's are reported as
``fd_<name>`` ("Fréchet distance on <name> features"), never as FID: their values are not comparable to FID.

With fewer images than the feature dimension (2048 for Inception) the covariance is rank-deficient and the
distance biased upward: :func:`fid_report` then warns and says so in its ``warning`` field. Cost on CPU: the
Inception forward pass is about 2.5 s per image on 2 cores, and one 2048-dimensional matrix square root (inside
clean-fid's distance) takes one to two minutes there.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import platform
import re
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple
from unittest import mock

import cleanfid.fid
import numpy as np
import scipy.linalg
import torch
from cleanfid.downloads_helper import inception_url as TORCHSCRIPT_URL
from cleanfid.fid import frechet_distance as _cleanfid_frechet_distance
from cleanfid.inception_pytorch import FID_WEIGHTS_URL as PYTORCH_FID_URL
from cleanfid.inception_torchscript import InceptionV3W
from cleanfid.resize import build_resizer
from torch import Tensor, nn

ENV_VAR = "EMU_INCEPTION_WEIGHTS"
CONFIG_OPTION = "fid.inception"
MODES = ("clean", "legacy_pytorch", "legacy_tensorflow")
INCEPTION_DIM = 2048
TORCHSCRIPT_FILE = "inception-2015-12-05.pt"  # clean / legacy_tensorflow: clean-fid's InceptionV3W
PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"  # legacy_pytorch: pytorch-fid's port of the same net

ImageBatches = Tensor | Iterable[Tensor]


class InceptionWeightsMissing(FileNotFoundError):
    """The Inception weights file is not on disk; nothing is downloaded at run time."""

    def __init__(self, filename: str, searched: list[Path], url: str, mode: str, option: str = CONFIG_OPTION):
        self.weights_file, self.searched, self.url, self.mode, self.option = filename, searched, url, mode, option
        places = ", ".join(str(p) for p in searched) or "(nowhere)"
        message = (
            f"Inception weights '{filename}' for FID (mode={mode}) not found; searched: {places}\n"
            f"Nothing is downloaded at run time. On a machine with internet fetch {url}, copy it here, then pass "
            f"{option}=PATH (the file or the folder holding it) or set the environment variable {ENV_VAR}=PATH."
        )
        super().__init__(message)
        self.args = (message,)  # OSError would read five arguments as (errno, strerror, filename, ...)


@dataclass(frozen=True)
class FeatureExtractor:
    """A named map from images in [-1, 1] (``N x 3 x H x W``) to features (``N x D``)."""

    name: str
    is_inception: bool
    fn: Callable[[Tensor], Tensor | np.ndarray] = field(repr=False)
    mode: str | None = None  # clean-fid's resizing mode, for Inception only
    dim: int | None = None  # feature dimension when known up front
    network: nn.Module | None = field(default=None, repr=False, compare=False)  # the Inception net, if any

    @property
    def metric(self) -> str:
        """``fid`` for Inception, ``fd_<name>`` (Fréchet distance on <name> features) for anything else."""
        return "fid" if self.is_inception else f"fd_{self.name}"

    def __call__(self, images: Tensor) -> Tensor | np.ndarray:
        return self.fn(images)


class Statistics(NamedTuple):
    """Mean and covariance of a feature set, and how many images they came from."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int | None


# ------------------------------------------------------------------------------------------------ extractors
def custom_extractor(name: str, fn: Callable[[Tensor], Tensor | np.ndarray]) -> FeatureExtractor:
    """Domain features (e.g. the mini CLIP image tower); reported as ``fd_<name>``, never as FID."""
    if not name or not name.strip():
        raise ValueError("a custom feature extractor needs a non-empty name (reported as fd_<name>)")
    return FeatureExtractor(name=name, is_inception=False, fn=fn)


def default_search_dirs(mode: str) -> list[Path]:
    """Where clean-fid itself caches the weights for ``mode`` (checked after the explicit path and the env var)."""
    if mode == "legacy_pytorch":
        return [Path(torch.hub.get_dir()) / "checkpoints"]  # where load_state_dict_from_url puts it
    return [Path("./" if platform.system() == "Windows" else "/tmp")]  # cleanfid.features.feature_extractor


def find_inception_weights(weights: str | Path | None, mode: str = "clean", option: str = CONFIG_OPTION) -> Path:
    """The local weights file for ``mode``: ``weights`` (file or folder) if given, and only there; else the env var
    ``EMU_INCEPTION_WEIGHTS``, then clean-fid's default cache. Raises :class:`InceptionWeightsMissing`."""
    _check_mode(mode)
    filename, other, url = (
        (PYTORCH_FID_FILE, TORCHSCRIPT_FILE, PYTORCH_FID_URL)
        if mode == "legacy_pytorch"
        else (TORCHSCRIPT_FILE, PYTORCH_FID_FILE, TORCHSCRIPT_URL)
    )

    def candidate(p: Path) -> Path:
        p = p.expanduser()
        if p.is_dir():
            return p / filename
        if p.name == other:  # the other mode's file: look beside it
            return p.parent / filename
        return p if p.exists() or p.suffix in (".pt", ".pth") else p / filename

    if weights is not None and str(weights) != "":
        searched = [candidate(Path(weights))]
    else:
        env = os.environ.get(ENV_VAR)
        searched = [candidate(Path(env))] if env else []
        searched += [d / filename for d in default_search_dirs(mode)]
    for p in searched:
        if p.is_file():
            return p
    raise InceptionWeightsMissing(filename, searched, url, mode, option)


class _LocalInceptionV3W(InceptionV3W):
    """clean-fid's ``InceptionV3W`` (its forward: normalisation, resize inside for legacy_tensorflow) loaded from
    an explicit file; the parent's ``__init__`` is skipped because it may download and fixes the file name."""

    def __init__(self, file: Path, resize_inside: bool):
        nn.Module.__init__(self)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated": clean-fid's format
            self.base = torch.jit.load(str(file), map_location="cpu").eval()
        self.layers = self.base.layers
        self.resize_inside = resize_inside


def _pytorch_fid_inception(file: Path) -> nn.Module:
    """clean-fid's ``InceptionV3`` (pytorch-fid port, pool3 block) with its weights read from ``file``, not a URL."""
    from cleanfid import inception_pytorch

    state = torch.load(str(file), map_location="cpu", weights_only=True)
    with (
        mock.patch.object(inception_pytorch, "load_state_dict_from_url", lambda *a, **k: state),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore", UserWarning)  # torchvision's 'pretrained' deprecation, from clean-fid
        return inception_pytorch.InceptionV3(output_blocks=[3], resize_input=False).eval()


def inception_extractor(
    weights: str | Path | None = None,
    mode: str = "clean",
    device: str | torch.device = "cpu",
    option: str = CONFIG_OPTION,
) -> FeatureExtractor:
    """FID features (2048-d pool3) from clean-fid's Inception, loaded from a local file, resized per ``mode``.

    ``weights``: the ``.pt`` file (``.pth`` for ``legacy_pytorch``) or a folder holding it; None searches
    ``$EMU_INCEPTION_WEIGHTS`` then clean-fid's cache. ``option`` is the config key named in the error message.
    """
    file = find_inception_weights(weights, mode, option)
    device = torch.device(device)
    if mode == "legacy_pytorch":
        net = _pytorch_fid_inception(file).to(device)
        run = lambda x: net(x / 255)[0].squeeze(-1).squeeze(-1)  # as cleanfid.features.feature_extractor
    else:
        net = _LocalInceptionV3W(file, resize_inside=mode == "legacy_tensorflow").to(device).eval()
        run = net
    with warnings.catch_warnings():  # clean-fid's PyTorch resizer sets a global "ignore all warnings" filter
        resize = build_resizer(mode)

    def fn(images: Tensor) -> Tensor:
        x = _to_uint8_hwc(images)
        if mode != "legacy_tensorflow":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # Pillow's fromarray(mode=) in clean-fid
                x = np.stack([resize(img) for img in x])
        batch = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float().to(device)
        return run(batch).reshape(len(batch), -1)

    return FeatureExtractor(f"inception_v3_{mode}", True, fn, mode=mode, dim=INCEPTION_DIM, network=net)


def _to_uint8_hwc(images: Tensor) -> np.ndarray:
    """[-1, 1] float ``N x 3 x H x W`` to uint8 ``N x H x W x 3`` (what a PNG of the image holds)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"Inception needs images N x 3 x H x W, got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"images must be float in [-1, 1], got dtype {images.dtype}")
    peak = float(images.detach().abs().max()) if images.numel() else 0.0
    if peak > 2.0:
        raise ValueError(f"images must be in [-1, 1], got values up to {peak:.3g} (a [0, 255] image?)")
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown clean-fid mode '{mode}'; use one of {', '.join(MODES)}")


# ------------------------------------------------------------------------------------------------ statistics
def _batches(images: ImageBatches, batch_size: int) -> Iterator[Tensor]:
    for chunk in [images] if isinstance(images, Tensor) else images:
        if not isinstance(chunk, Tensor) or chunk.ndim != 4:
            raise ValueError(f"expected image tensors N x C x H x W, got {type(chunk).__name__} "
                             f"{tuple(getattr(chunk, 'shape', ()))}")  # fmt: skip
        yield from chunk.split(batch_size)


def features(extractor: FeatureExtractor, images: ImageBatches, batch_size: int = 64) -> np.ndarray:
    """Features (``N x D``, float64) of a tensor of images or an iterable of image batches."""
    out = []
    with torch.no_grad():
        for batch in _batches(images, batch_size):
            f = extractor(batch)
            f = f.detach().double().cpu().numpy() if isinstance(f, Tensor) else np.asarray(f, dtype=np.float64)
            if f.shape[0] != len(batch):
                raise ValueError(f"{extractor.name}: {len(batch)} images gave {f.shape[0]} feature rows")
            out.append(f.reshape(len(batch), -1))
    if not out:
        raise ValueError("no images given")
    feats = np.concatenate(out)
    if not np.isfinite(feats).all():
        raise ValueError(f"{extractor.name} produced non-finite features")
    return feats


def statistics(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (``np.cov``, as clean-fid) of ``N x D`` features; needs N >= 2."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"a Fréchet distance needs at least 2 images, got features of shape {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False).reshape(feats.shape[1], feats.shape[1])


class _ScipyLinalgWithDisp:
    """``scipy.linalg`` as clean-fid 0.1.35 (the latest release) calls it: ``sqrtm(A, disp=False)`` returning ``(root,
    error estimate)``. SciPy 1.18 (Python >= 3.12) removed ``disp``; this gives clean-fid back the old signature
    (the error estimate as SciPy's was: ``||root @ root - A||_F / ||A||_F``), so the distance stays clean-fid's own."""

    @staticmethod
    def sqrtm(a: np.ndarray, disp: bool = True):
        root = scipy.linalg.sqrtm(a)
        if disp:
            return root
        return root, np.linalg.norm(root @ root - a, "fro") / np.linalg.norm(a, "fro")


SQRTM_TAKES_DISP = "disp" in inspect.signature(scipy.linalg.sqrtm).parameters  # SciPy < 1.18


def frechet(stats1: tuple | Statistics, stats2: tuple | Statistics) -> float:
    """Fréchet distance between two ``(mu, sigma[, n])`` via ``cleanfid.fid.frechet_distance`` (on SciPy >= 1.18
    through :class:`_ScipyLinalgWithDisp`)."""
    (mu1, s1), (mu2, s2) = stats1[:2], stats2[:2]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*`disp` argument is deprecated.*")  # scipy, inside clean-fid
        if SQRTM_TAKES_DISP:
            return float(_cleanfid_frechet_distance(mu1, s1, mu2, s2))
        with mock.patch.object(cleanfid.fid, "linalg", _ScipyLinalgWithDisp):
            return float(_cleanfid_frechet_distance(mu1, s1, mu2, s2))


def frechet_distance_from_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """Fréchet distance between two feature sets (``N x D`` and ``M x D``)."""
    return frechet(statistics(f1), statistics(f2))


# ------------------------------------------------------------------------------------------------ caching
def cache_path(cache_dir: str | Path, key: str) -> Path:
    """The ``.npz`` file for ``key``: the key itself when it is a safe file name, else a sanitised form + hash."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._")[:80]
    if safe != key or not safe:
        safe = f"{safe}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    return Path(cache_dir) / f"{safe}.npz"


def cached_reference_statistics(
    cache_dir: str | Path,
    key: str,
    extractor: FeatureExtractor,
    images_fn: Callable[[], ImageBatches],
    batch_size: int = 64,
) -> Statistics:
    """``(mu, sigma, n)`` of the reference images for ``extractor``, from ``cache_dir/<key>.npz`` when present
    (``images_fn`` is then not called), else computed and written atomically. ``key`` must identify the reference
    set and the extractor (name and mode); a cache written by another extractor is recomputed."""
    path = cache_path(cache_dir, key)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["features"]) == extractor.name and str(z["mode"]) == str(extractor.mode):
                    return Statistics(z["mu"], z["sigma"], int(z["n"]))
            warnings.warn(f"{path} holds statistics of other features; recomputing", stacklevel=2)
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
            warnings.warn(f"unreadable reference statistics {path} ({e}); recomputing", stacklevel=2)
    feats = features(extractor, images_fn(), batch_size)
    mu, sigma = statistics(feats)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma, n=len(feats), key=key, features=extractor.name, mode=str(extractor.mode))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Statistics(mu, sigma, len(feats))


# ------------------------------------------------------------------------------------------------ report
def sample_size_warning(metric: str, n: int, dim: int, what: str = "images") -> str | None:
    """The warning for ``n`` samples of ``dim``-dimensional features, or None when ``n >= dim``."""
    if n >= dim:
        return None
    label = "FID" if metric == "fid" else metric
    return (
        f"{label} from {n} {what} (< {dim}, the feature dimension): the covariance is rank-deficient and the "
        "value biased upward; compare only at equal N"
    )


def _reference_statistics(extractor: FeatureExtractor, reference: Any, batch_size: int) -> Statistics:
    if isinstance(reference, Statistics):
        return reference
    if isinstance(reference, tuple) and len(reference) in (2, 3) and isinstance(reference[0], np.ndarray):
        return Statistics(reference[0], reference[1], reference[2] if len(reference) == 3 else None)
    feats = features(extractor, reference, batch_size)
    return Statistics(*statistics(feats), len(feats))


def fid_report(
    extractor: FeatureExtractor,
    images: ImageBatches,
    reference: Statistics | tuple | ImageBatches,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Fréchet distance of ``images`` to ``reference`` (statistics ``(mu, sigma[, n])`` or images) as a dict:
    ``metric`` (``fid`` / ``fd_<name>``), ``value``, ``mode``, ``features``, ``feature_dim``, ``n_images``,
    ``n_reference`` and ``warning`` (also issued with ``warnings.warn``) when a set is smaller than the dimension."""
    if isinstance(images, Tensor) and len(images) < 2:
        raise ValueError(f"a Fréchet distance needs at least 2 images, got {len(images)}")
    ref = _reference_statistics(extractor, reference, batch_size)
    feats = features(extractor, images, batch_size)
    stats = statistics(feats)
    dim = feats.shape[1]
    if ref.mu.shape != (dim,):
        raise ValueError(f"reference statistics have dimension {ref.mu.shape}, features of {extractor.name} {dim}")
    notes = [sample_size_warning(extractor.metric, len(feats), dim)]
    if ref.n is not None:
        notes.append(sample_size_warning(extractor.metric, ref.n, dim, "reference images"))
    warning = "; ".join(n for n in notes if n) or None
    if warning:
        warnings.warn(warning, stacklevel=2)
    return {
        "metric": extractor.metric,
        "value": frechet(stats, ref),
        "mode": extractor.mode,
        "features": extractor.name,
        "feature_dim": dim,
        "n_images": len(feats),
        "n_reference": ref.n,
        "warning": warning,
    }

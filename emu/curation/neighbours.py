"""Near-duplicate search: image features (standardised thumbnails, perceptual hashes), the distance of each image to
its nearest *earlier* image (:class:`EarlierNeighbours`, through faiss), and the partition that lets the search scale
(:class:`Cells`).

One ordered pass over one index cannot be shared: every image is searched against every image before it. The cells
split it: a coarse k-means (faiss) over a sample of the features gives ``cells`` centroids; every image is *stored* in
the cell of its nearest centroid and *searched* in the cells of its ``probe`` nearest (faiss IVF's nprobe). Each cell is
then an ordered pass of its own, so the cells can be searched on different ranks at once, each holding only its own
share of the features, and an image's distance is the least over the cells it was searched in. A near-duplicate lies
close to its original, so it nearly always shares the original's cell (``tests/test_curation_scale.py`` measures the
recall against brute force); one cell is exactly the single pass.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def phash_batch(images: torch.Tensor, size: int = 8, oversample: int = 4) -> np.ndarray:
    """DCT perceptual hashes (uint64) of images in [-1, 1]: the low ``size x size`` frequencies of a 32x32 grayscale,
    thresholded at their median (DC excluded)."""
    n = size * oversample
    gray = (images.float() * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    x = torch.nn.functional.interpolate(gray, size=(n, n), mode="area").squeeze(1).double()
    k = torch.arange(n, dtype=torch.float64)
    dct = torch.cos(torch.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n))  # DCT-II basis (rows: frequencies)
    low = (dct @ x @ dct.T)[:, :size, :size].flatten(1)
    bits = (low > low[:, 1:].median(dim=1, keepdim=True).values).numpy()
    return np.packbits(bits, axis=1).view(">u8").astype(np.uint64).ravel()


def phash(image: Image.Image) -> int:
    """The perceptual hash of one PIL image (see :func:`phash_batch`)."""
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    return int(phash_batch(x)[0])


def thumbnails(images: torch.Tensor, size: int = 16) -> torch.Tensor:
    """Standardised RGB thumbnails (zero mean, unit std per image), flattened: exposure changes barely move them."""
    t = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="area").flatten(1)
    t = t - t.mean(1, keepdim=True)
    return t / t.std(1, keepdim=True).clamp_min(1e-3)


class EarlierNeighbours:
    """Distance of each new feature vector to its nearest among all vectors seen before it (in the order given).

    ``index``: ``hnsw`` (faiss's approximate HNSW graph: about log N per query, the default), ``flat`` (faiss's exact
    search: N per query) for ``thumbnail`` features, measured as the RMS difference; ``phash`` features (uint64 hashes)
    are compared exactly by Hamming distance. faiss builds the graph on one thread, so that its result does not depend
    on thread timing. Distances are computed from the differences (faiss only picks the neighbour; its distance is
    recomputed in float64, those within a batch by cdist without its matmul form): the expanded form
    (|x|^2 + |y|^2 - 2xy) that faiss's BLAS search and torch's cdist use in float32 loses most digits of a
    near-duplicate's small distance, and its rounding depends on the threads.
    """

    def __init__(self, method: str = "thumbnail", index: str = "hnsw", hnsw_m: int = 16, ef_search: int = 64,
                 ef_construction: int = 40):  # fmt: skip
        self.method, self.kind = method, index
        self.hnsw_m, self.ef_search, self.ef_construction = hnsw_m, ef_search, ef_construction
        self.reset()

    def reset(self) -> None:
        self.index = None
        self.hashes: list[np.ndarray] = []

    def _faiss(self, dim: int):
        faiss = _faiss()
        if self.kind == "flat":
            return faiss.IndexFlatL2(dim)
        index = faiss.IndexHNSWFlat(dim, self.hnsw_m)
        index.hnsw.efConstruction, index.hnsw.efSearch = self.ef_construction, self.ef_search
        return index

    def add(self, feats, insert: np.ndarray | None = None) -> list[float]:
        """The distances of ``feats`` (in order) to their nearest earlier remembered vector (1e9 when there is none);
        then remembers them (``insert``: only those where it is true; thumbnails only)."""
        if self.method == "phash":
            if insert is not None:
                raise ValueError("phash features are all remembered")
            seen = np.concatenate(self.hashes) if self.hashes else np.zeros(0, np.uint64)
            count = np.bitwise_count
            out = [float(min(count(seen ^ h).min(initial=64), count(feats[:i] ^ h).min(initial=64)))
                   for i, h in enumerate(feats)]  # fmt: skip
            self.hashes.append(feats)
            return out
        x = np.ascontiguousarray(feats.numpy() if isinstance(feats, torch.Tensor) else feats, dtype=np.float32)
        dim = x.shape[1]
        if self.index is None:
            self.index = self._faiss(dim)
        if self.index.ntotal:  # faiss finds the nearest; its distance is recomputed from the difference, as below
            _, ids = self.index.search(x, 1)
            found = ids[:, 0] >= 0
            near = self.index.reconstruct_batch(np.where(found, ids[:, 0], 0))
            d = np.sqrt(((x.astype(np.float64) - near.astype(np.float64)) ** 2).sum(1)) / dim**0.5
            d_seen = torch.from_numpy(np.where(found, d, 1e9))
        else:
            d_seen = torch.full((len(x),), 1e9, dtype=torch.float64)
        insert = np.ones(len(x), dtype=bool) if insert is None else np.asarray(insert, dtype=bool)
        # earlier in the same batch: exact (a batch is small), from the differences themselves: cdist's default matmul
        # form (|x|^2 + |y|^2 - 2xy) cancels in float32 exactly where near-duplicates are, and its rounding moves with
        # the BLAS threads (two ranks then scored the same pair 3e-3 apart, relative)
        t = torch.from_numpy(x)
        later_or_not_kept = torch.ones(len(x), len(x), dtype=torch.bool).triu() | ~torch.from_numpy(insert)[None, :]
        d_self = torch.cdist(t, t, compute_mode="donot_use_mm_for_euclid_dist").double() / dim**0.5
        d_self = d_self.masked_fill(later_or_not_kept, 1e9)
        if insert.any():
            self.index.add(np.ascontiguousarray(x[insert]))
        return torch.minimum(d_seen, d_self.min(1).values).tolist()


def _faiss():
    import faiss

    faiss.omp_set_num_threads(1)  # results must not depend on thread timing
    return faiss


class Cells:
    """The coarse partition of the feature space: ``cells`` k-means centroids (faiss, seeded, one thread), trained on
    ``train`` vectors; :meth:`assign` gives each vector its ``probe`` nearest cells, nearest first."""

    def __init__(self, centroids: np.ndarray, probe: int = 2):
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self.probe = min(probe, len(self.centroids))
        self.index = _faiss().IndexFlatL2(self.centroids.shape[1])
        self.index.add(self.centroids)

    @classmethod
    def train(cls, sample: np.ndarray, cells: int, probe: int = 2, seed: int = 0, iterations: int = 20) -> Cells:
        sample = np.ascontiguousarray(sample, dtype=np.float32)
        if cells == 1:
            return cls(sample.mean(0, keepdims=True), probe)
        if len(sample) < cells:
            raise ValueError(f"{cells} cells need at least as many vectors to train on, got {len(sample)}")
        kmeans = _faiss().Kmeans(sample.shape[1], cells, niter=iterations, seed=seed, verbose=False)
        kmeans.train(sample)
        return cls(kmeans.centroids, probe)

    def assign(self, feats: np.ndarray) -> np.ndarray:
        """``[n, probe]`` cell numbers of each vector, its own (nearest) cell first."""
        _, cells = self.index.search(np.ascontiguousarray(feats, dtype=np.float32), self.probe)
        return cells


def search_cell(chunks, neighbours: EarlierNeighbours, batch: int = 256):
    """One cell's ordered pass: ``chunks`` yields ``(feats, stored)`` in the source's order (the cell's vectors of
    one piece; ``stored``: the vectors whose own cell this is); yields each chunk's distances to the nearest earlier
    stored vector of the cell."""
    neighbours.reset()
    for feats, stored in chunks:
        out = []
        for start in range(0, len(feats), batch):
            out += neighbours.add(feats[start : start + batch], stored[start : start + batch])
        yield np.asarray(out, dtype=np.float64)

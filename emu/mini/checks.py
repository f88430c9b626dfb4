"""The miniature's extra measurements in ``eval.py`` (its ``checks``, named by ``_target_`` in
conf/experiment/mini/eval.yaml): how far to trust the measuring models on held-out haystack images, and the judge's
headroom. Each is called with the evaluation's context (``judge``, ``clip``, ``autoencoder``, ``device``,
``tie_band``, ``n_boot``) and its own settings, and returns what ``metrics.json`` stores under its name (None: not
applicable, nothing stored).
"""

from __future__ import annotations

from typing import Any

from emu.mini.clip import retrieval_and_zero_shot
from emu.mini.headroom import judge_headroom
from emu.mini.sets import heldout_haystack
from emu.text.clip import ClipEmbedder


def clip_accuracy(judge: ClipEmbedder, n: int = 1000, seed: int = 0, start: int = 1_000_000,
                  candidates: int = 100) -> dict[str, float]:  # fmt: skip
    """How far to trust a CLIP on the haystack, on ``n`` images it never trained on (haystack ``seed`` from index
    ``start``; the mini CLIP learns from seed 0's first indices): zero-shot colour, shape, size, position and
    background on one-object scenes (all, and flaw-free), and text-to-image top-1 among ``candidates``."""
    images, metas = heldout_haystack(n, seed, start, resolution=judge.size)
    captions = [m["caption"] for m in metas]
    metrics = retrieval_and_zero_shot(judge.embed_images(images), judge.embed_texts(captions), captions, metas,
                                      judge.embed_texts, candidates)  # fmt: skip
    return {"n": n, "haystack_seed": seed, "start": start, "candidates": candidates} | metrics


def judge_accuracy_check(n: int, judge=None, **_: Any) -> dict[str, float] | None:
    """The judge's own accuracy table (:meth:`emu.mini.judge.PixelJudge.accuracy`), when it has one."""
    return judge.accuracy(int(n)) if n and judge is not None and hasattr(judge, "accuracy") else None


def clip_accuracy_check(n: int, clip: str | None = None, device: str = "cpu", **_: Any) -> dict[str, float] | None:
    """:func:`clip_accuracy` of the evaluation's CLIP, when there is one."""
    return clip_accuracy(ClipEmbedder(clip, device=device), int(n)) if n and clip else None


def headroom_check(n: int, judge=None, autoencoder=None, tie_band: dict | None = None, n_boot: int = 2000,
                   **_: Any) -> dict[str, Any] | None:  # fmt: skip
    """:func:`~emu.mini.headroom.judge_headroom` of the evaluation's judge (through the model's autoencoder)."""
    if not n or judge is None:
        return None
    return judge_headroom(judge, int(n), autoencoder, tie_band=float((tie_band or {}).get("appeal", 0)),
                          n_boot=int(n_boot))  # fmt: skip

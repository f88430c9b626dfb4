"""How much of the judge's range a text-to-image comparison can use: the quality-tuning effect the judge could see.

For held-out haystack scenes (by default the captions ``eval.py``'s ``haystack:N`` prompts are made of), the judge
scores the scenes as the corpus shows them (random style and flaws) and the same scenes rendered as needles
(:func:`~emu.mini.haystack.as_needle`: no flaw, full light, depth), both as they are and through the model's
autoencoder. "Needles vs corpus" is the win rate of a perfectly quality-tuned model over a pre-trained model that
reproduces its corpus exactly, as this judge sees it: the ceiling of the paired appeal comparison. Beside the models'
own mean appeal it shows where an effect is lost: in the judge, in the autoencoder, or in the generator.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from emu.data.samples import SamplePreparer
from emu.evaluation.reconstruction import reconstruct
from emu.evaluation.winrate import compare
from emu.mini.haystack import as_needle, caption_for, render, scene_spec


def scene_pairs(n: int, seed: int = 0, start: int = 1_000_000, resolution: int = 64):
    """``(corpus images, needle images, captions)`` of haystack ``seed``'s scenes ``start .. start + n - 1``."""
    prepare = SamplePreparer(resolution=resolution, require_caption=False)
    corpus, needles, captions = [], [], []
    for i in range(start, start + n):
        spec = scene_spec(seed, i)
        for spec_, out in ((spec, corpus), (as_needle(spec), needles)):
            out.append(prepare({"key": str(i), "image": render(spec_, resolution), "caption": ""})["image"])
        captions.append(caption_for(spec["objects"], spec["background"]))
    return torch.stack(corpus), torch.stack(needles), captions


def judge_headroom(judge, n: int, autoencoder=None, seed: int = 0, start: int = 1_000_000, tie_band: float = 0.25,
                   n_boot: int = 2000) -> dict[str, Any]:  # fmt: skip
    """The judge's mean appeal of corpus-style and needle renditions of ``n`` held-out scenes (and of their
    reconstructions by ``autoencoder``), and the paired win rate of needles over corpus (the comparison's ceiling)."""
    corpus, needles, captions = scene_pairs(n, seed, start, judge.resolution)
    sets = {"corpus": corpus, "needles": needles}
    if autoencoder is not None:
        sets |= {"corpus_reconstructed": reconstruct(autoencoder, corpus),
                 "needles_reconstructed": reconstruct(autoencoder, needles)}  # fmt: skip
    appeal = {k: judge.score(v, captions)["appeal"].numpy() for k, v in sets.items()}
    out: dict[str, Any] = {"n": n, "haystack_seed": seed, "start": start, "tie_band": tie_band,
                           "appeal": {k: float(np.mean(v)) for k, v in appeal.items()}}  # fmt: skip
    out["needles_vs_corpus"] = compare(appeal["needles"], appeal["corpus"], tie_band, n_boot=n_boot)
    if autoencoder is not None:
        out["needles_vs_corpus_reconstructed"] = compare(
            appeal["needles_reconstructed"], appeal["corpus_reconstructed"], tie_band, n_boot=n_boot
        )
    return out

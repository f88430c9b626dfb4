"""The miniature's simulated annotators for curation's human passes (``stages.<pass>.annotators`` in
conf/experiment/mini/curate.yaml): they answer from the haystack's hidden attributes with noise; the generalists are
noisier and more lenient (recall), the specialists stricter (precision). Their labels are written and read back as a
real labels file is, and every report says they are simulated.
"""

from __future__ import annotations

import random
from typing import Any

from emu.curation.human import PRINCIPLES

# which hidden haystack flaws break which principle (the web defects count against the subject / technical side)
PRINCIPLE_FLAWS = {
    "composition": ("cut_off", "off_balance", "clutter"),
    "lighting": ("flat_lighting", "too_dark", "overexposed"),
    "color_contrast": ("low_contrast", "monochrome"),
    "subject_background": ("clutter", "cut_off", "blur", "noise", "jpeg", "watermark", "low_res", "odd_aspect"),
}


class SimulatedAnnotator:
    """Answers from hidden attributes: each principle is judged correctly with probability ``1 - noise``; the
    subjective verdict is ``appeal + N(0, appeal_noise) >= appeal_threshold``; keep = every verdict positive."""

    simulated = True
    note = (
        "annotators answer from the haystack's hidden attributes with noise (the generalist noisier and more "
        "lenient than the specialist). No person looked at these images."
    )

    def __init__(self, name: str, noise: float, appeal_noise: float, appeal_threshold: float, seed: int = 0):
        self.name, self.noise, self.appeal_noise, self.threshold = name, noise, appeal_noise, appeal_threshold
        self.seed = seed

    def label(self, key: str, meta: dict[str, Any]) -> dict[str, Any]:
        rng = random.Random(f"{self.seed}/{self.name}/{key}")  # the same answer on a rerun
        flaws = set(meta.get("flaws", ()))
        row: dict[str, Any] = {"key": key, "annotator": self.name}
        for principle, group in PRINCIPLE_FLAWS.items():
            ok = not (flaws & set(group))
            row[principle] = int(ok if rng.random() >= self.noise else not ok)
        row["subjective"] = int(float(meta.get("appeal", 0.0)) + rng.gauss(0, self.appeal_noise) >= self.threshold)
        row["keep"] = int(all(row[p] for p in PRINCIPLES))
        return row

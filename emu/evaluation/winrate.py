"""Paired win rates: model A vs model B on the same prompts and seeds, judged image pair by image pair.

For each pair the judge gives both images a score (visual appeal, or the fraction of the prompt's attributes the
image shows); A wins when its score beats B's by more than the tie band, loses when it trails by more, and ties
otherwise. The paper reports win / loss percentages of human majority votes (its figures: :mod:`emu.paper`); here
each of win, tie, loss and the headline ``win_rate = win + tie / 2`` comes with a percentile-bootstrap 95% interval
over the prompts; pooled over several training seeds judged on the same prompts (:func:`pooled_win_rates`), with a
two-level bootstrap: the seeds, then the prompts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def paired_outcomes(score_a: Sequence[float], score_b: Sequence[float], tie_band: float = 0.0) -> np.ndarray:
    """+1 where A beats B by more than ``tie_band``, -1 where B beats A by more, 0 otherwise (NaN pairs dropped)."""
    a, b = np.asarray(score_a, dtype=np.float64), np.asarray(score_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired scores need equal 1-d shapes, got {a.shape} and {b.shape}")
    if tie_band < 0:
        raise ValueError(f"tie_band must be >= 0, got {tie_band}")
    d = (a - b)[~(np.isnan(a) | np.isnan(b))]
    return np.where(d > tie_band, 1, np.where(d < -tie_band, -1, 0)).astype(np.int8)


def win_rates(outcomes: Sequence[int], n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> dict[str, object]:
    """Win / tie / loss fractions of ``outcomes`` (+1 / 0 / -1) and ``win_rate`` (ties count half), each with a
    percentile-bootstrap interval at ``level`` (``<name>_ci = [low, high]``) over ``n_boot`` resamples."""
    o = np.asarray(outcomes, dtype=np.int8)
    n = len(o)
    if n == 0:
        raise ValueError("no judged pairs: every pair had a missing score")
    stats = {"win": o == 1, "tie": o == 0, "loss": o == -1}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    lo_q, hi_q = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    out: dict[str, object] = {"n": n, "level": level, "n_boot": n_boot}
    samples = {k: v[idx].mean(1) for k, v in stats.items()}
    samples["win_rate"] = samples["win"] + samples["tie"] / 2
    points = {k: float(v.mean()) for k, v in stats.items()}
    points["win_rate"] = points["win"] + points["tie"] / 2
    for k, point in points.items():
        out[k] = point
        out[f"{k}_ci"] = [float(np.percentile(samples[k], lo_q)), float(np.percentile(samples[k], hi_q))]
    return out


def pooled_win_rates(outcomes_per_seed: Sequence[Sequence[int]], n_boot: int = 2000, level: float = 0.95,
                     seed: int = 0) -> dict[str, object]:  # fmt: skip
    """:func:`win_rates` of several training seeds judged on the same prompts, pooled (``n``: all pairs,
    ``n_seeds``, ``n_prompts``). Row ``i`` holds seed ``i``'s outcomes, column ``j`` the same prompt (and sampling
    seed) in every row: seeds and prompts are crossed. The point estimates are the fractions over every pair; each of
    the ``n_boot`` resamples of the two-level percentile bootstrap draws as many seeds as there are with replacement,
    then one draw of the prompts with replacement, shared by the drawn seeds (a prompt's difficulty is the same for
    every seed, so redrawing it per seed would shrink the interval), and pools them: the interval holds the spread
    between seeds as well as between prompts."""
    rows = [np.asarray(o, dtype=np.int8).ravel() for o in outcomes_per_seed]
    if not rows:
        raise ValueError("no seeds to pool")
    if len({len(o) for o in rows}) != 1 or len(rows[0]) == 0:
        raise ValueError(f"each seed needs the same prompts, in the same order, got {[len(o) for o in rows]} pairs")
    o = np.stack(rows)  # (seeds, prompts)
    n_seeds, n_prompts = o.shape
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, n_seeds, size=(n_boot, n_seeds))  # the seeds of each resample
    prompts = rng.integers(0, n_prompts, size=(n_boot, n_prompts))  # its prompts, the same for each drawn seed
    stats = {"win": o == 1, "tie": o == 0, "loss": o == -1}
    samples = {k: v[drawn[:, :, None], prompts[:, None, :]].mean((1, 2)) for k, v in stats.items()}
    samples["win_rate"] = samples["win"] + samples["tie"] / 2
    points = {k: float(v.mean()) for k, v in stats.items()}
    points["win_rate"] = points["win"] + points["tie"] / 2
    lo_q, hi_q = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    out: dict[str, object] = {"n": o.size, "n_seeds": n_seeds, "n_prompts": n_prompts, "level": level,
                              "n_boot": n_boot}  # fmt: skip
    for k, point in points.items():
        out[k] = point
        out[f"{k}_ci"] = [float(np.percentile(samples[k], lo_q)), float(np.percentile(samples[k], hi_q))]
    return out


def compare(score_a: Sequence[float], score_b: Sequence[float], tie_band: float = 0.0, **kw) -> dict[str, object]:
    """:func:`win_rates` of A over B, with the mean scores and the tie band used."""
    a, b = np.asarray(score_a, dtype=np.float64), np.asarray(score_b, dtype=np.float64)
    out = win_rates(paired_outcomes(a, b, tie_band), **kw)
    return {"mean_a": float(np.nanmean(a)), "mean_b": float(np.nanmean(b)), "tie_band": tie_band, **out}


def format_win_rate(r: dict[str, object]) -> str:
    """``win 48.4% [36-61] / tie 18.8% / loss 32.8% [22-45] (n=64)``."""

    def pct(k: str) -> str:
        lo, hi = r[f"{k}_ci"]
        return f"{100 * r[k]:.1f}% [{100 * lo:.0f}-{100 * hi:.0f}]"

    return f"win {pct('win')} / tie {100 * r['tie']:.1f}% / loss {pct('loss')} (n={r['n']})"


def tie_band_sweep(score_a: Sequence[float], score_b: Sequence[float], bands: Sequence[float], **kw) -> list[dict]:
    """:func:`compare` of A over B at each tie band in ``bands``: how much of a win rate is the band's choice."""
    return [compare(score_a, score_b, float(band), **kw) for band in bands]

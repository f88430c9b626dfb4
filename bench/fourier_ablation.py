"""The autoencoder's Fourier-feature input, ablated on the miniature (issue 38, row 2).

Trains the demo's 16-channel mini autoencoder (``experiment=mini/autoencoder``, 500 steps) once per arm and seed on
the demo's haystack, then measures each export with ``eval.py`` on the same 512 held-out images: PSNR, SSIM,
LPIPS (where its weights are on disk), the Fréchet distance in the mini CLIP's image space and the pixel judge's
appeal of reconstructions. Needs a finished ``make demo`` (its haystack, mini CLIP and judge).

    python bench/fourier_ablation.py [--demo outputs/demo] [--out outputs/ablations/fourier] [--seeds 0 1]

Arms (the frequencies multiply 2π on input in [-1, 1], where 8-bit levels are 2/255 apart, so the intensity
Nyquist frequency is 255/4 ≈ 63.75):

- ``none``: no input transform (3 channels);
- ``high``: 64 and 128, the old paper-scale default: at and above that Nyquist (sin(2π·64x) flips sign at every level);
- ``low``: 1, 2, 4, 8 and 16, at least 8 levels per period.

Each run is skipped when its export exists, so an interrupted ablation resumes. Prints a Markdown table and writes
``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARMS = {"none": [], "high": [64.0, 128.0], "low": [1.0, 2.0, 4.0, 8.0, 16.0]}


def _run(args: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        subprocess.run([sys.executable, *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=True)


def train(demo: Path, run: Path, frequencies: list[float], seed: int) -> Path:
    export = run / "export"
    if not (export / "config.json").exists():
        _run([
            "train.py", "experiment=mini/autoencoder", f"paths.demo_dir={demo}", "data=webdataset",
            f"data.source.shards={demo}/haystack/*.tar", "~data.source.n_train", "~data.source.n_val",
            f"model.autoencoder.fourier_frequencies={json.dumps(frequencies)}", f"seed={seed}",
            f"hydra.run.dir={run}",
        ], run / "train.log")  # fmt: skip
    return export


def evaluate(demo: Path, a: Path, b: Path, out: Path, images: int) -> dict:
    if not (out / "metrics.json").exists():
        _run([
            "eval.py", "experiment=mini/eval", f"a={a}", f"b={b}", "name_a=a", "name_b=b", f"clip={demo}/clip/export",
            "aesthetic=null", "judge=pixel", f"paths.demo_dir={demo}", f"autoencoder.images=haystack:{images}",
            f"out={out}",
        ], out / "eval.log")  # fmt: skip
    return json.loads((out / "metrics.json").read_text())["autoencoders"]


def row(m: dict) -> dict:
    lpips = m.get("lpips")
    return {
        "psnr": m["psnr"],
        "ssim": m["ssim"],
        "lpips": lpips if isinstance(lpips, float) else None,
        "fd_clip": m["rfd_clip_export"]["value"],
        "judge_drop": m["judge_appeal"]["originals"] - m["judge_appeal"]["reconstructions"],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", type=Path, default=ROOT / "outputs/demo")
    p.add_argument("--out", type=Path, default=ROOT / "outputs/ablations/fourier")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--images", type=int, default=512)
    a = p.parse_args(argv)
    demo, out = a.demo.resolve(), a.out.resolve()
    results: dict[str, dict[int, dict]] = {arm: {} for arm in a.arms}
    for seed in a.seeds:
        exports = {arm: train(demo, out / f"{arm}_seed{seed}", ARMS[arm], seed) for arm in a.arms}
        arms = list(exports)
        for i in range(0, len(arms), 2):  # eval.py compares two at a time; an odd one out is paired with the first
            pair = arms[i : i + 2] if i + 1 < len(arms) else [arms[i], arms[0]]
            m = evaluate(demo, exports[pair[0]], exports[pair[1]], out / f"eval_{'_'.join(pair)}_seed{seed}", a.images)
            results[pair[0]][seed] = row(m["a"])
            results[pair[1]].setdefault(seed, row(m["b"]))
        print(f"seed {seed} done", flush=True)
    (out / "results.json").write_text(json.dumps({"arms": {k: ARMS[k] for k in a.arms}, "results": results}, indent=1))
    keys = ["psnr", "ssim", "lpips", "fd_clip", "judge_drop"]
    print("| arm | frequencies | " + " | ".join(keys) + " |\n| --- | --- |" + " --- |" * len(keys))
    for arm, per_seed in results.items():
        cells = []
        for k in keys:
            vals = [r[k] for r in per_seed.values() if r[k] is not None]
            cells.append(
                "n/a" if not vals else " / ".join(f"{v:.4g}" for v in vals) + f" (mean {statistics.mean(vals):.4g})"
            )
        print(f"| {arm} | {ARMS[arm] or '-'} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

"""Data pipeline throughput: images/s the configured DataModule delivers, and a grid of its first batch.

    python bench/data_throughput.py data=webdataset data.source.shards='outputs/demo/haystack/*.tar' \
        data.num_workers=2 batches=50

Any data override of train.py works here (it composes the same conf/train.yaml). Prints a table and, last,
one JSON line with the numbers.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from emu.utils.config import config_errors_as_messages, require_groups
from emu.utils.images import image_grid

ROOT = Path(__file__).resolve().parents[1]


def measure(cfg: DictConfig, batches: int, warmup: int = 2, grid: str | None = None) -> dict:
    datamodule = hydra.utils.instantiate(cfg.data)
    loader = datamodule.dataloader("train")
    n_images, t0, it = 0, None, iter(loader)
    for i in range(warmup + batches):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        if i == 0 and grid:
            Path(grid).parent.mkdir(parents=True, exist_ok=True)
            image_grid(batch["image"][:64]).save(grid)
        if i == warmup - 1:
            t0 = time.perf_counter()
        elif i >= warmup:
            n_images += len(batch["key"])
    seconds = time.perf_counter() - t0
    return {
        "bench": "data_throughput",
        "source": cfg.data.source._target_.rsplit(".", 1)[-1],
        "resolution": cfg.data.resolution,
        "batch_size": cfg.data.batch_size,
        "num_workers": cfg.data.num_workers,
        "images": n_images,
        "seconds": round(seconds, 3),
        "images_per_second": round(n_images / seconds, 1),
        "skipped": datamodule.skip_summary(),
    }


@config_errors_as_messages
def main(argv: list[str]) -> dict:
    own = {k: v for k, _, v in (a.partition("=") for a in argv) if k in ("batches", "grid")}
    overrides = [a for a in argv if a.partition("=")[0] not in own]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    require_groups(cfg, "data")
    r = measure(cfg, int(own.get("batches", 30)), grid=own.get("grid"))
    for k, v in r.items():
        print(f"{k:<18} {v}")
    print(json.dumps(r))
    return r


if __name__ == "__main__":
    # `batches=N` and `grid=PATH` are this script's own options; everything else is a config override.
    main(sys.argv[1:])

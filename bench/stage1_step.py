"""The stage-1 training step as train.py runs it, against the data pipeline that feeds it.

    python bench/stage1_step.py experiment=mini/stage1_pretrain data=webdataset \\
        data.source.shards='outputs/demo/haystack/*.tar' '~data.source.n_train' '~data.source.n_val'
    python bench/stage1_step.py experiment=mini/stage1_pretrain data=latents '~data.source.n_train' \\
        '~data.source.n_val' data.source.shards='outputs/demo/latents/train/*.tar'   # the demo precomputes them

Composes conf/train.yaml with the overrides (any of train.py's), then measures (1) the DataModule's training loader
alone, images/s; (2) the DiffusionModule's training step alone on batches taken from it beforehand: frozen
autoencoder + text encoders (unless the batches hold precomputed latents and embeddings) + U-Net forward, backward,
AdamW and the EMA update, images/s; (3) their ratio: the pipeline must deliver well over what the step consumes
(target >= 2x). Comparing a run on images with one on precomputed latents gives the precompute's speed-up.
Own options: ``steps=N`` (timed steps), ``batches=N`` (timed loader batches), ``warmup=N``.
Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra import compose, initialize_config_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_info, print_table
from data_throughput import measure

from emu.utils.config import check_required, config_errors_as_messages

ROOT = Path(__file__).resolve().parents[1]
OWN = {"steps": 10, "batches": 30, "warmup": 2}


def step_throughput(cfg, batches: list[dict], steps: int, warmup: int) -> dict:
    """Images/s of the real training step (no Trainer: loss, backward, AdamW, EMA) on the given batches."""
    torch.manual_seed(cfg.seed)
    module = hydra.utils.instantiate(cfg.model).train()
    module.configure_model()
    opt = module.configure_optimizers()["optimizer"]
    seconds, images = 0.0, 0
    for i, batch in enumerate(itertools.islice(itertools.cycle(batches), warmup + steps)):
        t0 = time.perf_counter()
        loss = module.diffusion_loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if module.ema is not None:
            module.ema.update(module.trained_modules(), len(batch["caption"]))
        if i >= warmup:
            seconds += time.perf_counter() - t0
            images += len(batch["caption"])
    return {"images_per_second": round(images / seconds, 2), "seconds_per_step": round(seconds / steps, 4),
            "precomputed": "latent" in batches[0]}  # fmt: skip


@config_errors_as_messages
def main(argv: list[str]) -> dict:
    own = {k: int(v) for k, _, v in (a.partition("=") for a in argv) if k in OWN}
    opts = {**OWN, **own}
    overrides = [a for a in argv if a.partition("=")[0] not in OWN]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    check_required(cfg)
    data = measure(cfg, opts["batches"], warmup=opts["warmup"])
    loader = iter(hydra.utils.instantiate(cfg.data).dataloader("train"))
    batches = [next(loader) for _ in range(min(4, opts["steps"] + opts["warmup"]))]
    step = step_throughput(cfg, batches, opts["steps"], opts["warmup"])
    r = {"bench": "stage1_step", "device": device_info(torch.device("cpu")), "source": data["source"],
         "resolution": data["resolution"], "batch_size": data["batch_size"], "num_workers": data["num_workers"],
         "pipeline_images_per_second": data["images_per_second"], "step_images_per_second": step["images_per_second"],
         "seconds_per_step": step["seconds_per_step"], "precomputed": step["precomputed"],
         "pipeline_over_step": round(data["images_per_second"] / step["images_per_second"], 2),
         "skipped": data["skipped"], "overrides": overrides}  # fmt: skip
    print(f"stage-1 step vs its data pipeline; {r['device']}")
    print_table([{"part": "data pipeline", "images_per_second": r["pipeline_images_per_second"],
                  "detail": f"{r['source']}, {r['num_workers']} workers, batch {r['batch_size']}"},
                 {"part": "training step", "images_per_second": r["step_images_per_second"],
                  "detail": f"{r['seconds_per_step']} s/step, precomputed latents: {r['precomputed']}"}])  # fmt: skip
    print(f"pipeline / step: {r['pipeline_over_step']}x (target >= 2x)")
    print(json.dumps(r))
    return r


if __name__ == "__main__":
    main(sys.argv[1:])

"""A tiny fit on a folder with bad files, for the tests of :mod:`emu.data.batches` (batches with no good sample).

``python -m tests.good_samples_run <folder> <out> --devices 2 --strategy ddp|fsdp [--manual]`` trains a linear model
on each image's mean colour (``loss_i = w . colour_i``, so a step's gradient is the mean colour of the samples it
trains on) with SGD and momentum, and writes ``<out>/rank<r>.pt``: for each batch the keys the rank was given, the
colours of its good samples and the weights after the step. The test recomputes every step from all ranks' batches:
the update must be that of the mean over the step's good samples, and a step where no rank had one must leave the
weights (and the momentum) alone.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import lightning as L
import torch
from torch import nn

from emu.data.batches import STAND_IN, good_samples, trains_on_good_samples
from emu.data.callbacks import DataHealth
from emu.data.datamodule import EmuDataModule
from emu.data.sources import FolderSource

LR, MOMENTUM = 0.1, 0.9


def colours(images: torch.Tensor) -> torch.Tensor:
    return images.double().mean(dim=(2, 3))


class Linear(L.LightningModule):
    """``loss = mean_i(w . colour_i)``; automatic optimization through :func:`trains_on_good_samples`."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(3, 1, bias=False, dtype=torch.float64)
        nn.init.zeros_(self.net.weight)
        self.records: list[dict] = []

    def configure_model(self) -> None:
        from emu.training.distributed import FSDPStrategy, shard_modules

        if isinstance(self.trainer.strategy, FSDPStrategy):
            shard_modules([self.net], wrap=(), strategy=self.trainer.strategy)

    def loss(self, batch) -> torch.Tensor:
        return self.net(colours(batch["image"]).to(self.device)).mean()

    @trains_on_good_samples
    def training_step(self, batch, batch_idx):
        return self.loss(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM)

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self.records.append({"batch_idx": batch_idx, "keys": list(batch["key"]), "colours": colours(batch["image"]),
                             "stand_in": batch[STAND_IN]["key"] if STAND_IN in batch else None})  # fmt: skip

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        w = self.net.weight
        self.records[-1]["weight"] = (w.full_tensor() if hasattr(w, "full_tensor") else w).detach().cpu().clone()


class ManualLinear(Linear):
    """The same with manual optimization, as the autoencoder's GAN steps: :func:`good_samples` called by hand."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        if (picked := good_samples(self, batch)) is None:
            return None
        batch, weight = picked
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(self.loss(batch) * weight)
        opt.step()


def replay(ranks: list[list[dict]]) -> Counter:
    """Recompute the run from every rank's records (SGD with momentum on the mean colour of each step's good samples
    of all ranks; no update at all when there is none) and check each rank's weights after each step against it.
    Returns how many steps had good samples on 0, 1, ... ranks."""
    w, buf, kinds = torch.zeros(1, 3, dtype=torch.float64), None, Counter()
    for step in zip(*ranks, strict=True):
        assert len({rec["batch_idx"] for rec in step}) == 1
        good = [c for rec in step for c in rec["colours"]]
        kinds[sum(len(rec["keys"]) > 0 for rec in step)] += 1
        if good:
            g = torch.stack(good).mean(0, keepdim=True)
            buf = g.clone() if buf is None else MOMENTUM * buf + g
            w = w - LR * buf
        for rec in step:
            assert torch.allclose(rec["weight"], w, rtol=0, atol=1e-12), (rec["batch_idx"], rec["weight"], w)
    return kinds


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("root")
    p.add_argument("out")
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--strategy", default="ddp")
    p.add_argument("--manual", action="store_true")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--epochs", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.strategy == "fsdp":
        from emu.training.distributed import FSDPStrategy

        strategy = FSDPStrategy(param_dtype=None, reduce_dtype=None, activation_checkpointing=False)
    else:
        strategy = args.strategy if args.devices > 1 else "auto"
    dm = EmuDataModule(FolderSource(args.root, val_fraction=0.0), resolution=16, batch_size=args.batch_size,
                       max_skip_rate=1.0, seed=3)  # fmt: skip
    module = ManualLinear() if args.manual else Linear()
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy=strategy, max_epochs=args.epochs,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[DataHealth()], limit_val_batches=0, num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(module, datamodule=dm)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"records": module.records, "global_step": trainer.global_step, "skipped": dict(dm.skipped["train"]),
                "empty_batches": dm.empty_batches["train"]}, out / f"rank{trainer.global_rank}.pt")  # fmt: skip


if __name__ == "__main__":
    main()

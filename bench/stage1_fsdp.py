"""Stage 1 under FSDP on one device: a few steps, a sharded checkpoint, the run resumed from it.

    python bench/stage1_fsdp.py --scale paper --out outputs/stage1_fsdp           # one CUDA GPU: the 2.8B U-Net
    python bench/stage1_fsdp.py --scale tiny --device cpu --out /tmp/stage1_fsdp  # CPU dry run (gloo, tiny models)

Runs ``python train.py experiment=stage1_pretrain trainer=fsdp`` with one rank on haystack images rendered on the
fly for ``--steps`` steps, saving a sharded checkpoint (a folder of ``*.distcp`` files) at the last one, then again
with ``ckpt_path=`` that folder for ``--resume-steps`` more steps (saving nothing). Each run reports its step time
(wall time from batch start to batch end, synchronised: forward, backward, AdamW, EMA; the median after the first
step), the global step it started at, the time from the Trainer's setup to its first step (sharding, moving to the
device and, when resuming, loading the checkpoint), the time the checkpoint save took, and its peak memory (CUDA:
``max_memory_allocated``; CPU: the process's RSS high-water mark). The resumed run must start at the step the first
one ended at, or this exits non-zero.

Nothing is downloaded: the frozen models are built here with random weights and saved to ``<out>/models``.
``paper``: the 2.8B U-Net (conf/model/unet/emu_2p8b.yaml) at 256px in bf16 (FSDP's bf16 parameter policy with
float32 gradient reduction and master weights, Lightning's bf16-mixed autocast), activation checkpointing, the EMA,
batch 32 per GPU (the experiment's 64 may not fit an 80 GB GPU beside the weights, gradients, AdamW and EMA);
frozen models: the paper autoencoder (conf/model/autoencoder.yaml), CLIP ViT-L/14's text tower at its real shape (768
wide, 12 layers, 77 tokens, 768-wide projection) and a T5 encoder of T5-XXL's width (4096, 64 heads, gated-GELU
10240) with ``--t5-layers`` of its 24 layers (default 2: all 24 would add 4.5B random parameters to build, write and
load, a cost of the frozen encoder, not of the U-Net's training), both with a word tokenizer over the haystack's
vocabulary. ``tiny``: the mini U-Net and the test suite's tiny models (tests/conftest.py) at 32px, float32, over gloo.
Both set ``model.compile=false``: compiling the 2.8B U-Net takes minutes (bench/unet_step.py measures compile).
A sharded checkpoint of the 2.8B U-Net holds weights, AdamW state and EMA in float32 (~46 GB); when the disk under
``--out`` cannot hold it the EMA is left out (~34 GB) and the result says so. The checkpoint is deleted at the end
unless ``--keep``. Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT)]  # common.py; tests/conftest.py's model builders
from common import device_info, print_table  # noqa: E402

SCALES = {
    "paper": dict(resolution=256, batch=32, workers=8, steps=3, resume_steps=2),
    "tiny": dict(resolution=32, batch=4, workers=0, steps=2, resume_steps=1),
}
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   max_position_embeddings=77, projection_dim=768)  # fmt: skip
T5_XXL_WIDTH = dict(d_model=4096, d_kv=64, d_ff=10240, num_heads=64, feed_forward_proj="gated-gelu")
CHECKPOINT_BYTES_PER_PARAM = {True: 16, False: 12}  # float32 weights + AdamW's two moments (+ the EMA's copy)
DISK_MARGIN_BYTES = 2 * 2**30
MARKER = ".stage1_fsdp"  # marks --out as this script's, which it may empty


class StepStats(L.Callback):
    """Writes, at the end of training (rank 0), the global step the run started and ended at, each step's synchronised
    wall time, the time from setup to the first step, the time after the last step (the final checkpoint save) and
    the peak memory, as JSON to ``out``. Added to train.py by ``+callbacks.step_stats._target_=stage1_fsdp.StepStats``
    (bench/ on PYTHONPATH)."""

    def __init__(self, out: str):
        self.out = Path(out)
        self.step_seconds: list[float] = []
        self._setup = self._start = self._last_end = None

    def _now(self, trainer: L.Trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)
        return time.perf_counter()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._setup = time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_step = trainer.global_step
        self.setup_seconds = self._now(trainer) - self._setup

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = self._now(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._last_end = self._now(trainer)
        self.step_seconds.append(self._last_end - self._start)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # ModelCheckpoint runs after every other callback's batch end: the time since the last step is its save
        after_last = self._now(trainer) - self._last_end if self._last_end else None
        device = trainer.strategy.root_device
        if device.type == "cuda":
            peak, kind = torch.cuda.max_memory_allocated(device), "CUDA max_memory_allocated"
        else:  # Linux reports kilobytes
            peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process RSS high-water mark"
        if trainer.global_rank != 0:
            return
        stats = {"start_step": self.start_step, "end_step": trainer.global_step, "step_seconds": self.step_seconds,
                 "setup_seconds": self.setup_seconds, "after_last_step_seconds": after_last,
                 "peak_memory_bytes": peak, "memory_kind": kind, "world_size": trainer.world_size,
                 "unet_params": sum(p.numel() for p in pl_module.unet.parameters())}  # fmt: skip
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(stats))


# ---------------------------------------------------------------------------------------------- frozen models
def build_frozen_models(scale: str, folder: Path, t5_layers: int) -> tuple[dict[str, Path], str]:
    """Random-weight autoencoder, CLIP and T5 folders for ``scale`` under ``folder`` (tests/conftest.py's builders),
    and a sentence saying what they are."""
    from tests.conftest import save_clip, save_t5, save_tiny_autoencoder

    folder.mkdir(parents=True, exist_ok=True)
    if scale == "tiny":
        models = {"autoencoder": save_tiny_autoencoder(folder / "autoencoder"), "clip": save_clip(folder / "clip"),
                  "t5": save_t5(folder / "t5")}  # fmt: skip
        return models, "the test suite's tiny random autoencoder, CLIP (32 wide) and T5 (32 wide)"
    from omegaconf import OmegaConf

    from emu.autoencoder.model import AutoencoderKL

    kw = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/autoencoder.yaml").autoencoder)
    kw.pop("_target_")
    torch.manual_seed(0)
    models = {
        "autoencoder": AutoencoderKL(**kw).save_pretrained(folder / "autoencoder"),
        "clip": save_clip(folder / "clip", **CLIP_L_TEXT),
        "t5": save_t5(folder / "t5", num_layers=t5_layers, **T5_XXL_WIDTH),
    }
    what = (f"random weights: the paper autoencoder (conf/model/autoencoder.yaml), CLIP ViT-L/14's text tower at "
            f"its real shape, a T5 encoder of T5-XXL's width with {t5_layers} of its 24 layers; haystack word "
            "tokenizers")  # fmt: skip
    return models, what


# ---------------------------------------------------------------------------------------------- the two runs
def train_overrides(scale: str, device: str, models: dict[str, Path], run_dir: Path, max_steps: int,
                    stats: Path, batch: int, ema: bool, resume_from: Path | None = None) -> list[str]:  # fmt: skip
    """train.py's arguments for one run: the paper experiment under FSDP on haystack data, one rank."""
    s = SCALES[scale]
    res = s["resolution"]
    args = [
        "experiment=stage1_pretrain", "trainer=fsdp", "data=haystack",  # the haystack source has no stream options:
        "~data.source.shuffle_buffer", "~data.source.resampled", "~data.source.epoch_size",
        f"data.resolution={res}", f"data.min_size={res}", f"data.batch_size={batch}",
        f"data.num_workers={s['workers']}", f"data.pin_memory={device == 'cuda'}", "trainer.devices=1",
        "trainer.num_nodes=1",
        f"trainer.max_steps={max_steps}",
        "trainer.limit_val_batches=0", "trainer.log_every_n_steps=1", "model.val_prompts=null", "model.compile=false",
        "logger=csv", "callbacks.progress_bar=null", f"paths.output_dir={run_dir}", f"hydra.run.dir={run_dir}",
        f"callbacks.model_checkpoint.every_n_train_steps={max_steps}", "callbacks.model_checkpoint.save_top_k=0",
        f"callbacks.model_checkpoint.save_last={resume_from is None}",
        "+callbacks.step_stats._target_=stage1_fsdp.StepStats", f"+callbacks.step_stats.out={stats}",
    ]  # fmt: skip
    if not ema:
        args.append("model.ema_half_life_images=0")
    if scale == "tiny":
        from tests.conftest import tiny_stage1_overrides

        args += ["model/unet=mini", *tiny_stage1_overrides(models["autoencoder"], models["clip"], models["t5"])]
    else:
        args += [f"model.autoencoder={models['autoencoder']}",
                 f"model.text.encoders.clip.name_or_path={models['clip']}",
                 f"model.text.encoders.t5.name_or_path={models['t5']}"]  # fmt: skip
    if device == "cpu":  # as tests/test_distributed.py: float32 over gloo
        args += ["trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.strategy.param_dtype=float32",
                 "model.text.encoders.clip.dtype=float32", "model.text.encoders.t5.dtype=float32"]  # fmt: skip
    if resume_from is not None:
        args.append(f"ckpt_path={resume_from}")
    return args


def run_train(args: list[str], log: Path) -> float:
    """``python train.py *args`` with its output in ``log``; the wall seconds, or RuntimeError with the log's end."""
    path = os.pathsep.join([str(ROOT / "bench"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    t0 = time.perf_counter()
    with open(log, "w") as f:
        cmd = [sys.executable, "train.py", *args]
        rc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": path}, stdout=f, stderr=f).returncode
    seconds = time.perf_counter() - t0
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"train.py exited with {rc} after {seconds:.0f} s (log: {log}):\n{tail}")
    return seconds


def summarize_run(stats_path: Path, wall: float, batch: int) -> dict:
    """One run's figures from its StepStats JSON."""
    s = json.loads(stats_path.read_text())
    steps, after = s["step_seconds"], s["after_last_step_seconds"]
    median = statistics.median(steps[1:] if len(steps) > 1 else steps)
    return {"start_step": s["start_step"], "end_step": s["end_step"], "steps": len(steps),
            "first_step_seconds": round(steps[0], 3), "median_step_seconds": round(median, 3),
            "images_per_second": round(batch / median, 2), "setup_seconds": round(s["setup_seconds"], 2),
            "after_last_step_seconds": None if after is None else round(after, 2),
            "peak_memory_gb": round(s["peak_memory_bytes"] / 2**30, 2), "memory_kind": s["memory_kind"],
            "world_size": s["world_size"], "unet_params": s["unet_params"], "wall_seconds": round(wall, 1)}  # fmt: skip


def unet_param_count(scale: str) -> int:
    """Trainable U-Net parameters of the scale's config, counted on the meta device (nothing allocated)."""
    from omegaconf import OmegaConf

    from emu.diffusion.unet import UNet

    name = "emu_2p8b" if scale == "paper" else "mini"
    kw = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/unet" / f"{name}.yaml"))
    with torch.device("meta"):
        return sum(p.numel() for p in UNet(**kw).parameters())


def keep_ema(params: int, free_bytes: int) -> tuple[bool, str | None]:
    """Whether the sharded checkpoint can hold the EMA in ``free_bytes`` of disk; raises when even without the EMA it
    cannot. Returns ``(ema, note)``."""
    with_ema, without = (params * CHECKPOINT_BYTES_PER_PARAM[e] + DISK_MARGIN_BYTES for e in (True, False))
    if free_bytes >= with_ema:
        return True, None
    gb = lambda b: f"{b / 2**30:.1f} GB"
    if free_bytes >= without:
        return False, f"EMA off: a checkpoint with it needs ~{gb(with_ema)} of disk, {gb(free_bytes)} free"
    raise RuntimeError(f"the sharded checkpoint needs ~{gb(without)} of free disk even without the EMA, "
                       f"{gb(free_bytes)} free under --out: free space or point --out at a larger disk")  # fmt: skip


def checkpoint_size(path: Path) -> tuple[int, int]:
    """(number of ``*.distcp`` shard files, total bytes) of a sharded checkpoint folder."""
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.suffix == ".distcp" for p in files), sum(p.stat().st_size for p in files)


def run(args) -> dict:
    s = SCALES[args.scale]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.scale == "paper" and device != "cuda":
        raise SystemExit("--scale paper needs a CUDA GPU (the 2.8B U-Net); use --scale tiny on CPU")
    out = Path(args.out).resolve()
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise SystemExit(f"--out {out} is not empty and not an earlier output of this script: choose another folder")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("bench/stage1_fsdp.py output: emptied by its next run\n")
    steps, resume_steps = args.steps or s["steps"], args.resume_steps or s["resume_steps"]
    batch = args.batch or s["batch"]
    t0 = time.perf_counter()
    models, frozen = build_frozen_models(args.scale, out / "models", args.t5_layers)
    build_seconds = time.perf_counter() - t0
    ema, note = keep_ema(unet_param_count(args.scale), shutil.disk_usage(out).free)

    first_dir, resumed_dir = out / "first", out / "resumed"
    common = dict(scale=args.scale, device=device, models=models, batch=batch, ema=ema)
    wall = run_train(train_overrides(run_dir=first_dir, max_steps=steps, stats=out / "first.json", **common),
                     out / "first.log")  # fmt: skip
    first = summarize_run(out / "first.json", wall, batch)
    ckpt = first_dir / "checkpoints" / "last.ckpt"
    if not ckpt.is_dir():
        raise RuntimeError(f"the first run left no sharded checkpoint folder at {ckpt} (log: {out / 'first.log'})")
    shards, size = checkpoint_size(ckpt)
    wall = run_train(train_overrides(run_dir=resumed_dir, max_steps=steps + resume_steps, stats=out / "resumed.json",
                                     resume_from=ckpt, **common), out / "resumed.log")  # fmt: skip
    resumed = summarize_run(out / "resumed.json", wall, batch)
    if (first["end_step"], resumed["start_step"], resumed["end_step"]) != (steps, steps, steps + resume_steps):
        raise RuntimeError(f"resume went wrong: the first run ended at step {first['end_step']} (expected {steps}), "
                           f"the resumed one ran from {resumed['start_step']} to {resumed['end_step']} "
                           f"(expected {steps} to {steps + resume_steps})")  # fmt: skip
    plan = planned_peak(train_overrides(run_dir=first_dir, max_steps=steps, stats=out / "first.json", **common),
                        first["peak_memory_gb"], device)  # fmt: skip
    if not args.keep:
        shutil.rmtree(first_dir / "checkpoints")
        shutil.rmtree(out / "models")
    precision = "bf16 (FSDP param_dtype bfloat16, bf16-mixed)" if device == "cuda" else "float32 (32-true)"
    return {
        "bench": "stage1_fsdp", "scale": args.scale, "device": device_info(torch.device(device)),
        "precision": precision, "resolution": s["resolution"], "batch": batch, "unet_params": first["unet_params"],
        "frozen_models": frozen, "frozen_models_build_seconds": round(build_seconds, 1), "first": first,
        "resumed": resumed, "checkpoint": {"shards": shards, "gb": round(size / 2**30, 3), "ema": ema,
                                           "kept": bool(args.keep)},
        "plan": plan,
        "notes": [n for n in (note, "model.compile=false (bench/unet_step.py measures compiling the U-Net)") if n],
    }  # fmt: skip


def planned_peak(overrides: list[str], measured_gb: float, device: str) -> dict:
    """``python -m emu.plan``'s training-step memory for the first run's config (no overhead: CUDA's
    max_memory_allocated counts tensors only) beside the measured peak; on a CPU only the plan (RSS holds the whole
    process)."""
    from emu.plan import GIB, compose_train, plan_config

    cfg = compose_train([o for o in overrides if not o.startswith(("hydra.", "+callbacks."))])
    if device != "cuda":  # the plan is for the GPU run: a CPU run has no autocast copies and keeps everything in RSS
        cfg.trainer.accelerator = "gpu"
    plan = plan_config(cfg, overhead_gib=0.0)
    planned = sum(plan.train.values()) / GIB
    out = {"planned_gb": round(planned, 2), "parts_gb": {k: round(v / GIB, 2) for k, v in plan.train.items()}}
    if device == "cuda":
        out["measured_gb"] = measured_gb
        out["difference_pct"] = round(100 * (planned - measured_gb) / measured_gb, 1)
    return out


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", choices=sorted(SCALES), default="paper")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if available")
    p.add_argument("--out", required=True, help="a new folder for the models, runs and logs (or an earlier one)")
    p.add_argument("--steps", type=int, default=None, help="steps of the first run (default: the scale's)")
    p.add_argument("--resume-steps", type=int, default=None, help="steps of the resumed run (default: the scale's)")
    p.add_argument("--batch", type=int, default=None, help="per-GPU batch (default: the scale's)")
    p.add_argument("--t5-layers", type=int, default=2, help="paper scale: layers of the T5-XXL-wide encoder (24: all)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint and the frozen models")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    r = run(parse(argv))
    print(f"stage 1 under FSDP, one rank, scale {r['scale']}: {r['unet_params'] / 1e6:.4g}M U-Net parameters, "
          f"batch {r['batch']} at {r['resolution']}px, {r['precision']}; {r['device']}")  # fmt: skip
    keys = ("start_step", "end_step", "median_step_seconds", "images_per_second", "setup_seconds",
            "after_last_step_seconds", "peak_memory_gb")  # fmt: skip
    print_table([{"run": name, **{k: r[name][k] for k in keys}} for name in ("first", "resumed")])
    c = r["checkpoint"]
    print(f"sharded checkpoint: {c['shards']} shard file(s), {c['gb']} GB (EMA: {c['ema']}); memory: "
          f"{r['first']['memory_kind']}")  # fmt: skip
    print(f"frozen models: {r['frozen_models']}")
    plan = r["plan"]
    if "measured_gb" in plan:
        print(f"memory plan (python -m emu.plan): {plan['planned_gb']} GiB planned, {plan['measured_gb']} GiB measured "
              f"({plan['difference_pct']:+.1f}%)")  # fmt: skip
    for note in r["notes"]:
        print(f"note: {note}")
    print(json.dumps(r))
    return r


if __name__ == "__main__":
    main()

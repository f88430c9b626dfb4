"""A memory plan per rank, before a GPU is spent: ``python -m emu.plan <train.py overrides> [--gpu-gib 80] [--json]``.

It composes the config exactly as ``train.py`` does and builds the networks on fake tensors
(``torch._subclasses.FakeTensorMode``: shapes and dtypes, no memory, no weights read), so that a 2.8B U-Net with
T5-XXL plans in seconds on a laptop. Per rank it adds up:

- **trained weights, gradients, optimizer state** (AdamW: two float32 moments) and the **EMA** copy, all float32, each
  divided by the shard count under FSDP (full sharding: every rank; hybrid: the ranks of one node);
- **DDP's gradient buckets** (one more gradient-sized buffer: Lightning's DDP keeps ``gradient_as_bucket_view`` off);
- **FSDP's gathered units**: the largest FSDP unit unsharded in the compute dtype, twice (the one running and the one
  prefetched);
- **frozen networks** (autoencoder, text encoders, LPIPS), replicated on every rank in their configured dtype;
- **activations** of one training step at the configured per-rank batch, resolution, precision and activation
  checkpointing: traced, not guessed. The forward runs on fake tensors under the run's autocast, every tensor saved
  for the backward is counted once, at two batch sizes (per-sample growth and a fixed part: under bf16 autocast the
  cached bf16 copies of float32 weights), then extrapolated to the batch. With checkpointing the saved tensors are the
  block inputs, plus the largest block's own activations while it is recomputed;
- at validation (``trainer.limit_val_batches`` > 0), the EMA swap's copy of the live weights and sampling's
  activations instead of the step's (the last step's gradients are still allocated: they go at the next zero_grad).

``per_rank_gib`` is the larger of the training and validation peaks, plus ``--overhead-gib`` (CUDA context, allocator
fragmentation, NCCL buffers; 3 GiB by default). ``fits`` compares it with ``--gpu-gib``. ``--check`` measures the
activation estimate against a real forward and backward on this machine's CPU at a small config and says by how much
they differ. ``train.py`` runs the same plan on GPU runs and refuses one that cannot fit (``plan.enforce=false`` lets
it through).

Text encoders named by hub id are sized from their config when it is in the local Hugging Face cache, else from
:data:`KNOWN_ENCODERS`; an autoencoder from its config (an emu export, a diffusers folder or cached hub id), and one
that does not exist yet as the paper's (``conf/model/autoencoder``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from emu.errors import ConfigError

log = logging.getLogger("emu.plan")
GIB = 2**30
CONF = Path(__file__).resolve().parents[1] / "conf"
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, None: 4}
# parameters of the text towers emu loads (CLIPTextModelWithProjection / T5EncoderModel), when no config is on disk
KNOWN_ENCODERS = {
    "openai/clip-vit-large-patch14": (123_650_304, 768, 77),  # (parameters, hidden size, max tokens)
    "google/t5-v1_1-xxl": (4_762_310_656, 4096, 512),
    "google/t5-v1_1-xl": (1_223_527_424, 2048, 512),
    "google/flan-t5-xxl": (4_762_310_656, 4096, 512),
}
ADAMW_STATES = 2  # exp_avg and exp_avg_sq, float32
CHECKPOINTED = ("ResnetBlock2D", "Transformer2DModel", "DiTBlock")  # what the networks recompute (unet._Level, DiT)


@dataclass
class Plan:
    """One rank's memory, in bytes by part, for the training step and for validation."""

    setup: dict[str, Any]
    train: dict[str, float] = field(default_factory=dict)
    validation: dict[str, float] = field(default_factory=dict)
    overhead: float = 3 * GIB
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> float:
        return max(sum(self.train.values()), sum(self.validation.values()) if self.validation else 0.0) + self.overhead

    def as_dict(self, gpu_gib: float) -> dict[str, Any]:
        gib = {k: round(v / GIB, 2) for k, v in self.train.items()}
        val = {k: round(v / GIB, 2) for k, v in self.validation.items()}
        return {"per_rank_gib": round(self.peak / GIB, 2), "fits": self.peak <= gpu_gib * GIB, "gpu_gib": gpu_gib,
                **self.setup, "train_gib": gib, "validation_gib": val, "overhead_gib": round(self.overhead / GIB, 2),
                "notes": self.notes}  # fmt: skip

    def report(self, gpu_gib: float) -> str:
        s = self.setup
        lines = [f"memory plan: {s['model']} on {s['ranks']} rank(s) ({s['devices']} device(s) x {s['num_nodes']} "
                 f"node(s)), {s['strategy']}, {s['precision']}, batch {s['batch_per_rank']} per rank at "
                 f"{s['resolution']} px, activation checkpointing {'on' if s['checkpointing'] else 'off'}",
                 f"  trained parameters {s['trained_params'] / 1e9:.3f}B, "
                 f"frozen {s['frozen_params'] / 1e9:.3f}B"]  # fmt: skip
        width = max(len(k) for k in [*self.train, *self.validation, "overhead"])
        for title, parts in (("training step", self.train), ("validation", self.validation)):
            if not parts:
                continue
            lines.append(f"  {title}: {sum(parts.values()) / GIB:.1f} GiB")
            lines += [f"    {k:<{width}} {v / GIB:8.2f} GiB" for k, v in parts.items()]
        lines.append(f"    {'overhead':<{width}} {self.overhead / GIB:8.2f} GiB (CUDA context, fragmentation)")
        verdict = "fits" if self.peak <= gpu_gib * GIB else "DOES NOT FIT"
        lines.append(f"  per rank: {self.peak / GIB:.1f} GiB of {gpu_gib:g} GiB: {verdict}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ composing
def compose_train(overrides: list[str]) -> DictConfig:
    """The config ``train.py`` would run with these overrides (no ``hydra.*`` side effects)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=False)


def layout(trainer: DictConfig) -> dict[str, Any]:
    """Ranks, the FSDP shard group and the precision of a composed ``trainer`` node (``devices: auto``: 8 a node)."""
    devices, notes = trainer.get("devices", 1), []
    if devices in ("auto", -1, "-1", None):
        devices, notes = 8, ["trainer.devices is auto: planned for 8 GPUs a node"]
    devices = len(devices) if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices) else int(devices)
    nodes = int(trainer.get("num_nodes", 1) or 1)
    strategy = trainer.get("strategy")
    target = strategy.get("_target_", "") if isinstance(strategy, DictConfig) else str(strategy or "auto")
    fsdp = target.endswith("FSDPStrategy")
    kind = "fsdp" if fsdp else ("ddp" if devices * nodes > 1 else "single device")
    shard = 1
    if fsdp:
        shard = devices if strategy.get("sharding", "full") == "hybrid" else devices * nodes
    param_dtype = strategy.get("param_dtype") if fsdp else None
    checkpointing = bool(fsdp and strategy.get("activation_checkpointing", False))
    return {"devices": devices, "num_nodes": nodes, "ranks": devices * nodes, "strategy": kind, "shard": shard,
            "precision": str(trainer.get("precision", "32")), "param_dtype": param_dtype,
            "fsdp_checkpointing": checkpointing, "notes": notes}  # fmt: skip


def _fake():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------------------ frozen networks
def text_encoder_size(cfg: dict[str, Any]) -> tuple[int, int, int]:
    """(parameters, bytes, hidden size) of a frozen text encoder config (``name_or_path``, ``kind``, ``dtype``): from
    its config when it is on disk (a folder or the local hub cache), else from :data:`KNOWN_ENCODERS`."""
    name, dtype = str(cfg["name_or_path"]), cfg.get("dtype") or "float32"
    try:
        from transformers import AutoConfig, CLIPTextModelWithProjection, T5EncoderModel

        config = AutoConfig.from_pretrained(name, local_files_only=True)
    except Exception:  # not a folder and not in the local hub cache
        if name not in KNOWN_ENCODERS:
            raise ConfigError("model.text.encoders", f"cannot size '{name}': not on disk and not one of "
                              f"{sorted(KNOWN_ENCODERS)}; give a local folder") from None  # fmt: skip
        params, hidden, _ = KNOWN_ENCODERS[name]
    else:
        config = getattr(config, "text_config", config) if cfg.get("kind", "clip") == "clip" else config
        cls = CLIPTextModelWithProjection if cfg.get("kind", "clip") == "clip" else T5EncoderModel
        with torch.device("meta"):
            params = count(cls(config))
        hidden = int(getattr(config, "hidden_size", None) or config.d_model)
    return params, params * DTYPE_BYTES.get(dtype, 4), hidden


def autoencoder_model(path: str | None):
    """An :class:`AutoencoderKL` skeleton on the meta device: the export's config (emu's, or a public diffusers
    autoencoder's), or the paper's when ``path`` is not one yet."""
    from emu.autoencoder.convert import read_emu_config
    from emu.autoencoder.model import CONFIG_NAME, autoencoder_from_config
    from emu.utils.autoencoder_paths import PIXELS, find_autoencoder

    try:
        kind, folder = find_autoencoder(path) if path else (None, None)
    except (FileNotFoundError, ValueError):
        kind, folder = None, None
    config = None
    if kind == PIXELS:
        from emu.autoencoder.pixel import PixelSpace

        return PixelSpace()
    if kind == "emu":
        config = json.loads((folder / CONFIG_NAME).read_text())
        config.pop("_class_name", None)
        config.pop("latent_statistics", None)
    elif kind == "diffusers":
        config = read_emu_config(folder)
    if config is None:
        node = OmegaConf.load(CONF / "model" / "autoencoder.yaml").autoencoder
        config = {k: v for k, v in OmegaConf.to_container(node).items() if k != "_target_"}
    with torch.device("meta"):
        return autoencoder_from_config(config)


# ------------------------------------------------------------------------------------------------ activations
def saved_bytes(run, params: set[int]) -> tuple[float, dict[int, float]]:
    """Bytes of the tensors ``run()`` saves for the backward pass (each storage once; parameters themselves not
    counted), and per module id of a :data:`CHECKPOINTED` block the bytes saved inside it."""
    seen: dict[int, float] = {}
    keep: list[torch.Tensor] = []  # ids stay unique while the trace runs

    def pack(t: torch.Tensor):
        base = t._base if t._base is not None else t
        if id(base) not in params and id(t) not in params and id(base) not in seen:
            seen[id(base)] = base.numel() * base.element_size()
            keep.append(base)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        blocks = run(lambda: sum(seen.values()))
    return float(sum(seen.values())), blocks


def unet_activations(unet_cfg: dict[str, Any], batch: int, latent_hw: tuple[int, int], context_len: int,
                     amp: bool, checkpointing: bool) -> dict[str, float]:  # fmt: skip
    """Activation bytes of one U-Net training step at ``batch``. Under autocast the trace runs on bfloat16 weights, so
    that casts of the weights are not counted here (:func:`_plan_diffusion` adds them where they exist). Without
    checkpointing: every tensor saved for the backward; with it: the inputs each checkpointed block keeps, the saved
    tensors outside the blocks, and the largest block's own while it is recomputed."""
    from emu.diffusion.networks import build_network
    from emu.diffusion.unet import takes_size_cond

    def trace(b: int) -> tuple[float, float, float, float]:
        default = torch.get_default_dtype()
        with _fake():
            torch.set_default_dtype(torch.bfloat16 if amp else torch.float32)  # built in bf16 (.to() cannot swap fakes)
            try:
                unet = build_network({**unet_cfg, "gradient_checkpointing": False}).train()
            finally:
                torch.set_default_dtype(default)
            params = {id(p) for p in unet.parameters()}
            c = unet.config
            x = torch.randn(b, c["in_channels"], *latent_hw)
            inputs = dict(t=torch.rand(b), context=torch.randn(b, context_len, c["context_dim"]),
                          context_mask=torch.ones(b, context_len, dtype=torch.bool))  # fmt: skip
            if c.get("pooled_dim"):
                inputs["pooled"] = torch.randn(b, c["pooled_dim"])
            if takes_size_cond(c):
                inputs["size_cond"] = torch.randn(b, 6)
            kept: dict[int, float] = {}  # the inputs a checkpointed block keeps (each tensor once)

            def run(total):
                per_block: dict[int, float] = {}

                def before(m, args):
                    per_block[id(m)] = total()
                    for a in args:
                        if isinstance(a, torch.Tensor):
                            kept[id(a)] = a.numel() * a.element_size()

                def after(m, args, out):
                    per_block[id(m)] = total() - per_block[id(m)]

                hooks = []
                for m in unet.modules():
                    if type(m).__name__ in CHECKPOINTED:
                        hooks += [m.register_forward_pre_hook(before), m.register_forward_hook(after)]
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                    unet(x.to(torch.bfloat16) if amp else x, **inputs)
                for h in hooks:
                    h.remove()
                return per_block

            total, blocks = saved_bytes(run, params)
        return total, sum(blocks.values()), max(blocks.values(), default=0.0), sum(kept.values())

    one, two = trace(1), trace(2)

    def at(i: int) -> float:  # linear in the batch: a fixed part and a per-sample part
        return max(one[i] + (two[i] - one[i]) * (batch - 1), 0.0)

    total, inside, largest, inputs = at(0), at(1), at(2), at(3)
    if not checkpointing:
        return {"activations (saved for backward)": total}
    return {"activations (checkpointed: block inputs and the rest)": total - inside + inputs,
            "activations (one block recomputed)": largest}  # fmt: skip


# ------------------------------------------------------------------------------------------------ the plan
def plan_config(cfg: DictConfig, overhead_gib: float = 3.0) -> Plan:
    """The memory plan of a composed train config."""
    target = str(cfg.model.get("_target_", ""))
    lay = layout(cfg.trainer)
    if target.endswith("DiffusionModule"):
        return _plan_diffusion(cfg, lay, overhead_gib)
    if target.endswith("AutoencoderModule"):
        return _plan_autoencoder(cfg, lay, overhead_gib)
    raise ConfigError("model", f"the memory plan covers the diffusion and autoencoder stages, not {target}")


def _amp(lay: dict[str, Any]) -> bool:
    return lay["precision"].startswith(("bf16", "16"))


def _resolution(cfg: DictConfig) -> tuple[int, int]:
    r = cfg.data.get("resolution", 256)
    return (int(r), int(r)) if not OmegaConf.is_list(r) else (int(r[0]), int(r[1]))


def _states(trained: int, shard: int, ema: bool) -> dict[str, float]:
    per = 4 * trained / shard
    out = {"weights (float32)": per, "gradients (float32)": per, "AdamW moments": ADAMW_STATES * per}
    if ema:
        out["EMA copy"] = per
    return out


def _plan_diffusion(cfg: DictConfig, lay: dict[str, Any], overhead_gib: float) -> Plan:
    from emu.diffusion.convert import read_unet_kwargs
    from emu.diffusion.lora import add_lora, lora_settings
    from emu.diffusion.networks import SHARDED_BLOCKS, build_network

    m = cfg.model
    unet_cfg = m.unet if isinstance(m.unet, str) else OmegaConf.to_container(m.unet, resolve=True)
    unet_cfg = read_unet_kwargs(unet_cfg) if isinstance(unet_cfg, str) else unet_cfg  # a diffusers folder's (SDXL)
    unet_cfg.pop("_target_", None)
    with torch.device("meta"):
        unet = build_network(unet_cfg)
    encoders = OmegaConf.to_container(m.text.encoders, resolve=True)
    sizes = [text_encoder_size(enc) for enc in encoders.values()]
    frozen_params, frozen_bytes = sum(s[0] for s in sizes), float(sum(s[1] for s in sizes))
    lengths = [int(e.get("max_length", 77)) for e in encoders.values()]
    features = m.text.get("join", "sequence") == "features"  # SDXL's: side by side along the features, unprojected
    context_len = max(lengths) if features else sum(lengths)
    projections = 0 if features else sum((hidden + 1) * unet.config["context_dim"] for _, _, hidden in sizes)
    trained = count(unet) + projections
    lora = lora_settings(OmegaConf.to_container(m.lora, resolve=True) if m.get("lora") else None)
    base = 0
    if lora:  # the adapters alone train (their gradients, moments and EMA); the U-Net and the projections are frozen
        base = trained
        with torch.device("meta"):
            trained = count(add_lora(unet, lora))
    ae = autoencoder_model(None if OmegaConf.is_missing(m, "autoencoder") else str(m.autoencoder))
    ae_bytes = count(ae) * 4
    precomputed = str(cfg.data.source.get("_target_", "")).endswith("LatentSource")
    h, w = _resolution(cfg)
    f = ae.downsample_factor
    batch = int(cfg.data.batch_size)
    shard, amp = lay["shard"], _amp(lay)
    checkpointing = bool(unet_cfg.get("gradient_checkpointing") or m.get("gradient_checkpointing"))
    checkpointing = checkpointing or lay["fsdp_checkpointing"]
    ema = float(m.get("ema_half_life_images", 0) or 0) > 0
    p = Plan(setup={"model": "DiffusionModule", **{k: v for k, v in lay.items() if k != "notes"},
                    "batch_per_rank": batch, "resolution": f"{h}x{w}", "checkpointing": checkpointing,
                    "trained_params": trained, "frozen_params": frozen_params + count(ae)},
             overhead=overhead_gib * GIB, notes=list(lay["notes"]))  # fmt: skip
    p.train.update(_states(trained, shard, ema))
    if base:
        p.train["U-Net and projections (frozen LoRA base, float32)"] = 4 * base
        p.notes.append(f"LoRA rank {lora['rank']}: {trained:,} adapter parameters train over a frozen {base:,}")
    if lay["strategy"] == "ddp":
        p.train["DDP gradient buckets"] = 4 * trained
    if lay["strategy"] == "fsdp":
        unit = max((count(mod) for mod in unet.modules() if type(mod).__name__ in SHARDED_BLOCKS), default=0)
        p.train["FSDP gathered units (2)"] = 2 * unit * DTYPE_BYTES.get(lay["param_dtype"], 4)
    p.train["text encoders (frozen)"] = frozen_bytes
    p.train["autoencoder (frozen)"] = ae_bytes
    if amp and lay["strategy"] != "fsdp":  # autocast caches a bf16 copy of every float32 weight for the step
        p.train["autocast bf16 weight copies"] = 2 * (trained + base)
    p.train.update(unet_activations(unet_cfg, batch, (h // f, w // f), context_len, amp, checkpointing))
    if not precomputed:
        p.train["autoencoder encode (transient)"] = _encode_transient(ae, batch, h, w, amp)
    else:
        p.notes.append("latents and text embeddings precomputed: no encoder runs in the step")
    if float(cfg.trainer.get("limit_val_batches", 1.0) or 0) > 0:
        keep = (
            "weights (float32)",
            "gradients (float32)",
            "AdamW moments",
            "EMA copy",
            "FSDP gathered units (2)",
            "U-Net and projections (frozen LoRA base, float32)",
            "text encoders (frozen)",
            "autoencoder (frozen)",
            "DDP gradient buckets",
        )  # the step's gradients stay
        # allocated until the next step's zero_grad
        p.validation = {k: v for k, v in p.train.items() if k in keep}
        if ema:
            p.validation["EMA swap (live weights kept)"] = 4 * trained / shard
        p.validation["sampling activations (no grad)"] = _inference_transient(unet_cfg, batch, (h // f, w // f))
    return p


def _encode_transient(ae: nn.Module, batch: int, h: int, w: int, amp: bool) -> float:
    """The largest activations of the frozen encoder's no-grad forward: ~3 of its largest intermediate tensors."""
    if not ae.config["block_out_channels"]:  # pixel space: nothing runs
        return 0.0
    widest = max(ae.config["block_out_channels"])
    first = ae.config["block_out_channels"][0]
    bytes_per = 2 if amp else 4
    return 3 * max(batch * first * h * w, batch * widest * (h // 4) * (w // 4)) * bytes_per


def _inference_transient(unet_cfg: dict[str, Any], batch: int, latent_hw: tuple[int, int]) -> float:
    """No-grad sampling holds only a few live activations: ~4 of the widest level's feature maps (CFG: 2x batch); a
    DiT's: ~4 of its token maps."""
    if unet_cfg.get("arch") == "dit":  # (DiT's defaults where the config leaves them out)
        p, width = unet_cfg.get("patch_size", 2), unet_cfg.get("width", 1152)
        return 4 * 2 * batch * (latent_hw[0] // p) * (latent_hw[1] // p) * width * 4
    c = unet_cfg["block_channels"]
    return 4 * 2 * batch * max(ch * (latent_hw[0] >> i) * (latent_hw[1] >> i) for i, ch in enumerate(c)) * 4


def _plan_autoencoder(cfg: DictConfig, lay: dict[str, Any], overhead_gib: float) -> Plan:
    from hydra.utils import instantiate

    with torch.device("meta"):
        ae_cfg = OmegaConf.to_container(cfg.model.autoencoder, resolve=True)
        ae_cfg.pop("_target_", None)
        ae = autoencoder_model(None)
        ae = type(ae)(**ae_cfg)
        loss_cfg = OmegaConf.to_container(cfg.model.loss, resolve=True)
        loss_cfg["lpips_weight"] = 0.0  # the LPIPS network is sized below, without reading its weights
        disc = instantiate(loss_cfg).discriminator
    trained = count(ae) + count(disc)
    lpips = 14_714_688 if float(cfg.model.loss.get("lpips_weight", 0) or 0) > 0 else 0  # VGG16 features
    h, w = _resolution(cfg)
    batch = int(cfg.data.batch_size)
    amp = _amp(lay)
    p = Plan(setup={"model": "AutoencoderModule", **{k: v for k, v in lay.items() if k != "notes"},
                    "batch_per_rank": batch, "resolution": f"{h}x{w}",
                    "checkpointing": bool(ae_cfg.get("gradient_checkpointing")), "trained_params": trained,
                    "frozen_params": lpips}, overhead=overhead_gib * GIB, notes=list(lay["notes"]))  # fmt: skip
    p.train.update(_states(trained, lay["shard"], ema=False))
    if lay["strategy"] == "ddp":
        p.train["DDP gradient buckets"] = 4 * trained
    p.train["LPIPS VGG (frozen)"] = 4 * lpips

    def traced(b: int) -> float:
        with _fake():
            net = type(ae)(**{**ae_cfg, "gradient_checkpointing": False}).train()

            def run(total):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                    net(torch.randn(b, ae.config["in_channels"], h, w))
                return {}

            return saved_bytes(run, {id(q) for q in net.parameters()})[0]

    sizes = [traced(1), traced(2)]
    act = max(sizes[0] + (sizes[1] - sizes[0]) * (batch - 1), 0.0)
    p.train["activations (saved for backward)"] = act * (1.5 if lpips else 1.0)
    p.notes.append("LPIPS and the discriminator add ~50% to the autoencoder's activations (estimated, not traced)")
    return p


# ------------------------------------------------------------------------------------------------ the CPU check
CHECK_UNET = dict(in_channels=16, out_channels=16, block_channels=[64, 128, 256], layers_per_block=2,
                  transformer_depth=[0, 1, 1], head_dim=32, context_dim=256, pooled_dim=128,
                  linear_projection=True)  # fmt: skip
CHECK_SETUP = dict(batch=8, latent_hw=(32, 32), context_len=64)


def measure_cpu_activations(unet_cfg: dict[str, Any] = CHECK_UNET, batch: int = 8, latent_hw=(32, 32),
                            context_len: int = 64) -> float:  # fmt: skip
    """The resident memory a real float32 forward holds on this CPU when it ends (every tensor the backward needs is
    alive then, and nothing else of the step): what the activation estimate predicts. In a fresh process, after a
    batch-1 warm-up step."""
    import subprocess

    code = f"""
import json, torch
from emu.diffusion.unet import UNet
from emu.plan import _rss
torch.manual_seed(0)
torch.set_num_threads(1)
unet = UNet(**{unet_cfg!r}).train()
b, (h, w), L = {batch}, {tuple(latent_hw)!r}, {context_len}
x = torch.randn(b, 16, h, w); t = torch.rand(b); c = torch.randn(b, L, unet.config["context_dim"])
mask = torch.ones(b, L, dtype=torch.bool); p = torch.randn(b, unet.config["pooled_dim"])
unet(x[:1], t[:1], c[:1], mask[:1], p[:1]).sum().backward()  # warm up: kernels, allocator pools, the gradients
grads = sum(q.grad.numel() * 4 for q in unet.parameters())
for q in unet.parameters():
    q.grad = None
before = _rss()["VmRSS"]
loss = unet(x, t, c, mask, p).float().square().mean()
held = _rss()["VmRSS"] - before
loss.backward()
print(json.dumps({{"held": held, "peak": _rss()["VmHWM"] - before, "grads": grads}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=600)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return float(r["held"])


def _rss() -> dict[str, float]:
    """VmRSS and VmHWM (peak) of this process, in bytes (Linux)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = float(value.split()[0]) * 1024
    return fields


def check_on_cpu() -> dict[str, float]:
    """The activation estimate against a measured CPU peak at :data:`CHECK_UNET` / :data:`CHECK_SETUP`."""
    s = CHECK_SETUP
    estimate = unet_activations(CHECK_UNET, s["batch"], s["latent_hw"], s["context_len"], amp=False,
                                checkpointing=False)["activations (saved for backward)"]  # fmt: skip
    measured = measure_cpu_activations(CHECK_UNET, s["batch"], s["latent_hw"], s["context_len"])
    return {"estimate_gib": estimate / GIB, "measured_gib": measured / GIB,
            "difference_pct": 100 * (estimate - measured) / measured}  # fmt: skip


# ------------------------------------------------------------------------------------------------ entry points
def check_fits(cfg: DictConfig) -> Plan | None:
    """What ``train.py`` calls: on GPU runs, the plan; when the run cannot fit (``plan.gpu_gib``), the plan on stderr
    and a :class:`ConfigError` (``plan.enforce=false`` lets it through)."""
    settings = cfg.get("plan") or {}
    if str(cfg.trainer.get("accelerator", "cpu")) not in ("gpu", "cuda") or not settings.get("enforce", True):
        return None
    if cfg.trainer.get("devices") in ("auto", -1, "-1") and torch.cuda.is_available():  # this node's GPUs, not 8
        cfg = cfg.copy()
        cfg.trainer.devices = torch.cuda.device_count()
    try:
        plan = plan_config(cfg, float(settings.get("overhead_gib", 3.0)))
    except ConfigError as e:  # a model the plan does not cover, or an encoder it cannot size
        log.warning("no memory plan: %s", e)
        return None
    gpu_gib = float(settings.get("gpu_gib") or _device_gib() or 80.0)
    if plan.peak > gpu_gib * GIB:
        print(plan.report(gpu_gib), file=sys.stderr)  # the plan above the one-line error
        raise ConfigError("plan", f"this run does not fit its GPUs ({plan.peak / GIB:.1f} GiB per rank, {gpu_gib:g} "
                          "GiB a GPU): shard it (trainer=fsdp), lower data.batch_size or turn on activation "
                          "checkpointing; plan.enforce=false runs it anyway")  # fmt: skip
    return plan


def _device_gib() -> float | None:
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / GIB
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m emu.plan", description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="the same overrides as train.py, e.g. experiment=stage1_pretrain")
    p.add_argument(
        "--gpu-gib",
        type=float,
        default=80.0,
        help="memory of one GPU in GiB (default 80; an 80 GB A100/H100 reports ~79)",
    )
    p.add_argument("--overhead-gib", type=float, default=3.0)
    p.add_argument("--json", action="store_true", help="one line of JSON (per_rank_gib, fits, the parts)")
    p.add_argument("--check", action="store_true", help="also measure the activation estimate against a CPU run")
    a = p.parse_args(argv)
    try:
        plan = plan_config(compose_train(a.overrides), a.overhead_gib)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    out = plan.as_dict(a.gpu_gib)
    if a.check:
        out["cpu_check"] = {k: round(v, 3) for k, v in check_on_cpu().items()}
    if a.json:
        print(json.dumps(out))
    else:
        print(plan.report(a.gpu_gib))
        if a.check:
            c = out["cpu_check"]
            print(f"  activation estimate checked on this CPU (small U-Net, batch {CHECK_SETUP['batch']}, float32): "
                  f"estimate {c['estimate_gib']:.3f} GiB, measured {c['measured_gib']:.3f} GiB "
                  f"({c['difference_pct']:+.1f}%)")  # fmt: skip
    return 0 if out["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())

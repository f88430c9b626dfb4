"""Config validation before any work starts: unknown keys, and mismatches between the stages a run links.

:func:`validate` reads the composed config and the small files it points at (an autoencoder's ``config.json`` or
checkpoint header, a text encoder's ``config.json``, an ``init_from`` checkpoint's U-Net config) without building a
network, and raises one :class:`~emu.errors.ConfigError` naming every bad key with its fix:

* keys that no ``_target_`` accepts (a typo in an experiment file would otherwise surface as a ``TypeError`` deep in
  instantiation, or not at all), with the closest valid name;
* the autoencoder's latent channels against the U-Net's input and output channels;
* the data resolution against the autoencoder's and the U-Net's downsampling (:mod:`emu.utils.resolution`);
* the U-Net's pooled width against the CLIP encoder's projection, and an ``init_from`` checkpoint's U-Net and text
  projections against this model's.
"""

from __future__ import annotations

import difflib
import inspect
import json
from pathlib import Path
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from emu.errors import ConfigError
from emu.utils.autoencoder_paths import CONFIG_NAME, PIXEL_CONFIG, PIXELS, downsample_factor, find_autoencoder
from emu.utils.checkpoint_header import diffusers_unet_folder, header, is_sharded_checkpoint, read_header
from emu.utils.resolution import resolution_problem

HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
NETWORKS = {"unet": "emu.diffusion.unet.UNet", "dit": "emu.diffusion.dit.DiT"}  # by model.unet.arch (networks.py)
KWARG_NODES = {  # config nodes passed as plain dicts to a class, by the model that takes them (a dict: by its arch)
    "emu.diffusion.module.DiffusionModule": {
        "unet": NETWORKS,
        "val_sampling": "emu.diffusion.pipeline.SamplingSettings",
    },
    "emu.diffusion.selection.CheckpointSelection": {"sampling": "emu.diffusion.pipeline.SamplingSettings"},
    "emu.maskgit.module.MaskGITModule": {
        "transformer": "emu.maskgit.transformer.MaskedTokenTransformer",
        "val_sampling": "emu.diffusion.pipeline.SamplingSettings",
    },
    "emu.maskgit.tokenizer.TokenizerModule": {"tokenizer": "emu.maskgit.tokenizer.LatentTokenizer"},
}


def _accepted(target: str) -> set[str] | None:
    """Keyword names ``target`` accepts; None when it takes ``**kwargs`` (anything goes)."""
    obj = get_object(target)
    sig = inspect.signature(obj.__init__ if inspect.isclass(obj) else obj)
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return {n for n in sig.parameters if n != "self"}


def _unknown(node: DictConfig, path: str, target: str, problems: list[tuple[str, str]],
             also: frozenset[str] = frozenset()) -> None:  # fmt: skip
    try:
        accepted = _accepted(target)
        renamed = getattr(get_object(target), "RENAMED", {})  # old key -> new key, where a class keeps that record
    except Exception:  # not importable: instantiation will say so
        return
    if accepted is None:
        return
    for key in node:
        if key in HYDRA_KEYS or key in accepted or key in also:
            continue
        if key in renamed:
            problems.append((f"{path}.{key}", f"is now called {renamed[key]!r}; set {path}.{renamed[key]} instead"))
            continue
        close = difflib.get_close_matches(str(key), sorted(accepted), n=1)
        hint = f"did you mean {path}.{close[0]}?" if close else f"it takes {', '.join(sorted(accepted))}"
        problems.append((f"{path}.{key}", f"is not a setting of {target.rsplit('.', 1)[-1]}; {hint}"))


def _walk(node: Any, path: str, problems: list[tuple[str, str]]) -> None:
    if not isinstance(node, DictConfig):
        return
    target = node.get("_target_") if "_target_" in node else None
    if target:
        _unknown(node, path, target, problems)
        for key, sub_target in KWARG_NODES.get(target, {}).items():
            sub = node.get(key)
            if isinstance(sub, DictConfig):
                also = frozenset()
                if isinstance(sub_target, dict):  # the class its arch names (unknown arches: the model says so)
                    sub_target, also = sub_target.get(str(sub.get("arch", "unet"))), frozenset({"arch"})
                if sub_target:
                    _unknown(sub, f"{path}.{key}", sub_target, problems, also)
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_interpolation():
            _walk(child, f"{path}.{key}" if path else str(key), problems)


# ------------------------------------------------------------------------------------------ stage links
def autoencoder_config(path: str | Path) -> dict[str, Any] | None:
    """An autoencoder's config (``latent_channels``, ``block_out_channels``: emu's and diffusers' keys alike) from
    its export folder, a diffusers ``AutoencoderKL`` folder or cached hub id (config.json), or a stage-0 checkpoint
    (header only); :func:`~emu.utils.autoencoder_paths.find_autoencoder`'s errors when it is none of them."""
    kind, path = find_autoencoder(path)
    if kind == PIXELS:
        return dict(PIXEL_CONFIG)
    if kind != "checkpoint":
        return json.loads((path / CONFIG_NAME).read_text())
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    return header(ckpt).get("autoencoder_config")


def _clip_projection(spec: dict[str, Any]) -> int | None:
    config = Path(str(spec.get("name_or_path", ""))).expanduser() / "config.json"
    if spec.get("kind", "clip") != "clip" or not config.is_file():
        return None
    return json.loads(config.read_text()).get("projection_dim")


def _diffusers_unet_sizes(path: str, problems: list[tuple[str, str]]) -> dict[str, Any]:
    """What the links below compare of a ``model.unet`` given as a diffusers U-Net (or pipeline) folder: its channels
    and levels, from its ``config.json`` (the rest is converted, and checked, when the model is built)."""
    folder = diffusers_unet_folder(path)
    if folder is None:
        problems.append(("model.unet", f"'{path}' is neither U-Net settings nor a diffusers UNet2DConditionModel "
                         "folder (or a pipeline folder with one in unet/)"))  # fmt: skip
        return {}
    config = json.loads((folder / CONFIG_NAME).read_text())
    names = {"in_channels": "in_channels", "out_channels": "out_channels", "block_out_channels": "block_channels"}
    return {ours: config[theirs] for theirs, ours in names.items() if theirs in config}


def _diffusion_links(cfg: DictConfig, problems: list[tuple[str, str]]) -> None:
    model, unet = cfg.model, cfg.model.get("unet") or {}
    if isinstance(unet, str):
        unet = _diffusers_unet_sizes(unet, problems)
    strategy = str(OmegaConf.select(cfg, "trainer.strategy._target_", default="") or "")
    if (OmegaConf.select(cfg, "model.lora.rank", default=0) or 0) and strategy.endswith("FSDPStrategy"):
        problems.append(("model.lora", "trains under DDP (trainer=ddp), not FSDP: the base is frozen and replicated, "
                         "the adapters are small"))  # fmt: skip
    ae = None
    if model.get("autoencoder"):
        try:
            ae = autoencoder_config(model.autoencoder)
        except (FileNotFoundError, ValueError) as e:
            problems.append(("model.autoencoder", str(e)))
    if ae:
        for key in ("in_channels", "out_channels"):
            if key in unet and unet[key] != ae["latent_channels"]:
                problems.append((f"model.unet.{key}", f"is {unet[key]} but the autoencoder '{model.autoencoder}' has "
                                 f"{ae['latent_channels']} latent channels; set model.unet.{key}="
                                 f"{ae['latent_channels']}"))  # fmt: skip
        ae_f = downsample_factor(ae)
        if unet.get("arch") == "dit":  # one token per patch (emu.diffusion.dit; its default patch is 2)
            unet_f, net = int(unet.get("patch_size", 2)), "DiT patch"
        else:
            unet_f, net = 2 ** (len(unet.get("block_channels", [0])) - 1), "U-Net"
        res = OmegaConf.select(cfg, "data.resolution")
        problem = res and resolution_problem(res, ae_f * unet_f, f"autoencoder f={ae_f} x {net} {unet_f}x")
        if problem:
            problems.append(("data.resolution", problem))
    encoders = OmegaConf.to_container(model.text.encoders, resolve=True) if model.get("text") else {}
    pooled_from = model.text.get("pooled_from", "clip") if model.get("text") else None
    projection = _clip_projection(encoders.get(pooled_from, {})) if pooled_from else None
    if projection and unet.get("pooled_dim") and unet["pooled_dim"] != projection:
        problems.append(("model.unet.pooled_dim", f"is {unet['pooled_dim']} but the {pooled_from} encoder "
                         f"'{encoders[pooled_from]['name_or_path']}' projects to {projection}; set "
                         f"model.unet.pooled_dim={projection}"))  # fmt: skip
    if model.get("init_from"):
        _init_from_links(model, unet, problems)


def _autoencoder_links(cfg: DictConfig, problems: list[tuple[str, str]]) -> None:
    blocks = OmegaConf.select(cfg, "model.autoencoder.block_out_channels")
    res = OmegaConf.select(cfg, "data.resolution")
    if blocks and res:
        f = 2 ** (len(blocks) - 1)
        problem = resolution_problem(res, f, f"the autoencoder's downsampling f={f}")
        if problem:
            problems.append(("data.resolution", problem))


def _init_from_links(model: DictConfig, unet: DictConfig | dict, problems: list[tuple[str, str]]) -> None:

    path = Path(str(model.init_from)).expanduser()
    if diffusers_unet_folder(path):  # its U-Net is converted and matched when the model is built
        return
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():  # an emu export: checked when built
        return
    if not path.is_file() and not is_sharded_checkpoint(path):
        problems.append(("model.init_from", f"no checkpoint at '{path}'"))
        return
    theirs = read_header(path).get("unet_config", {})  # a file, or an FSDP run's sharded folder
    ours = unet if isinstance(unet, dict) else OmegaConf.to_container(unet, resolve=True)
    if theirs and theirs.get("arch", "unet") != ours.get("arch", "unet"):
        problems.append(("model.unet", f"is a {ours.get('arch', 'unet')} but model.init_from's network is a "
                         f"{theirs.get('arch', 'unet')}; set model.unet (or model=...) to match"))  # fmt: skip
        return
    for key, value in (unet if isinstance(unet, dict) else OmegaConf.to_container(unet, resolve=True)).items():
        if key in theirs and key != "gradient_checkpointing" and not _same(theirs[key], value):
            problems.append((f"model.unet.{key}", f"is {value} but model.init_from's U-Net has {theirs[key]}; "
                             f"set model.unet.{key}={theirs[key]} or start from another checkpoint"))  # fmt: skip


def _same(a: Any, b: Any) -> bool:
    """Equal as U-Net settings: a per-level list equals one value given for every level."""
    if isinstance(a, list | tuple) and not isinstance(b, list | tuple):
        return all(x == b for x in a)
    if isinstance(b, list | tuple) and not isinstance(a, list | tuple):
        return all(x == a for x in b)
    return list(a) == list(b) if isinstance(a, list | tuple) else a == b


def validate(cfg: DictConfig) -> None:
    """Raise one :class:`ConfigError` naming every unknown key and stage mismatch in ``cfg`` (see module doc)."""
    problems: list[tuple[str, str]] = []
    for group in ("data", "model", "trainer", "callbacks", "logger"):
        node = cfg.get(group)
        if isinstance(node, DictConfig):
            _walk(node, group, problems)
    target = OmegaConf.select(cfg, "model._target_") or ""
    if target.endswith("DiffusionModule"):
        _diffusion_links(cfg, problems)
    if target.endswith("AutoencoderModule"):
        _autoencoder_links(cfg, problems)
    if problems:
        keys = ", ".join(k for k, _ in problems)
        detail = "; ".join(f"{k} {p}" for k, p in problems)
        raise ConfigError(keys, f"{len(problems)} problem(s) found before any work started: {detail}")

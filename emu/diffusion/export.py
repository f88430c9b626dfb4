"""A stage-1/2 model as a folder of safetensors and JSON: what ``python -m emu.export safetensors`` writes and what
``sample.py`` / ``eval.py`` load in place of a Lightning checkpoint, with no pickle anywhere.

::

    config.json              {"_class_name": "emu.DiffusionModel", "weights": "ema" | "raw", "step", "resolution",
                              "data": what it trained on, "source": the checkpoint,
                              "hyper_parameters": the module's, with the frozen models' paths relative to the folder}
    model.safetensors        the trained weights: ``unet.*`` and ``conditioner.proj.*`` (EMA or raw, as chosen)
    autoencoder/             the frozen autoencoder (:meth:`AutoencoderKL.save_pretrained`)
    text_encoders/<name>/    each frozen text encoder and its tokenizer (transformers' ``save_pretrained``)

The folder is self-contained: it can be copied or shared and loads anywhere emu is installed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from emu.diffusion.lora import Adapters, is_adapter_key
from emu.utils.autoencoder_paths import PIXELS

CLASS_NAME = "emu.DiffusionModel"
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
TRAINED_PREFIXES = {"unet": "unet.", "text_proj": "conditioner.proj.", "lora": "unet."}  # lora: the U-Net's adapters


def export_key(name: str, key: str) -> str:
    """A trained part's state-dict key as the module's (LoRA adapters: under the U-Net's own names)."""
    return TRAINED_PREFIXES[name] + (Adapters.net_key(key) if name == "lora" else key)


def part_state(name: str, state: dict[str, Any]) -> dict[str, Any]:
    """The weights of one trained part among the module's (the inverse of :func:`export_key`)."""
    prefix = TRAINED_PREFIXES[name]
    if name == "lora":
        return {Adapters.view_key(k[len(prefix) :]): v for k, v in state.items()
                if k.startswith(prefix) and is_adapter_key(k)}  # fmt: skip
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def is_export(folder: str | Path) -> bool:
    """Whether ``folder`` is a folder this module wrote (its config names an emu diffusion model)."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("_class_name") == CLASS_NAME
    except (json.JSONDecodeError, AttributeError):
        return False


def plain_json(value: Any, key: str = "hyper_parameters") -> Any:
    """``value`` as plain JSON (paths as strings, tuples as lists); a ValueError names the first key that is not."""
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, dict) or hasattr(value, "items"):
        return {str(k): plain_json(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain_json(v, f"{key}[{i}]") for i, v in enumerate(value)]
    raise ValueError(f"{key} is a {type(value).__name__}, which has no JSON form; the model cannot be exported")


def trained_state(module, ema: bool = True, keep: bool = True) -> dict[str, Any]:
    """The trained weights of ``module`` by export key, full tensors on the CPU: the EMA's parameters when ``ema`` and
    it has one (buffers are the live ones), else the weights it holds. Under FSDP each sharded tensor is gathered, so
    every rank must call it; ranks with ``keep=False`` take part in the gathering and get ``{}``."""
    use_ema = bool(ema and module.ema is not None)
    state = {}
    for name, sub in module.trained_modules().items():
        averaged = dict(module.ema.shadow[name].named_parameters()) if use_ema else {}
        if use_ema and set(averaged) != {k for k, _ in sub.named_parameters()}:
            raise ValueError(f"the EMA's copy of {name} has other parameters than the model")
        for k, v in sub.state_dict().items():
            v = averaged.get(k, v).detach()
            v = v.full_tensor() if hasattr(v, "full_tensor") else v  # a DTensor shard under FSDP2: all-gather it
            if keep:
                state[export_key(name, k)] = v.cpu().contiguous()
    return state


def save_export(module, folder: str | Path, ema: bool = True, step: int | None = None,
                source: str | None = None, copy_frozen: bool = True,
                state: dict[str, Any] | None = None) -> Path:  # fmt: skip
    """Write ``module`` (a :class:`~emu.diffusion.module.DiffusionModule`) as an export folder: its EMA weights when
    ``ema`` and it has them (else the weights it holds; ``config.json`` says which), and copies of its frozen
    models; with ``copy_frozen=False`` the frozen models stay where they are, named by absolute path (a folder that
    loads on this machine only: what checkpoint selection keeps at every scoring). ``state``: the weights from
    :func:`trained_state` when they were gathered already (under FSDP, on every rank)."""
    from safetensors.torch import save_file

    if copy_frozen and module.adapters is not None:
        raise ValueError("a self-contained export of a LoRA model holds it merged: call module.merge_lora() first (the "
                         "adapters alone, over their base by path: copy_frozen=False)")  # fmt: skip
    hp = plain_json(dict(module.hparams))  # before anything is written: a model that cannot be described fails here
    hp["val_prompts"], hp["val_seeds"] = list(module.val_prompts), list(module.val_seeds)  # not a file's path
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    use_ema = bool(ema and module.ema is not None)
    weights = "ema" if use_ema else (module.exported_weights or "raw")  # an export's own label carries over
    state = trained_state(module, ema) if state is None else state
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt", "emu_kind": "diffusion"})

    if copy_frozen:
        module.autoencoder.save_pretrained(folder / "autoencoder")
        hp["autoencoder"] = "autoencoder"
        for name, encoder in module.conditioner.encoders.items():
            target = folder / "text_encoders" / name
            encoder.model.save_pretrained(target)
            encoder.tokenizer.save_pretrained(target)
            hp["text"]["encoders"][name]["name_or_path"] = f"text_encoders/{name}"
            hp["text"]["encoders"][name].pop("tokenizer", None)  # copied beside its model
    else:  # referenced where they are: local paths made absolute, hub ids kept
        hp["autoencoder"] = _absolute(hp["autoencoder"])
        if hp.get("lora") and hp.get("init_from"):  # the adapters' base, read again when they load
            hp["init_from"] = _absolute(hp["init_from"])
        for enc in hp["text"]["encoders"].values():
            enc["name_or_path"] = _absolute(enc["name_or_path"])
            if enc.get("tokenizer"):
                enc["tokenizer"] = _absolute(enc["tokenizer"])
    config = {"_class_name": CLASS_NAME, "weights": weights, "step": step,
              "resolution": module.train_resolution, "data": module.trained_on, "source": source,
              "frozen": "copied" if copy_frozen else "referenced", "hyper_parameters": hp}  # fmt: skip
    if module.adapters is not None:  # LoRA: the adapters' base, checked when they load over init_from again
        config["lora_base"] = module.base_fingerprint
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def _absolute(name_or_path: str) -> str:
    """A local path made absolute; a hub id (nothing at that path here) and ``pixels`` (no autoencoder) as they are."""
    if name_or_path == PIXELS:
        return name_or_path
    local = Path(name_or_path).expanduser()
    return str(local.resolve()) if local.exists() else name_or_path


def read_export_config(folder: str | Path) -> dict[str, Any]:
    """The config of an export folder, with the frozen models' paths made absolute; a clear error for anything else."""
    folder = Path(folder).expanduser()
    if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"'{folder}' is not an exported emu diffusion model (needs {CONFIG_NAME} and "
                                f"{WEIGHTS_NAME}; write one with `python -m emu.export safetensors CKPT`)")  # fmt: skip
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"'{folder / CONFIG_NAME}' is not JSON ({e.msg})") from e
    if not isinstance(config, dict) or config.get("_class_name") != CLASS_NAME:
        kind = config.get("_class_name") if isinstance(config, dict) else None
        kind = kind or ("diffusers" if isinstance(config, dict) and "_diffusers_version" in config else "unknown")
        raise ValueError(f"'{folder}' holds a {kind} model, not an exported emu diffusion model")
    if not isinstance(config.get("hyper_parameters"), dict) or config.get("weights") not in ("ema", "raw"):
        raise ValueError(f"'{folder / CONFIG_NAME}' lacks the hyper-parameters or the weights' kind: not an export")
    hp = config["hyper_parameters"]

    def resolve(p: str) -> str:
        if Path(p).is_absolute() or config.get("frozen") == "referenced":  # the latter: a hub id or absolute path
            return p
        if not (folder / p).exists():
            raise FileNotFoundError(f"the export '{folder}' lacks '{p}', a frozen model it needs (copy whole folders)")
        return str(folder / p)

    hp["autoencoder"] = resolve(hp["autoencoder"])
    for enc in hp["text"]["encoders"].values():
        enc["name_or_path"] = resolve(enc["name_or_path"])
    return config


def load_export_weights(module, folder: str | Path) -> None:
    """Load an export's trained weights into ``module`` (strict per part: a missing or extra key is an error)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(folder) / WEIGHTS_NAME
    try:
        with safe_open(str(path), "pt") as f:
            kind = (f.metadata() or {}).get("emu_kind")
        state = load_file(str(path))
    except Exception as e:  # truncated or not a safetensors file
        raise ValueError(f"'{path}' is not a readable safetensors file ({type(e).__name__}: {e})") from e
    if kind != "diffusion":
        raise ValueError(f"'{path}' holds a {kind or 'foreign'} model, not an emu diffusion model")
    for name, sub in module.trained_modules().items():
        try:
            sub.load_state_dict(part_state(name, state))
        except RuntimeError as e:
            raise ValueError(f"'{path}' does not fit the model its config.json describes ({name}): "
                             f"{str(e).splitlines()[0]}") from e  # fmt: skip
    unknown = [k for k in state if not k.startswith(tuple(TRAINED_PREFIXES.values()))]
    if unknown:
        raise ValueError(f"'{path}' has weights of no part of the model: {unknown[:3]}")

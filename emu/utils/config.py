"""Helpers shared by the entry points: required-value checks, group instantiation, one-line config errors."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from emu.errors import ConfigError

EXAMPLES = {  # shown with a missing value, to say what a good one looks like
    "a": "a=runs/stage2/checkpoints/last.ckpt (a checkpoint, a sample.py folder or an autoencoder export) "
    "[b=runs/stage1/checkpoints/last.ckpt] prompts=parti:200 (the miniature: experiment=mini/eval)",
    "ckpt": "ckpt=outputs/.../checkpoints/last.ckpt prompt='a photo of a cat' (or prompts=FILE, parti:N)",
    "clip": "clip=openai/clip-vit-large-patch14 (a local CLIPModel folder or cached hub name; the miniature: "
    "experiment=mini/curate)",
    "data.source.shards": "data.source.shards='/data/laion/{00000..00999}.tar'",
    "data.source.root": "data.source.root=/path/to/images",
    "model.autoencoder": "model.autoencoder=outputs/autoencoder/runs/<run>/export",
    "model.init_from": "model.init_from=outputs/<previous stage>/runs/<run>/checkpoints/last.ckpt",
}


def _missing(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Dotted keys of ``???`` values, found without resolving interpolations (which may need a running Hydra)."""
    out = []
    for key in cfg:
        if OmegaConf.is_missing(cfg, key):
            out.append(f"{prefix}{key}")
            continue
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_interpolation() and not node._is_none():
            out += _missing(node, f"{prefix}{key}.")
    return out


def check_required(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` naming every required value (``???``) the composed config leaves unset."""
    missing = sorted(_missing(cfg))
    if missing:
        hint = (
            "; e.g. " + " ".join(EXAMPLES[k] for k in missing if k in EXAMPLES) if set(missing) & set(EXAMPLES) else ""
        )
        raise ConfigError(", ".join(missing), f"required value not set: add it to the command line{hint}")


def require_groups(cfg: DictConfig, *groups: str) -> None:
    """Raise :class:`ConfigError` for each config group in ``groups`` the composed config leaves unchosen (``null``),
    then :func:`check_required` on each: e.g. a helper that composes train.yaml needs ``data=`` (or an experiment)."""
    for group in groups:
        if cfg.get(group) is None:
            raise ConfigError(group, f"no {group} chosen: add {group}=<option> (e.g. data=webdataset "
                              "data.source.shards=...) or experiment=<name>")  # fmt: skip
        check_required(cfg[group])


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a config group made of named ``_target_`` nodes (callbacks, loggers)."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if isinstance(node, DictConfig) and "_target_" in node]


def _config_error(exc: BaseException) -> ConfigError | MissingMandatoryValue | None:
    while exc is not None:
        if isinstance(exc, (ConfigError, MissingMandatoryValue)):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def config_errors_as_messages(fn: Callable) -> Callable:
    """Turn configuration errors raised by an entry point into one clear line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            err = _config_error(e)
            if err is None:
                raise
            msg = str(err).splitlines()[0] if isinstance(err, ConfigError) else _missing_message(err)
            print(f"config error: {msg}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def _missing_message(err: MissingMandatoryValue) -> str:
    key = getattr(err, "full_key", None) or str(err)
    return f"{key}: required value not set: add it to the command line"


def experiments(conf_dir: str | Path, entry: str = "train") -> list[str]:
    """The experiments (conf/experiment/) of an entry point: eval.py's are named ``.../eval``, curate.py's
    ``.../curate``; the rest are train.py's. Files under a ``common/`` folder are what experiments share, not
    experiments."""
    root = Path(conf_dir) / "experiment"
    names = sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml")
                   if "common" not in p.relative_to(root).parts[:-1])  # fmt: skip  # common/: what stages share
    own = {"eval": "eval", "curate": "curate"}
    if entry in own:
        return [n for n in names if n.rsplit("/", 1)[-1] == own[entry]]
    return [n for n in names if n.rsplit("/", 1)[-1] not in own.values()]


def check_experiment_args(argv: list[str], conf_dir: str, entry: str = "train") -> None:
    """Exit with one line naming the available experiments when ``experiment=X`` names none of them.

    Runs before Hydra composes, whose own message for this case is a search-path dump.
    """
    available = experiments(conf_dir, entry)
    for arg in argv:
        key, _, value = arg.lstrip("+~").partition("=")
        if key != "experiment" or not value or value == "null":
            continue
        for name in value.split(","):  # a sweep over experiments: experiment=a,b
            if name not in available:
                print(
                    f"config error: experiment={name}: no {entry}.py experiment conf/experiment/{name}.yaml; "
                    f"available: {', '.join(available) or 'none'}",
                    file=sys.stderr,
                )
                sys.exit(2)

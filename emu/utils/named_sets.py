"""Named sets: a prompt set or an image set by a short spec ``<name>:<arguments>`` (``haystack:256``,
``haystack_needles:1024``), resolved by a provider that the config names.

The entry points register ``cfg.sets`` before anything reads a spec::

    sets:
      prompts: {haystack: emu.mini.sets.haystack_prompts}   # name -> "module.function"
      images: {haystack_needles: emu.mini.sets.needle_set}

so the real system reaches a domain's sets (the miniature's: ``sets=mini``, conf/sets/mini.yaml) through its
config and never imports it. A prompt provider is ``fn(spec, key) -> list[str]``; an image provider is
``fn(spec, resolution, key) -> (cache key, loader)``, ``loader()`` giving N x 3 x H x W images in [-1, 1].
``key`` names the config key in errors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from emu.errors import ConfigError

KINDS = ("prompts", "images")
_registered: dict[str, dict[str, str]] = {kind: {} for kind in KINDS}


def register(sets: Mapping[str, Mapping[str, str]] | None) -> None:
    """Make ``sets`` (``{"prompts": {name: "module.function"}, "images": {...}}``, e.g. ``cfg.get("sets")``) the
    named sets of this process; ``None`` registers none."""
    unknown = set(sets or {}) - set(KINDS)
    if unknown:
        raise ConfigError("sets", f"unknown kind(s) {sorted(unknown)}: the kinds are {', '.join(KINDS)}")
    for kind in KINDS:
        _registered[kind] = {str(k): str(v) for k, v in ((sets or {}).get(kind) or {}).items()}


def name_of(spec: Any) -> str | None:
    """The name part of a ``name:arguments`` spec (None for anything else: a path, a number)."""
    name, colon, _ = str(spec).partition(":")
    return name if colon and name.isidentifier() else None


def provider(kind: str, spec: Any) -> Callable | None:
    """The registered provider of ``spec``'s name, or None when its name is not a registered ``kind`` set."""
    path = _registered[kind].get(name_of(spec) or "")
    if path is None:
        return None
    from hydra.utils import get_method

    return get_method(path)


def unknown_set(kind: str, spec: Any, key: str, also: str) -> ConfigError:
    """The error for a ``spec`` that is neither a registered set nor ``also`` (what else the key accepts)."""
    names = ", ".join(f"{n}:..." for n in sorted(_registered[kind])) or "none registered"
    hint = f"; '{name_of(spec)}' is not a registered set (add sets=<group>, e.g. sets=mini)" if name_of(spec) else ""
    return ConfigError(key, f"'{spec}' is neither {also} nor a named {kind} set ({names}){hint}")

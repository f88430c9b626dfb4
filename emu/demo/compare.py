"""Did a refactor move anything the demo measures? Compare two demo folders file by file::

    python -m emu.demo.compare outputs/demo_tiny_before outputs/demo_tiny_after

Numbers in JSON / JSONL / CSV files are compared as numbers (largest absolute difference), tensors in checkpoints and
safetensors exactly (``torch.equal``, else the largest difference), images and other files by their bytes. Wall times,
paths, configs and logs (what a rerun changes by itself) are left out: ``IGNORED_KEYS``, ``IGNORED_FILES``. Prints
one line per file that differs and a summary; exits 1 when something differs beyond ``--tolerance``.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import hashlib
import json
import math
import sys
import tarfile
from pathlib import Path
from typing import Any

# keys whose values a rerun changes by itself (wall times, where it ran) or that describe the command, not its outcome:
# whole names, and any name with "second" in it (seconds, index_seconds, seconds_per_1k, images_per_second_per_rank)
IGNORED_KEYS = frozenset({"time", "wall", "started", "finished", "config", "command", "argv", "date", "host",
                          "duration", "elapsed", "path", "dir", "out", "folder", "source", "cache_dir", "output_dir",
                          "best_model_path", "last_model_path", "dirpath", "cwd"})  # fmt: skip
IGNORED_FILES = ("*.log", "hydra*", "*.yaml", "*.md", "*.lock", "*.seconds", "events.out.*", "*.partial*", "*.tmp")


def _ignored_key(key: str) -> bool:
    k = key.lower()
    return k in IGNORED_KEYS or "second" in k


def diff_values(a: Any, b: Any, where: str = "") -> list[tuple[str, float]]:
    """``(where, |a - b|)`` for every number that differs (``inf`` for a structural difference)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            if _ignored_key(str(k)):
                continue
            if k not in a or k not in b:
                out.append((f"{where}.{k}", math.inf))
            else:
                out += diff_values(a[k], b[k], f"{where}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [(f"{where}[len]", math.inf)]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in diff_values(x, y, f"{where}[{i}]")]
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, int | float) or not isinstance(b, int | float):
        return [] if a == b or (_nan(a) and _nan(b)) else [(where, math.inf)]
    if _nan(a) and _nan(b):
        return []
    return [] if a == b else [(where, abs(float(a) - float(b)))]


def _nan(x: Any) -> bool:
    return isinstance(x, float) and math.isnan(x)


def _number(text: str) -> Any:
    try:
        return float(text)
    except ValueError:
        return text


def _tensors(path: Path, root: str = "") -> dict[str, Any]:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=False)
    out: dict[str, Any] = {}

    def walk(x: Any, where: str) -> None:
        if isinstance(x, torch.Tensor):
            out[where] = x
        elif isinstance(x, dict):
            for k, v in x.items():
                if not _ignored_key(str(k)):
                    k = str(k).replace(root, "<demo>") if root else k
                    walk(v, f"{where}.{k}" if where else str(k))
        elif isinstance(x, list | tuple):
            for i, v in enumerate(x):
                walk(v, f"{where}[{i}]")

    walk(obj, "")
    return out


def diff_tensors(a: Path, b: Path, root_a: str = "", root_b: str = "") -> list[tuple[str, float]]:
    import torch

    ta, tb = _tensors(a, root_a), _tensors(b, root_b)
    out = [(k, math.inf) for k in sorted(set(ta) ^ set(tb))]
    for k in sorted(set(ta) & set(tb)):
        x, y = ta[k], tb[k]
        if x.shape != y.shape or x.dtype != y.dtype:
            out.append((k, math.inf))
        elif not torch.equal(x, y):
            d = (x.double() - y.double()).abs().max() if x.is_floating_point() else torch.tensor(math.inf)
            out.append((k, float(d)))
    return out


def _tar_members(path: Path) -> dict[str, str]:
    with tarfile.open(path) as tar:
        return {m.name: hashlib.sha1(tar.extractfile(m).read()).hexdigest() for m in tar.getmembers() if m.isfile()}


def _text(path: Path, root: str) -> str:
    """The file's text with its demo folder written ``<demo>``: two folders' paths compare equal."""
    text = path.read_text()
    return text.replace(root, "<demo>") if root else text


def diff_file(a: Path, b: Path, root_a: str = "", root_b: str = "") -> list[tuple[str, float]]:
    """The differences between two versions of one demo file (empty: the same); paths under ``root_a`` / ``root_b``
    (the two demo folders) are compared relative to them."""
    suffix = a.suffix.lower()
    if suffix == ".json":
        return diff_values(json.loads(_text(a, root_a)), json.loads(_text(b, root_b)))
    if suffix == ".jsonl":
        rows_a = [json.loads(line) for line in _text(a, root_a).splitlines() if line.strip()]
        rows_b = [json.loads(line) for line in _text(b, root_b).splitlines() if line.strip()]
        return diff_values(rows_a, rows_b)
    if suffix == ".csv":
        ra = [{k: _number(v) for k, v in r.items()} for r in csv.DictReader(_text(a, root_a).splitlines())]
        rb = [{k: _number(v) for k, v in r.items()} for r in csv.DictReader(_text(b, root_b).splitlines())]
        return diff_values(ra, rb)
    if suffix in (".ckpt", ".pt", ".safetensors"):
        return diff_tensors(a, b, root_a, root_b)
    if suffix == ".tar":
        ma, mb = _tar_members(a), _tar_members(b)
        return [(k, math.inf) for k in sorted(set(ma) | set(mb)) if ma.get(k) != mb.get(k)]
    return [] if a.read_bytes() == b.read_bytes() else [("bytes", math.inf)]


def compare(old: Path, new: Path, tolerance: float = 0.0) -> dict[str, Any]:
    """Every file of ``old`` (but the ignored ones) against ``new``: ``{"same", "differ": {file: [(where, diff)]},
    "missing", "extra"}``; a difference at or under ``tolerance`` counts as the same."""

    def ignored(rel: Path) -> bool:
        return any(fnmatch.fnmatch(part, pat) for part in rel.parts for pat in IGNORED_FILES)

    def files(root: Path) -> set[str]:
        return {
            p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and not ignored(p.relative_to(root))
        }

    fa, fb = files(old), files(new)
    out: dict[str, Any] = {"same": 0, "differ": {}, "missing": sorted(fa - fb), "extra": sorted(fb - fa)}
    for rel in sorted(fa & fb):
        diffs = [d for d in diff_file(old / rel, new / rel, str(old), str(new)) if d[1] > tolerance]
        if diffs:
            out["differ"][rel] = diffs
        else:
            out["same"] += 1
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m emu.demo.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path)
    p.add_argument("--tolerance", type=float, default=0.0, help="absolute differences up to this count as equal")
    p.add_argument("--show", type=int, default=5, help="differences shown per file")
    args = p.parse_args(argv)
    result = compare(args.old, args.new, args.tolerance)
    for rel, diffs in result["differ"].items():
        shown = ", ".join(f"{w or '<value>'}: {d:.3g}" for w, d in diffs[: args.show])
        print(f"DIFFERS {rel} ({len(diffs)}): {shown}")
    for rel in result["missing"]:
        print(f"MISSING in {args.new}: {rel}")
    for rel in result["extra"]:
        print(f"EXTRA in {args.new}: {rel}")
    print(f"{result['same']} files the same, {len(result['differ'])} differ, {len(result['missing'])} missing, "
          f"{len(result['extra'])} extra (tolerance {args.tolerance})")  # fmt: skip
    return 1 if result["differ"] or result["missing"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""Draw a training set of N images by seed, for ablations: from a curated set, or from a funnel's corpus.

    python -m emu.curation.subset --folder outputs/demo/curate/curated --n 100 --seed 0 --out DIR
    python -m emu.curation.subset --funnel outputs/demo/curate --n 164 --seed 0 --out DIR \
        experiment=mini/curate paths.demo_dir=outputs/demo
    python -m emu.curation.subset --funnel outputs/demo/curate --kept-by text_overlay --n 164 --seed 0 --out DIR ...

``--folder`` draws from a curated set (``metadata.jsonl`` + images, what ``curate.py`` writes) and links the drawn
images; ``--funnel`` draws from a curation run's ``index.jsonl`` (every image of the corpus), or only from the images
one of its stages kept (``--kept-by``: ``scores/<stage>.jsonl``), and exports them through the data pipeline
curation read them with (``curate.py``'s config and overrides, as :func:`emu.curation.export.export_curated`).
Either way ``<out>/curated/`` is a set ``data=folder`` reads and ``<out>/subset.json`` says what was drawn (and how
many hidden needles it holds, when the source has the labels). The draw depends only on the pool and the seed:
the same seed gives the same images. A finished subset is kept.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from hydra import compose, initialize_config_dir

from emu.curation.export import export_curated
from emu.curation.funnel import Funnel
from emu.errors import ConfigError
from emu.utils.config import check_required
from emu.utils.files import atomic_write_text

CONF = Path(__file__).resolve().parents[2] / "conf"


def draw(pool: list[str], n: int | str, seed: int) -> list[str]:
    """``n`` of ``pool`` (``"all"``: every one) drawn without replacement by ``seed``, in the pool's sorted order."""
    keys = sorted(set(pool))
    if n == "all":
        return keys
    n = int(n)
    if not 0 < n <= len(keys):
        raise ConfigError("--n", f"asks for {n} images of a pool of {len(keys)}: use 1..{len(keys)} or 'all'")
    picks = np.random.default_rng(seed).choice(len(keys), size=n, replace=False)
    return [keys[i] for i in sorted(picks)]


def _rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise ConfigError(str(path), "is missing: run curate.py (make demo) first")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _summary(out: Path, source: dict[str, Any], n: int | str, seed: int, pool: int, rows: list[dict]) -> dict:
    info = {**source, "n": len(rows), "asked": n, "seed": seed, "pool": pool, "folder": str(out / "curated")}
    if rows and all("needle" in r for r in rows):  # hidden labels (the haystack): how good the draw is
        info["needles"] = sum(bool(r["needle"]) for r in rows)
        info["precision"] = round(info["needles"] / len(rows), 4)
    info["keys"] = sorted(r.get("key", r["file_name"]) for r in rows)
    atomic_write_text(out / "subset.json", json.dumps(info, indent=2))
    return info


def subset_folder(folder: str | Path, n: int | str, seed: int, out: str | Path) -> dict[str, Any]:
    """``n`` images of the set in ``folder`` (``metadata.jsonl``), linked into ``<out>/curated/``."""
    folder, out = Path(folder).resolve(), Path(out)
    rows = {r["file_name"]: r for r in _rows(folder / "metadata.jsonl")}
    picked = [rows[f] for f in draw(list(rows), n, seed)]
    dest = out / "curated"
    dest.mkdir(parents=True, exist_ok=True)
    for r in picked:
        link = dest / r["file_name"]
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(os.path.relpath(folder / r["file_name"], link.parent.resolve()))
    atomic_write_text(dest / "metadata.jsonl", "".join(json.dumps(r) + "\n" for r in picked))
    return _summary(out, {"source": str(folder), "kept_by": None}, n, seed, len(rows), picked)


class _ByPiece:
    """Index rows (which carry their ``piece``) served a piece at a time, as the funnel's index is."""

    def __init__(self, rows):
        self.by_piece: dict[int, list[dict[str, Any]]] = {}
        for r in rows:
            self.by_piece.setdefault(r["piece"], []).append(r)

    def rows(self, piece: int) -> list[dict[str, Any]]:
        return self.by_piece.get(piece, [])


def subset_funnel(funnel: str | Path, n: int | str, seed: int, out: str | Path, data, kept_by: str | None = None,
                  progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """``n`` images of a curation run's corpus (``kept_by``: of those its stage kept), read from the DataModule
    ``data`` (the run's own data config) and exported to ``<out>/curated/``."""
    funnel, out = Path(funnel), Path(out)
    index = {r["key"]: r for r in _rows(funnel / "index.jsonl")}
    pool = list(index)
    if kept_by:
        table = funnel / "scores" / f"{kept_by}.jsonl"
        if not table.is_file():
            stages = sorted(p.stem for p in (funnel / "scores").glob("*.jsonl") if ".partial" not in p.name)
            raise ConfigError("--kept-by", f"no finished stage '{kept_by}' in {funnel / 'scores'} (stages: {stages})")
        pool = [r["key"] for r in _rows(table) if r["kept"]]
    keys = draw(pool, n, seed)
    plan = funnel / "funnel.plan.json"  # the pieces the index names are the funnel's
    piece_size = json.loads(plan.read_text())["piece_size"] if plan.is_file() else 1000
    runner = Funnel(data, [], out, progress=progress, piece_size=piece_size)
    runner.index = _ByPiece(index.values())
    wanted: dict[int, list[str]] = {}
    for k in keys:
        wanted.setdefault(index[k]["piece"], []).append(k)
    folder = export_curated(runner.context(), wanted)
    rows = _rows(folder / "metadata.jsonl")
    if len(rows) != len(keys):
        raise ConfigError("data", f"the data source yielded {len(rows)} of the {len(keys)} drawn images: is it the "
                          f"corpus {funnel} was curated from?")  # fmt: skip
    return _summary(out, {"source": str(funnel.resolve()), "kept_by": kept_by}, n, seed, len(pool), rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m emu.curation.subset", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--folder", help="a curated set (metadata.jsonl + images) to draw from")
    src.add_argument("--funnel", help="a curate.py run folder (index.jsonl, scores/) whose corpus to draw from")
    p.add_argument("--kept-by", help="with --funnel: draw only from the images this stage kept")
    p.add_argument("--n", required=True, help="how many images, or 'all'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder: curated/ and subset.json")
    p.add_argument("overrides", nargs="*", help="with --funnel: curate.py overrides for its data (paths.demo_dir=...)")
    args = p.parse_args(argv)
    if args.folder and (args.overrides or args.kept_by):
        p.error("--kept-by and config overrides go with --funnel")
    n = args.n if args.n == "all" else int(args.n)
    source = {"source": str(Path(args.folder or args.funnel).resolve()), "kept_by": args.kept_by}
    done = Path(args.out) / "subset.json"
    if done.is_file():
        info = json.loads(done.read_text())
        if (info["source"], info.get("kept_by"), info["asked"], info["seed"]) == (*source.values(), n, args.seed):
            print(f"[subset] {done} exists ({info['n']} images, seed {info['seed']}): kept")
            return info
        raise SystemExit(f"[subset] {args.out} holds another draw ({done}): delete the folder or use another --out")
    try:
        if args.folder:
            info = subset_folder(args.folder, n, args.seed, args.out)
        else:
            with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
                cfg = compose("curate", overrides=args.overrides)
            check_required(cfg.data)
            data = hydra.utils.instantiate(cfg.data)
            info = subset_funnel(args.funnel, n, args.seed, args.out, data, args.kept_by)
    except ConfigError as e:
        raise SystemExit(f"[subset] {e}") from e
    needles = f", {info['needles']} hidden needles ({100 * info['precision']:.1f}%)" if "needles" in info else ""
    print(f"[subset] {info['n']} of {info['pool']} images (seed {info['seed']}){needles} -> {info['folder']}")
    return info


if __name__ == "__main__":
    main()

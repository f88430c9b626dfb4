"""The curation's human passes as Diffusion-KTO data (``model.objective=kto``): every image people judged, labelled
desirable or not.

A human pass's export folder (``<curate out>/human/<pass>/``: ``candidates.jsonl`` and ``candidates/``, one PNG per key)
and its labels (``labels.jsonl``, one row per annotator and key) say, per image, whether that pass kept it
(:func:`~emu.curation.human.combine`, by the pass's own rule, read from the run's ``.hydra/config.yaml``: the
generalists' ``any``, the specialists' 4 of 5, say; or one rule given for all). An image is **desirable** when every
pass that judged it kept it, **undesirable** when one rejected it: a later pass sees only what the earlier ones kept,
so an image the specialists rejected is undesirable even though the generalists kept it. The output is a folder of
images with a ``metadata.jsonl`` (``file_name``, ``text``, ``label``) that ``data=folder`` reads (the label lands in
each sample's ``meta``), and ``likes.json``: the counts, and the human labels behind them (what a comparison
charges).

    python -m emu.curation.likes outputs/demo/curate --out outputs/likes
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from pathlib import Path

import yaml

from emu.curation.human import COMBINE_RULES, combine, read_labels
from emu.utils.files import atomic_write_text


def pass_decisions(folder: Path, rule: str = "majority", threshold: float = 0.5) -> tuple[dict[str, bool], int]:
    """One human pass's decision per key, and the number of labels it rests on."""
    candidates = [json.loads(line) for line in (folder / "candidates.jsonl").read_text().splitlines() if line.strip()]
    rows, _ = read_labels(folder / "labels.jsonl", {c["key"] for c in candidates})
    return combine(rows, rule, threshold), len(rows)


def pass_rules(curate_out: Path) -> dict[str, tuple[str, float]]:
    """Each human pass's ``(combine, threshold)`` as the ``curate.py`` run in ``curate_out`` was configured (its
    ``.hydra/config.yaml``); empty when the run left no config."""
    config = curate_out / ".hydra" / "config.yaml"
    if not config.is_file():
        return {}
    stages = yaml.safe_load(config.read_text()).get("stages") or {}
    return {name: (s.get("combine", "majority"), float(s.get("threshold", 0.5))) for name, s in stages.items()
            if isinstance(s, dict) and ("annotators" in s or "labels" in s)}  # fmt: skip


def likes(passes: list[Path], rules: dict[str, tuple[str, float]]) -> tuple[dict[str, bool], int]:
    """Per key judged by any of ``passes`` (in funnel order): desirable (kept by every pass that judged it, by that
    pass's rule in ``rules``, default majority) or not; and the labels behind all of them."""
    labels, decision = 0, {}
    for folder in passes:
        kept, n = pass_decisions(folder, *rules.get(folder.name, ("majority", 0.5)))
        labels += n
        for key, keep in kept.items():
            decision[key] = decision.get(key, True) and keep
    return decision, labels


def export_likes(curate_out: str | Path, out: str | Path, rule: str | None = None, threshold: float = 0.5,
                 undesirable_ratio: float | None = None, seed: int = 0) -> dict:  # fmt: skip
    """Write the KTO folder (see the module doc) from a ``curate.py`` output folder's human passes; captions come from
    its ``index.jsonl``. ``rule`` (with ``threshold``): one rule for every pass instead of each pass's own.
    ``undesirable_ratio``: at most that many undesirable images per desirable one, drawn with
    ``seed`` (KTO's paper keeps desirable : undesirable weight within 1 to 4/3); None: all. Returns ``likes.json``."""
    curate_out, out = Path(curate_out), Path(out)
    human = curate_out / "human"
    passes = sorted((p for p in human.iterdir() if (p / "labels.jsonl").is_file()), key=_funnel_order(curate_out))
    if not passes:
        raise FileNotFoundError(f"'{human}' holds no human pass with labels.jsonl: run curate.py's human passes first")
    rules = {p.name: (rule, threshold) for p in passes} if rule else pass_rules(curate_out)
    decision, labels = likes(passes, rules)
    files = {}
    for folder in passes:
        for line in (folder / "candidates.jsonl").read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                files[row["key"]] = folder / "candidates" / row["file"]
    captions = {}
    for line in (curate_out / "index.jsonl").read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if row["key"] in decision:
                captions[row["key"]] = row["caption"]
    good = sorted(k for k, keep in decision.items() if keep)
    bad = sorted(k for k, keep in decision.items() if not keep)
    if undesirable_ratio is not None and len(bad) > undesirable_ratio * len(good):
        bad = sorted(random.Random(seed).sample(bad, int(undesirable_ratio * len(good))))
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for key in good + bad:
        name = f"images/{key}{files[key].suffix}"
        shutil.copy(files[key], out / name)
        rows.append(json.dumps({"file_name": name, "text": captions[key], "label": decision[key], "key": key}))
    atomic_write_text(out / "metadata.jsonl", "\n".join(rows) + "\n")
    summary = {"desirable": len(good), "undesirable": len(bad), "judged": len(decision),
               "undesirable_judged": sum(not k for k in decision.values()), "labels": labels,
               "passes": {p.name: list(rules.get(p.name, ("majority", 0.5))) for p in passes},
               "undesirable_ratio": undesirable_ratio,
               "source": str(curate_out.resolve())}  # fmt: skip
    atomic_write_text(out / "likes.json", json.dumps(summary, indent=1))
    return summary


def _funnel_order(curate_out: Path):
    """Sort key of the human passes in the funnel's order (funnel.json's stages), by name where it is missing."""
    funnel = curate_out / "funnel.json"
    names = [s.get("stage") for s in json.loads(funnel.read_text()).get("stages", [])] if funnel.is_file() else []
    return lambda p: (names.index(p.name) if p.name in names else len(names), p.name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m emu.curation.likes", description=__doc__.split("\n\n")[0])
    p.add_argument("curate_out", type=Path, help="a curate.py output folder (with human/<pass>/labels.jsonl)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rule", choices=COMBINE_RULES, default=None, help="how every pass's labels decide a key "
                   "(default: each pass's own rule, from the run's .hydra/config.yaml)")  # fmt: skip
    p.add_argument("--threshold", type=float, default=0.5, help="with --rule mean")
    p.add_argument("--undesirable-ratio", type=float, default=None, help="at most this many undesirable per desirable")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        s = export_likes(args.curate_out, args.out, args.rule, args.threshold, args.undesirable_ratio, args.seed)
    except (FileNotFoundError, KeyError) as e:
        print(f"likes error: {e}", file=sys.stderr)
        return 2
    print(f"{s['desirable']} desirable and {s['undesirable']} undesirable images ({s['labels']} human labels) in "
          f"{args.out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m emu.annotate``: make a task, serve it to raters in a browser, read the results.

    python -m emu.annotate curation-task outputs/demo/curate/human/generalist     # a human pass's export folder
    python -m emu.annotate ab-task SAMPLES_A SAMPLES_B outputs/ab_appeal --question appeal --raters-per-pair 5
    python -m emu.annotate serve outputs/ab_appeal                  # http://127.0.0.1:8765 (this machine only)
    python -m emu.annotate serve outputs/ab_appeal --host 0.0.0.0   # a shared server: a token is made and required
    python -m emu.annotate results outputs/ab_appeal                # win / tie / loss, agreement, per-rater stats
    python -m emu.annotate pair-task SAMPLES outputs/pairs_task     # which of a prompt's two images (sample.py n=2)?
    python -m emu.annotate export-pairs outputs/pairs_task outputs/pairs --budget 1000   # confident pairs: DPO's data

Curation labels land in ``<task>/labels.jsonl`` (``curate.py stages.<stage>.labels=<task>/labels.jsonl``), votes in
``<task>/votes.jsonl`` (``eval.py human_votes=<task>``); a pair task's votes become Diffusion-DPO's pairs
(``data=pairs data.source.root=<pairs>``; the rules: :mod:`emu.annotate.pairs`).
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from pathlib import Path

from emu.annotate.pairs import export_pairs
from emu.annotate.tasks import load_task, make_ab_task, make_curation_task, make_pair_task
from emu.evaluation.human_votes import QUESTIONS, read_votes
from emu.evaluation.human_votes import human_results as vote_results
from emu.utils.files import atomic_write_text

LOCAL = ("127.0.0.1", "localhost", "::1")


def serve(task: Path, host: str, port: int, token: str | None) -> None:
    import uvicorn

    from emu.annotate.app import create_app

    if host not in LOCAL and not token:
        token = secrets.token_urlsafe(16)
        print("listening beyond this machine: every request needs the token below (no anonymous writes)")
    url = f"http://{host if host not in ('0.0.0.0', '::') else '<this-host>'}:{port}/"
    print(f"serving {task} at {url}" + (f"?token={token}" if token else ""))
    uvicorn.run(create_app(task, token), host=host, port=port, log_level="warning")


def results(task_dir: Path) -> dict:
    task = load_task(task_dir)
    path = task_dir / task["answers"]
    if task["kind"] != "ab":
        from emu.curation.human import read_labels

        rows, problems = read_labels(path, {it["key"] for it in task["items"]})
        keeps = {}
        for r in rows:
            keeps.setdefault(r["annotator"], []).append(r["keep"])
        raters = {a: {"labels": len(k), "keep_rate": sum(k) / len(k)} for a, k in sorted(keeps.items())}
        out = {"labels": len(rows), "problems": problems, "raters": raters}
    else:
        votes, problems = read_votes(path)
        out = {"names": task["names"], "problems": problems, **vote_results(votes)}
    print(json.dumps(out, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emu.annotate", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("curation-task", help="a human pass's export folder (curate.py) as a task, in place")
    c.add_argument("export", type=Path)
    c.add_argument("--raters-per-item", type=int, default=None, help="default: every rater grades every candidate")
    ab = sub.add_parser("ab-task", help="a pairwise task from two sample folders of the same prompts and seeds")
    ab.add_argument("a", type=Path)
    ab.add_argument("b", type=Path)
    ab.add_argument("out", type=Path)
    ab.add_argument("--question", choices=QUESTIONS, default="appeal")
    ab.add_argument("--raters-per-pair", type=int, default=None, help="default: 5 for appeal, 3 for faithfulness")
    ab.add_argument("--name-a", default="a")
    ab.add_argument("--name-b", default="b")
    ab.add_argument("--repeat-checks", type=int, default=2)
    ab.add_argument("--broken-checks", type=int, default=2)
    pt = sub.add_parser("pair-task", help="which of a prompt's two images (one sample folder, sample.py n=2)")
    pt.add_argument("samples", type=Path)
    pt.add_argument("out", type=Path)
    pt.add_argument("--raters-per-pair", type=int, default=3)
    pt.add_argument("--repeat-checks", type=int, default=2)
    pt.add_argument("--broken-checks", type=int, default=2)
    ep = sub.add_parser("export-pairs", help="a pair task's confident pairs as Pick-a-Pic-layout DPO data")
    ep.add_argument("task", type=Path)
    ep.add_argument("out", type=Path)
    ep.add_argument("--budget", type=int, default=None, help="only the first pairs whose votes sum to at most this")
    ep.add_argument("--min-agreement", type=float, default=2 / 3, help="the winner's share of a pair's votes")
    ep.add_argument("--min-votes", type=int, default=1)
    ep.add_argument("--max-failed-checks", type=int, default=1, help="raters failing more checks are left out")
    s = sub.add_parser("serve", help="serve a task to raters")
    s.add_argument("task", type=Path)
    s.add_argument("--host", default="127.0.0.1", help="default: this machine only")
    s.add_argument("--port", type=int, default=8765)
    s.add_argument("--token", default=None, help="required on every request (made up when --host is not local)")
    r = sub.add_parser("results", help="what the raters said")
    r.add_argument("task", type=Path)
    r.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    try:
        if args.command == "curation-task":
            print(f"task ready in {make_curation_task(args.export, args.raters_per_item)}")
        elif args.command == "ab-task":
            per = args.raters_per_pair or (5 if args.question == "appeal" else 3)  # the paper's rater counts
            out = make_ab_task(args.a, args.b, args.out, args.question, per, args.name_a, args.name_b,
                               args.repeat_checks, args.broken_checks)  # fmt: skip
            print(f"task ready in {out}")
        elif args.command == "pair-task":
            out = make_pair_task(args.samples, args.out, "appeal", args.raters_per_pair, args.repeat_checks,
                                 args.broken_checks)  # fmt: skip
            print(f"task ready in {out}")
        elif args.command == "export-pairs":
            acc = export_pairs(args.task, args.out, args.budget, args.min_agreement, args.min_votes,
                               args.max_failed_checks)  # fmt: skip
            print(f"{acc['confident']} confident pairs from {acc['votes']} votes on {acc['pairs_voted']} pairs "
                  f"({acc['ties']} ties, {acc['unconfident']} unconfident) in {args.out}")  # fmt: skip
        elif args.command == "serve":
            serve(args.task, args.host, args.port, args.token)
        else:
            out = results(args.task)
            if args.out:
                atomic_write_text(args.out, json.dumps(out, indent=2))
    except (FileNotFoundError, ValueError) as e:
        print(f"annotate error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``make demo``: run the miniature end to end through the real entry points, then write ``REPORT.md``.

    python -m emu.demo                       # the default scale (conf/demo/mini.yaml) into outputs/demo/
    python -m emu.demo --scale tiny --out /tmp/demo_tiny      # seconds-per-stage smoke run (the test uses it)
    python -m emu.demo --force               # rerun every stage
    python -m emu.demo --only stage2 eval    # rerun these stages (e.g. after changing their configs)
    python -m emu.demo --only-report         # rewrite REPORT.md from what is there
    python -m emu.demo --ablations           # then the paper's ablations on top of it (emu/demo/ablations.py)
    python -m emu.demo --generality          # or quality-tuning other architectures on top of it (generality.py)
    python -m emu.demo --preference          # or DPO / KTO from people's judgments beside it (preference.py)

A step whose output exists and which finished (``demo_state.json`` records it) is skipped, so an interrupted demo
resumes where it stopped; an interrupted training run resumes from its ``last.ckpt``. Each stage prints its wall
time, which the report shows.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from omegaconf import OmegaConf

from emu.demo.ablation_report import write_ablations
from emu.demo.ablations import demo_facts, plan
from emu.demo.generality import plan as generality_plan
from emu.demo.generality_report import write_generality
from emu.demo.preference import plan as preference_plan
from emu.demo.preference_report import write_preference
from emu.demo.report import write_report
from emu.demo.schedule import Job, available_cores, check_needs, run_scheduled, step_log
from emu.demo.stages import Stage, Step, command, demo_stages
from emu.utils.files import atomic_write_text

ROOT = Path(__file__).resolve().parents[2]
SCALES = ROOT / "conf" / "demo"


def load_scale(name_or_path: str) -> dict[str, Any]:
    path = Path(name_or_path)
    if not path.suffix:
        path = SCALES / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SCALES.glob("*.yaml")))
        raise SystemExit(f"[demo] no scale '{name_or_path}': use one of {known} (conf/demo/) or a YAML file path")
    scale = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    scale["name"], scale["file"] = path.stem, str(path)
    return scale


class State:
    """``demo_state.json``: which steps finished, when, how long each stage took, and with which scale."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
        self.data.setdefault("steps", {})
        self.data.setdefault("stages", {})

    def finished(self, step: Step, out: Path) -> bool:
        return step.name in self.data["steps"] and (out / step.done).exists()

    def record_step(self, step: Step, seconds: float, threads: list[int] | None = None,
                    alongside: list[str] | None = None) -> None:  # fmt: skip
        """``step`` finished after ``seconds``, with these thread counts, beside these other steps."""
        info: dict[str, Any] = {"seconds": round(seconds, 1), "finished": _now()}
        if threads:
            info["threads"] = threads
        if alongside:
            info["alongside"] = alongside
        self.data["steps"][step.name] = info
        self.save()

    def record_stage(self, stage: Stage) -> float:
        """A stage's time: the sum of its steps' last complete runs (a resumed run counts from its restart)."""
        seconds = sum(self.data["steps"].get(s.name, {}).get("seconds", 0.0) for s in stage.steps)
        self.data["stages"][stage.name] = {"title": stage.title, "seconds": round(seconds, 1)}
        self.save()
        return seconds

    def forget(self, stage: Stage, out: Path) -> None:
        """Start ``stage`` over: its steps are unfinished and their run and output folders gone (``--only``)."""
        for step in stage.steps:
            self.data["steps"].pop(step.name, None)
            for folder in {step.run_dir, step.outputs} - {None}:
                shutil.rmtree(out / folder, ignore_errors=True)
        self.save()

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data, indent=2))


def default_jobs(scale: dict[str, Any]) -> int:
    """The scale's ``jobs``, else two steps side by side where there are two cores or more: on the miniature's small
    networks two 1-thread jobs do 1.4x the work of one 2-thread job (:mod:`emu.demo.schedule`)."""
    if scale.get("jobs") is not None:
        return max(1, int(scale["jobs"]))
    return 2 if available_cores() >= 2 else 1


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_step(step: Step, argv: list[str], log_path: Path, env: dict[str, str] | None = None,
             echo: bool = True) -> None:  # fmt: skip
    """Run ``argv``, its output appended to ``log_path`` (and, with ``echo``, passed to the console as it comes);
    ``env`` adds to the environment. A failure raises SystemExit naming the log."""
    if echo:
        print(f"\n[demo] {step.name}: {shlex.join(argv)}", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a") as log:
        log.write(f"\n$ {shlex.join(argv)}\n")
        log.flush()
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        assert proc.stdout is not None
        for chunk in iter(lambda: proc.stdout.read1(4096), b""):  # progress bars (\r) pass through unbuffered
            if echo:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
            log.write(chunk.decode(errors="replace"))
            log.flush()
        code = proc.wait()
    if code != 0:
        raise SystemExit(
            f"[demo] step '{step.name}' failed (exit {code}); its output is in {log_path}. Fix the cause "
            "and run the demo again: finished steps are skipped, training resumes from last.ckpt."
        )


def _needed(todo: list[Step], steps: list[Step]) -> list[Step]:
    """``todo`` without the intermediate steps whose every consumer (a step naming it in its ``needs``) has finished,
    e.g. stage 1's latents in a demo folder whose stage 1 finished before the demo precomputed them."""
    names = {s.name for s in todo}
    keep = []
    for step in todo:
        consumers = [s.name for s in steps if step.name in (s.needs or ())]
        if step.intermediate and consumers and not names & set(consumers):
            print(f"[demo] {step.name}: not needed ({', '.join(consumers)} finished) - skipped", flush=True)
            continue
        keep.append(step)
    return keep


def run_stages(out: Path, scale: dict[str, Any], stages: list[Stage], state: State, log: Path,
               only: list[str] | None = None, jobs: int = 1) -> None:  # fmt: skip
    """Run ``stages`` into the demo folder ``out``: finished steps are skipped, an interrupted training run resumes
    from its ``last.ckpt``, ``only`` reruns just those stages from scratch; ``state`` records each step. Up to ``jobs``
    steps run at once as their ``needs`` allow, sharing the cores (:mod:`emu.demo.schedule`); each step's output goes
    to ``<log folder>/logs/<step>.log`` and, once it ends, to ``log``."""
    t_all = time.perf_counter()
    check_needs([s for stage in stages for s in stage.steps])
    logs = log.parent / "logs"
    appending = threading.Lock()
    todo: list[Step] = []
    for stage in stages:
        if only and stage.name not in only:
            continue
        if only:
            state.forget(stage, out)
        steps = [s for s in stage.steps if not state.finished(s, out)]
        if not steps:
            done = state.data["stages"].get(stage.name, {}).get("seconds", 0)
            print(f"[demo] {stage.name}: done earlier ({done:.0f}s) - skipped", flush=True)
        todo += steps
    todo = _needed(todo, [s for stage in stages for s in stage.steps])
    stage_of = {s.name: stage for stage in stages for s in stage.steps}
    left = {stage.name: sum(s in todo for s in stage.steps) for stage in stages}
    run = {"started": _now(), "seconds": 0.0, "jobs": jobs, "steps": []}  # this invocation, if it runs anything
    if todo:
        state.data.setdefault("runs", []).append(run)

    def start(step: Step, env: dict[str, str], echo: bool) -> None:
        resume = step.resumable and (out / (step.run_dir or "") / "checkpoints" / "last.ckpt").is_file()
        argv = command(step, out, scale, resume)
        if echo:
            run_step(step, argv, log, env, echo=True)
            return
        own = step_log(logs, step)
        own.unlink(missing_ok=True)  # this run's output only (demo.log keeps every run's)
        print(f"[demo] {step.name} started ({env.get('OMP_NUM_THREADS')} threads; output: {own})", flush=True)
        try:
            run_step(step, argv, own, env, echo=False)
        finally:
            with appending, log.open("a") as whole, own.open() as part:  # the whole record, a step at a time
                shutil.copyfileobj(part, whole)

    def finished(job: Job) -> None:
        run["seconds"] = round(time.perf_counter() - t_all, 1)
        run["steps"].append(job.step.name)
        threads = job.threads_seen if jobs > 1 else None  # jobs=1: the machine's default threads
        state.record_step(job.step, job.seconds, threads=threads, alongside=sorted(job.alongside))
        stage = stage_of[job.step.name]
        left[stage.name] -= 1
        if not left[stage.name]:
            seconds = state.record_stage(stage)
            print(f"[demo] {stage.name} ({stage.title}): {seconds:.0f}s", flush=True)
        elif jobs > 1:
            print(f"[demo] {job.step.name} finished: {job.seconds:.0f}s", flush=True)

    own_log = (lambda step: step_log(logs, step)) if jobs > 1 else (lambda step: None)
    run_scheduled(todo, start, finished, jobs=jobs, cores=available_cores(), logs=logs, log_of=own_log)
    state.data["finished"] = _now()
    state.data["last_run_seconds"] = run["seconds"] = round(time.perf_counter() - t_all, 1)
    state.save()


def run(out: Path, scale: dict[str, Any], force: bool = False, only: list[str] | None = None, jobs: int = 1) -> Path:
    out = out.resolve()
    if force and out.exists():
        for child in out.iterdir():  # keep the folder (and a log someone is tailing), drop every stage's outputs
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    state = State(out / "demo_state.json")
    if state.data.get("scale") not in (None, scale["name"]):
        raise SystemExit(
            f"[demo] {out} holds a '{state.data['scale']}' demo; this is '{scale['name']}'. Use another "
            "--out, or --force to start over."
        )
    state.data["scale"] = scale["name"]
    state.data.setdefault("started", _now())
    state.save()
    stages = demo_stages(scale)
    unknown = set(only or []) - {s.name for s in stages}
    if unknown:
        raise SystemExit(f"[demo] unknown stage(s) {sorted(unknown)}; stages: {[s.name for s in stages]}")
    run_stages(out, scale, stages, state, out / "demo.log", only, jobs)
    report = write_report(out, scale, state.data, stages)
    print("\n" + report.read_text())
    print(f"[demo] report: {report}")
    return report


def _on_top_of_demo(out: Path, scale: dict[str, Any], name: str, state_file: str, force: bool, report_only: bool):
    """What ``--ablations`` and ``--generality`` share before they run: the finished demo in ``out`` at this scale
    (:func:`~emu.demo.ablations.demo_facts`, a clear error otherwise), their folder ``<out>/<name>/`` (emptied by
    ``force``) and its state. Returns ``(out, the demo's state, the demo's facts, the folder, its state)``."""
    out = out.resolve()
    demo = State(out / "demo_state.json")
    if demo.data.get("scale") not in (None, scale["name"]):
        raise SystemExit(f"[{name}] {out} holds a '{demo.data['scale']}' demo; this is '{scale['name']}': use "
                         f"--scale {demo.data['scale']}")  # fmt: skip
    facts = demo_facts(out, name)
    folder = out / name
    if force and not report_only and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return out, demo, facts, folder, State(folder / state_file)


def _run_parts(out: Path, scale: dict[str, Any], name: str, folder: Path, state: State, parts: list, jobs: int,
               noun: str) -> None:  # fmt: skip
    """Run the stages of ``parts`` (ablation arms, architectures: each ``.name`` and ``.stage``, None for the demo's
    own) into ``out``, skipping and resuming as the demo does; the log is ``<folder>/<name>.log``."""
    state.data["scale"] = scale["name"]
    state.data.setdefault("started", _now())
    state.save()
    print(f"[{name}] {len(parts) - 1} {noun} on top of {out}: " + ", ".join(p.name for p in parts[1:]), flush=True)
    run_stages(out, scale, [p.stage for p in parts if p.stage], state, folder / f"{name}.log", jobs=jobs)


def _finish(out: Path, scale: dict[str, Any], name: str, report: Path, demo: State) -> Path:
    """``REPORT.md`` again (it links the extension's report and shows its targets), and the report printed."""
    write_report(out, scale, demo.data, demo_stages(scale))
    print("\n" + report.read_text())
    print(f"[{name}] report: {report}")
    return report


def run_ablations(out: Path, scale: dict[str, Any], force: bool = False, report_only: bool = False,
                  jobs: int = 1) -> Path:  # fmt: skip
    """``--ablations``: the arms of :mod:`emu.demo.ablations` on top of the finished demo in ``out`` (into
    ``<out>/ablations/``, skip / resume as the demo), then ``ABLATIONS.md`` and ``REPORT.md`` again (``report_only``:
    just the reports, from what is there)."""
    out, demo, facts, folder, state = _on_top_of_demo(out, scale, "ablations", "ablation_state.json", force,
                                                      report_only)  # fmt: skip
    arms = plan(scale, facts)
    if not report_only:
        _run_parts(out, scale, "ablations", folder, state, arms, jobs, "arms")
    return _finish(out, scale, "ablations", write_ablations(out, scale, arms, state.data, demo.data), demo)


def run_generality(out: Path, scale: dict[str, Any], force: bool = False, report_only: bool = False,
                   jobs: int = 1) -> Path:  # fmt: skip
    """``--generality``: the architectures of :mod:`emu.demo.generality` on top of the finished demo in ``out`` (into
    ``<out>/generality/``, skip / resume as the demo), then ``GENERALITY.md`` and ``REPORT.md`` again
    (``report_only``: just the reports, from what is there)."""
    out, demo, _, folder, state = _on_top_of_demo(out, scale, "generality", "generality_state.json", force,
                                                  report_only)  # fmt: skip
    rows = generality_plan(scale, out)
    if not report_only:
        _run_parts(out, scale, "generality", folder, state, rows, jobs, "architectures")
    return _finish(out, scale, "generality", write_generality(out, scale, rows, state.data, demo.data), demo)


def run_preference(out: Path, scale: dict[str, Any], force: bool = False, report_only: bool = False,
                   jobs: int = 1) -> Path:  # fmt: skip
    """``--preference``: the data and arms of :mod:`emu.demo.preference` on top of the finished demo in ``out`` (into
    ``<out>/preference/``, skip / resume as the demo), then ``PREFERENCE.md`` and ``REPORT.md`` again
    (``report_only``: just the reports, from what is there)."""
    out, demo, facts, folder, state = _on_top_of_demo(out, scale, "preference", "preference_state.json", force,
                                                      report_only)  # fmt: skip
    data, arms = preference_plan(scale, int(facts["curated"]))
    if not report_only:
        parts = [arms[0], SimpleNamespace(name="data", stage=data), *arms[1:]]
        _run_parts(out, scale, "preference", folder, state, parts, jobs, "parts (the data, then the arms)")
    report = write_preference(out, scale, arms, state.data, demo.data, int(facts["curated"]))
    return _finish(out, scale, "preference", report, demo)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m emu.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "outputs" / "demo"), help="the demo folder (default outputs/demo)")
    p.add_argument("--scale", default="mini", help="conf/demo/<scale>.yaml (mini, tiny, gpu) or a YAML path")
    p.add_argument("--force", action="store_true", help="delete the demo folder's outputs and rerun every stage")
    p.add_argument("--only", nargs="+", help="(re)run just these stages, finished or not (their inputs must exist)")
    p.add_argument(
        "--only-report",
        action="store_true",
        help="rewrite REPORT.md (and ABLATIONS.md with --ablations, GENERALITY.md with --generality) from the outputs "
        "there",
    )
    p.add_argument(
        "--ablations",
        action="store_true",
        help="run the ablations on top of the finished demo in --out "
        "(into <out>/ablations/, then ABLATIONS.md); with --force, only the ablations start over",
    )
    p.add_argument(
        "--generality",
        action="store_true",
        help="quality-tune other architectures (a DiT trained by rectified flow, a pixel-space U-Net, a masked "
        "transformer) on top of the finished demo in --out (into <out>/generality/, then GENERALITY.md); with --force, "
        "only they start over",
    )
    p.add_argument(
        "--preference",
        action="store_true",
        help="Diffusion-DPO from votes in the annotation app and KTO from the curation's labels, beside quality-"
        "tuning, "
        "on top of the finished demo in --out (into <out>/preference/, then PREFERENCE.md); with --force, only they "
        "start over",
    )
    p.add_argument("--jobs", type=int, help="steps run side by side when their inputs allow, sharing the cores "
                   "(default: the scale's jobs, else 2 on 2 or more cores; 1: one by one, as listed)")  # fmt: skip
    args = p.parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        p.error(f"--jobs is at least 1, got {args.jobs}")
    scale = load_scale(args.scale)
    args.jobs = args.jobs or default_jobs(scale)
    out = Path(args.out)
    if sum((args.ablations, args.generality, args.preference)) > 1:
        p.error("--ablations, --generality and --preference run one at a time")
    if args.preference:
        if args.only:
            p.error("--preference runs on its own: finish the demo first, then run --preference")
        run_preference(out, scale, force=args.force, report_only=args.only_report, jobs=args.jobs)
        return
    if args.generality:
        if args.only:
            p.error("--generality runs on its own: finish the demo first, then run --generality")
        run_generality(out, scale, force=args.force, report_only=args.only_report, jobs=args.jobs)
        return
    if args.ablations:
        if args.only:
            p.error("--ablations runs on its own: finish the demo first, then run --ablations")
        run_ablations(out, scale, force=args.force, report_only=args.only_report, jobs=args.jobs)
        return
    if args.only_report:
        state = State(out / "demo_state.json")
        print(write_report(out.resolve(), scale, state.data, demo_stages(scale)).read_text())
        return
    run(out, scale, force=args.force, only=args.only, jobs=args.jobs)


if __name__ == "__main__":
    main()

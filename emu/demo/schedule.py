"""Run steps as their dependencies allow, a few at a time, sharing the machine's cores among them.

A step starts once the steps it ``needs`` (:class:`~emu.demo.stages.Step`) have finished, while fewer than ``jobs``
run; of the steps ready, the one with the longest chain of steps waiting on it goes first (then the one listed first),
so that the chain to the end is not held up by side work (:func:`chain_lengths`). Threads beyond the cores cost far
more than they give (on 2 cores a 2-thread U-Net step beside a 1-thread job is 3x slower than alone), while two
1-thread jobs side by side each run at full single-thread speed (1.4x the work of one 2-thread job on the miniature's
U-Net). So the compute threads are shared out, never more than the cores:

* a step that follows a thread budget (a ``train.py`` run: :mod:`emu.training.threads`) gets its share of the cores
  now and a new share whenever another step starts or ends: all of them while it runs alone;
* any other step keeps the threads it started with (``OMP_NUM_THREADS``), and a step starts only when every running
  one can keep at least one thread.

With ``jobs=1`` the steps run one by one in their order, with the machine's default threads, as they always did.

Not counted: processes a step starts besides its own threads (a training run's data-loader worker, ``curate.py``'s
two, the haystack's renderers); they decode and render in bursts, beside the compute threads.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from emu.demo.stages import Step
from emu.training.threads import ENV, write_budget

HEARTBEAT_SECONDS = 60.0


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, else the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def thread_shares(cores: int, fixed: int, followers: int) -> list[int]:
    """Threads of each of ``followers`` jobs that follow a budget when the other jobs hold ``fixed`` threads: the
    cores left, split as evenly as can be (the first ones get the remainder), at least 1 each."""
    if followers <= 0:
        return []
    base, extra = divmod(max(cores - fixed, followers), followers)
    return [base + (i < extra) for i in range(followers)]


def check_needs(steps: list[Step]) -> None:
    """Every ``needs`` names a step of ``steps``, and no step waits on itself through them (ValueError)."""
    names = [s.name for s in steps]
    if len(set(names)) != len(names):
        raise ValueError(f"step names repeat: {sorted(n for n in set(names) if names.count(n) > 1)}")
    after = {s.name: set(needs_of(s, steps)) for s in steps}
    unknown = {n: sorted(a - set(names)) for n, a in after.items() if a - set(names)}
    if unknown:
        raise ValueError(f"steps need steps that do not exist: {unknown}")
    state: dict[str, int] = {}  # 1: being visited, 2: done

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            raise ValueError(f"steps wait on each other: {' -> '.join([*path, name])}")
        state[name] = 1
        for n in sorted(after[name]):
            visit(n, [*path, name])
        state[name] = 2

    for name in names:
        visit(name, [])


def needs_of(step: Step, steps: list[Step]) -> list[str]:
    """What ``step`` waits for among ``steps``: its ``needs``, or (None) every step listed before it."""
    if step.needs is not None:
        return list(step.needs)
    return [s.name for s in steps[: next(i for i, s in enumerate(steps) if s is step)]]


def chain_lengths(steps: list[Step]) -> dict[str, int]:
    """Per step, the number of steps in the longest chain that waits on it (0: nothing needs it)."""
    waiting: dict[str, list[str]] = {s.name: [] for s in steps}
    for s in steps:
        for n in needs_of(s, steps):
            if n in waiting:
                waiting[n].append(s.name)
    lengths: dict[str, int] = {}

    def length(name: str) -> int:
        if name not in lengths:
            lengths[name] = max((1 + length(w) for w in waiting[name]), default=0)
        return lengths[name]

    return {s.name: length(s.name) for s in steps}


@dataclass
class Job:
    """A running step."""

    step: Step
    threads: int
    follows: bool  # follows its budget file (else keeps ``threads`` to the end)
    budget: Path | None
    log: Path | None
    started: float = field(default_factory=time.perf_counter)
    future: Future | None = None
    seconds: float = 0.0
    threads_seen: list[int] = field(default_factory=list)
    alongside: set[str] = field(default_factory=set)

    def set_threads(self, n: int) -> None:
        if n != self.threads or not self.threads_seen:
            self.threads = n
            if self.budget is not None:
                write_budget(self.budget, n)
        if n not in self.threads_seen:
            self.threads_seen.append(n)


def _last_line(log: Path | None, limit: int = 100) -> str:
    """The last non-empty line or progress-bar update of a log, shortened."""
    if log is None or not log.is_file():
        return ""
    with log.open("rb") as f:
        f.seek(max(0, log.stat().st_size - 4096))
        tail = f.read().decode(errors="replace")
    parts = [p.strip() for p in tail.replace("\r", "\n").split("\n") if p.strip()]
    return parts[-1][:limit] if parts else ""


def run_scheduled(steps: list[Step], start: Callable[[Step, dict[str, str], bool], None],
                  finished: Callable[[Job], None], *, jobs: int, cores: int, logs: Path,
                  log_of: Callable[[Step], Path | None] = lambda step: None,
                  heartbeat: float = HEARTBEAT_SECONDS) -> None:  # fmt: skip
    """Run ``steps``: ``start(step, env, echo)`` runs one to its end (in a worker thread; raising on failure) with
    ``env`` added to its environment; ``finished(job)`` is called, in this thread, after each success. Budget files go
    to ``logs``; ``log_of(step)`` is the step's own log, whose last line a status line shows every ``heartbeat``
    seconds. After a failure no new step starts; the running ones finish, then the failure is raised. A need outside
    ``steps`` is taken as met (finished earlier: :func:`check_needs` checks the whole plan)."""
    jobs = max(1, int(jobs))
    names = {s.name for s in steps}
    waits = {s.name: set(needs_of(s, steps)) & names for s in steps}
    pending, running, done = list(steps), [], set()
    if jobs > 1:  # the longest chain first; one at a time, the listed order
        chain = chain_lengths(steps)
        pending.sort(key=lambda s: -chain[s.name])  # stable: the listed order among equals
    failures: list[BaseException] = []

    def has_room() -> bool:
        held = sum(j.threads if not j.follows else 1 for j in running)
        return len(running) < jobs and (not running or cores - held >= 1)

    def share_out(new: Job | None = None) -> None:
        followers = [j for j in running if j.follows] + ([new] if new is not None and new.follows else [])
        fixed = sum(j.threads for j in running if not j.follows)
        if new is not None and not new.follows:  # a new fixed job takes an equal share, then keeps it
            new.set_threads(thread_shares(cores, fixed, len(followers) + 1)[-1])
            fixed += new.threads
        for job, n in zip(followers, thread_shares(cores, fixed, len(followers)), strict=True):
            job.set_threads(n)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while True:
            while not failures and has_room():
                step = next((s for s in pending if waits[s.name] <= done), None)
                if step is None:
                    break
                pending.remove(step)
                follows = jobs > 1 and step.follows_threads
                budget = logs / f"{_file_name(step.name)}.threads" if follows else None
                job = Job(step, 0, follows, budget, log_of(step))
                share_out(job)
                for other in running:
                    other.alongside.add(step.name)
                    job.alongside.add(other.step.name)
                env = {} if jobs == 1 else {k: str(job.threads) for k in THREAD_VARS}
                if budget is not None:
                    env[ENV] = str(budget)
                job.started = time.perf_counter()
                job.future = pool.submit(start, step, env, jobs == 1)
                running.append(job)
            if not running:
                break
            timeout = heartbeat if jobs > 1 else None  # one at a time, the step's own output is on the console
            ended, _ = wait([j.future for j in running], timeout=timeout, return_when=FIRST_COMPLETED)
            if not ended:
                now = time.perf_counter()
                print("[demo] running: " + "; ".join(
                    f"{j.step.name} ({j.threads} thr, {(now - j.started) / 60:.1f} min) {_last_line(j.log)}"
                    for j in running), flush=True)  # fmt: skip
                continue
            for job in [j for j in running if j.future in ended]:
                running.remove(job)
                job.seconds = time.perf_counter() - job.started
                error = job.future.exception()
                if error is None:
                    done.add(job.step.name)
                    finished(job)
                    continue
                failures.append(error)
                if running:  # say so now: the others may run for a long while yet
                    print(f"{error}\n[demo] no new step starts; waiting for {', '.join(j.step.name for j in running)} "
                          "to finish", flush=True)  # fmt: skip
            share_out()
    if failures:
        if len(failures) > 1:
            print("[demo] more than one step failed:\n" + "\n".join(map(str, failures)), flush=True)
        raise failures[0]
    if pending:
        raise SystemExit(f"[demo] steps left that could not start: {[s.name for s in pending]}")


THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _file_name(step_name: str) -> str:
    return step_name.replace("/", "-")


def step_log(logs: Path, step: Step) -> Path:
    """``<logs>/<step>.log``: a step's own output when steps run side by side."""
    return logs / f"{_file_name(step.name)}.log"

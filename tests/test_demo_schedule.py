"""Steps side by side (emu/demo/schedule.py): needs, jobs and cores respected, thread budgets shared out and followed,
failures, and the demo's own needs checked against what each step's config reads."""

from __future__ import annotations

import re
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from emu.demo import driver
from emu.demo.schedule import chain_lengths, check_needs, needs_of, run_scheduled, thread_shares
from emu.demo.stages import Stage, Step, command, demo_stages
from emu.training.threads import ENV, FollowThreadBudget, ThreadBudget, write_budget
from tests.conftest import ENTRY_CONFIGS

ROOT = Path(__file__).resolve().parents[1]


def _step(name: str, needs=None, follows: bool = False) -> Step:
    return Step(name, ["true"], f"{name}.done", hydra=False, needs=needs, follows_threads=follows)


def test_thread_shares():
    assert thread_shares(2, 0, 1) == [2]
    assert thread_shares(2, 0, 2) == [1, 1]
    assert thread_shares(3, 0, 2) == [2, 1]  # the first ones get the remainder
    assert thread_shares(2, 2, 1) == [1]  # never below one thread
    assert thread_shares(8, 1, 3) == [3, 2, 2]
    assert thread_shares(4, 0, 0) == []


def test_check_needs_refuses_unknown_steps_and_cycles():
    check_needs([_step("a", ()), _step("b", ("a",)), _step("c")])
    with pytest.raises(ValueError, match="do not exist"):
        check_needs([_step("a", ("nope",))])
    with pytest.raises(ValueError, match="wait on each other: a -> b -> a"):
        check_needs([_step("a", ("b",)), _step("b", ("a",))])
    with pytest.raises(ValueError, match="repeat"):
        check_needs([_step("a", ()), _step("a", ())])
    steps = [_step("a", ()), _step("b", ()), _step("c")]
    assert needs_of(steps[2], steps) == ["a", "b"]  # no needs given: after everything listed before it


class Recorder:
    """A ``start`` that records when each step ran, with which environment, and how many ran at once."""

    def __init__(self, hooks=None):
        self.lock = threading.Lock()
        self.spans: dict[str, tuple[float, float]] = {}
        self.env: dict[str, dict[str, str]] = {}
        self.now = self.most = 0
        self.hooks = hooks or {}

    def __call__(self, step: Step, env: dict[str, str], echo: bool) -> None:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
            self.env[step.name] = dict(env)
        t0 = time.perf_counter()
        try:
            self.hooks.get(step.name, lambda env: time.sleep(0.05))(env)
        finally:
            with self.lock:
                self.now -= 1
                self.spans[step.name] = (t0, time.perf_counter())


def _wait_for(predicate, seconds: float = 10.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_budgets_follow_the_running_steps_and_needs_hold(tmp_path):
    """a (follows a budget) starts alone with both cores, drops to one while b runs, gets both back once b ends; c
    waits for a, d (no needs given) for everything before it."""
    b_started, b_ended, seen = threading.Event(), threading.Event(), {}

    def a(env):
        seen["start"] = env["OMP_NUM_THREADS"]
        budget = ThreadBudget(env[ENV])
        assert b_started.wait(10)
        seen["beside b"] = budget.read()
        assert b_ended.wait(10)
        assert _wait_for(lambda: budget.read() == 2)  # shared out again once b ended
        seen["after b"] = budget.read()

    def b(env):
        b_started.set()
        time.sleep(0.1)

    rec = Recorder({"a": a, "b": b})
    ends = []

    def finished(job):
        ends.append(job.step.name)
        if job.step.name == "b":
            b_ended.set()

    steps = [_step("a", (), follows=True), _step("b", ()), _step("c", ("a",)), _step("d")]
    run_scheduled(steps, rec, finished, jobs=2, cores=2, logs=tmp_path, heartbeat=0.05)
    assert seen == {"start": "2", "beside b": 1, "after b": 2}
    assert rec.env["b"]["OMP_NUM_THREADS"] == "1" and ENV not in rec.env["b"]  # b keeps its one thread
    assert rec.spans["c"][0] >= rec.spans["a"][1]
    assert rec.spans["d"][0] >= max(rec.spans[n][1] for n in "abc")
    assert rec.most == 2 and sorted(ends) == ["a", "b", "c", "d"]


def test_the_longest_chain_starts_first_side_by_side_and_the_listed_order_holds_one_at_a_time(tmp_path):
    steps = [_step("x", (), True), _step("y", (), True), _step("a", (), True), _step("b", ("a",), True),
             _step("c", ("b",), True)]  # fmt: skip
    assert chain_lengths(steps) == {"x": 0, "y": 0, "a": 2, "b": 1, "c": 0}
    assert chain_lengths([_step("p", ()), _step("q")]) == {"p": 1, "q": 0}  # no needs given: after p
    for jobs, first in ((2, ["a", "x"]), (1, ["x", "y", "a", "b", "c"])):
        rec = Recorder({"x": lambda env: time.sleep(1.0)})  # y cannot start before a, even on a slow machine
        run_scheduled(steps, rec, lambda job: None, jobs=jobs, cores=2, logs=tmp_path)
        order = sorted(rec.spans, key=lambda n: rec.spans[n][0])
        assert sorted(order[: len(first)]) == sorted(first)
        assert jobs > 1 or order == first


def test_a_step_that_keeps_every_core_runs_alone(tmp_path):
    rec = Recorder()
    run_scheduled([_step("x", ()), _step("y", ())], rec, lambda job: None, jobs=1, cores=2, logs=tmp_path)
    assert rec.most == 1 and rec.env["x"] == {}  # jobs=1: one by one, the machine's default threads
    rec = Recorder()
    # jobs=2 but x, a step that keeps its threads, started alone with both cores: y waits for it
    steps = [_step("x", ()), _step("y", ())]

    def start(step, env, echo):
        if step.name == "x":
            assert env["OMP_NUM_THREADS"] == "2"
        rec(step, env, echo)

    run_scheduled(steps, start, lambda job: None, jobs=2, cores=2, logs=tmp_path)
    assert rec.most == 1 and rec.spans["y"][0] >= rec.spans["x"][1]


def test_a_failure_lets_running_steps_finish_and_starts_nothing_new(tmp_path):
    def broken(env):
        raise SystemExit("[demo] step 'x' failed")

    def slow(env):
        time.sleep(0.3)

    rec = Recorder({"x": broken, "y": slow})
    ended = []
    steps = [_step("x", (), follows=True), _step("y", (), follows=True), _step("z", ())]
    with pytest.raises(SystemExit, match="'x' failed"):
        run_scheduled(steps, rec, lambda job: ended.append(job.step.name), jobs=2, cores=2, logs=tmp_path)
    assert ended == ["y"] and "z" not in rec.spans


def test_thread_budget_is_followed(tmp_path, monkeypatch):
    before = torch.get_num_threads()
    path = tmp_path / "budget.threads"
    try:
        torch.set_num_threads(2)  # other tests may have left one
        budget = ThreadBudget(path)
        assert budget.apply() is None  # no file yet: nothing changes
        write_budget(path, 1)
        assert budget.apply() == 1 and torch.get_num_threads() == 1
        assert budget.apply() is None  # the same budget: nothing to do
        path.write_text("garbage")
        assert budget.apply() is None and torch.get_num_threads() == 1
        monkeypatch.setenv(ENV, str(path))
        callback = FollowThreadBudget()
        write_budget(path, 2)
        callback.on_train_batch_start(None, None, None, 0)
        assert torch.get_num_threads() == 2
        with pytest.raises(ValueError):
            write_budget(path, 0)
    finally:
        torch.set_num_threads(before)
    monkeypatch.delenv(ENV)
    assert FollowThreadBudget().budget is None


def test_driver_runs_real_steps_side_by_side_with_their_own_logs(tmp_path, monkeypatch):
    """Two real subprocesses under the driver: p (follows a budget) starts alone with both cores and gives one to q;
    each has its own log, and demo.log has both."""
    code = "import os, sys; print('threads', os.environ.get('OMP_NUM_THREADS'), sys.argv[1])"
    steps = [Step(n, [sys.executable, "-c", code, n], f"{n}.done", hydra=False, needs=(), follows_threads=f)
             for n, f in (("p", True), ("q", False))]  # fmt: skip
    monkeypatch.setattr(driver, "available_cores", lambda: 2)
    state = driver.State(tmp_path / "demo_state.json")
    driver.run_stages(tmp_path, {"name": "x"}, [Stage("s", "both", steps)], state, tmp_path / "demo.log", jobs=2)
    whole = (tmp_path / "demo.log").read_text()
    for n, threads in (("p", 2), ("q", 1)):
        line = f"threads {threads} {n}"
        assert line in (tmp_path / "logs" / f"{n}.log").read_text() and line in whole
    assert state.data["steps"]["p"]["threads"][:2] == [2, 1] and state.data["steps"]["q"]["threads"] == [1]
    assert state.data["steps"]["q"]["alongside"] == ["p"]
    run = state.data["runs"][0]
    assert sorted(run["steps"]) == ["p", "q"] and run["jobs"] == 2 and run["seconds"] == state.data["last_run_seconds"]


def _producers(steps: list[Step]) -> dict[str, list[tuple[str, str]]]:
    """Per step: (kind, path) of what it leaves in the demo folder: its done file and its run folder."""
    return {s.name: [("done", s.done), *([("run_dir", s.run_dir)] if s.run_dir else [])] for s in steps}


def _producer_of(path: str, steps: list[Step]) -> list[str]:
    """The steps that write ``path`` (relative to the demo folder): the one whose done file it is, else whose run
    folder holds it, else those that write into its top folder."""
    exact = [s.name for s in steps if s.done == path]
    if exact:
        return exact
    inside = [s.name for s in steps if s.run_dir and (path == s.run_dir or path.startswith(s.run_dir + "/"))]
    if inside:
        return inside
    top = path.split("/")[0]
    return [s.name for s in steps if s.done.split("/")[0] == top or (s.run_dir or "").split("/")[0] == top]


def _strings(x):
    if isinstance(x, dict):
        for v in x.values():
            yield from _strings(v)
    elif isinstance(x, list):
        for v in x:
            yield from _strings(v)
    elif isinstance(x, str):
        yield x


@pytest.mark.parametrize("scale", ["mini", "tiny", "gpu"])
def test_every_step_needs_the_steps_whose_outputs_it_reads(scale, tmp_path):
    """Each path under the demo folder that a step's command or composed config names is written by a step it
    (transitively) needs: side by side, no step reads another's half-written outputs. And each step it names as a
    need writes something it reads: a stale need (stage 2 waited for the judge its selection no longer uses) holds
    a step back for nothing and lengthens the critical path."""
    s = driver.load_scale(scale)
    steps = [step for stage in demo_stages(s) for step in stage.steps]
    check_needs(steps)
    closure: dict[str, set[str]] = {}
    for step in steps:  # listed in an order that respects the needs
        direct = needs_of(step, steps)
        closure[step.name] = set(direct).union(*(closure[n] for n in direct))
    out = str(tmp_path)
    pattern = re.compile(re.escape(out) + r"/([^\s'\",]+)")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for step in steps:
            argv = command(step, tmp_path, s, resume=False)
            texts = [a for a in argv if not a.startswith("hydra.")]
            entry = next((a for a in argv if a in ENTRY_CONFIGS), None)
            if step.hydra and entry:
                overrides = [a for a in argv[argv.index(entry) + 1 :] if "=" in a or a.startswith("~")]
                overrides = [a for a in overrides if not a.startswith("hydra.")]
                overrides = [a for a in overrides if a.partition("=")[0] not in ("batches", "grid")]
                cfg = OmegaConf.to_container(compose(ENTRY_CONFIGS[entry], overrides=overrides), resolve=False)
                texts += [t.replace("${paths.demo_dir}", out) for t in _strings(cfg)]
            read_from: set[str] = set()
            for text in texts:
                for path in pattern.findall(text):
                    path = path.rstrip("/")
                    makers = _producer_of(path, steps)
                    if step.name in makers:  # its own output (and, in a shared folder, perhaps others')
                        read_from |= set(makers) & closure[step.name]
                        continue
                    assert set(makers) & closure[step.name], f"{step.name} reads {path} (made by {makers})"
                    read_from |= set(makers)
            stale = set(step.needs or ()) - read_from
            assert not stale, f"{step.name} waits for {sorted(stale)} but reads nothing they write"


def test_report_total_is_the_wall_clock_only_when_steps_overlapped(tmp_path):
    from emu.demo.report import section_times

    scale = driver.load_scale("tiny")
    stages = demo_stages(scale)
    state = {"stages": {"haystack": {"title": "h", "seconds": 600.0}, "judge": {"title": "j", "seconds": 600.0}},
             "steps": {"haystack": {"seconds": 600.0}, "judge": {"seconds": 600.0}},
             "runs": [{"seconds": 660.0, "jobs": 2, "steps": ["haystack", "judge"]},
                      {"seconds": 5.0, "steps": []}]}  # fmt: skip
    text = "\n".join(section_times(tmp_path, state, stages))
    assert "| **total** | | **20.0 min** |" in text  # nothing overlapped: the stages add up
    state["steps"]["judge"]["alongside"] = ["haystack"]
    text = "\n".join(section_times(tmp_path, state, stages))
    assert "**total, wall clock** | | **11.0 min**" in text and "add up to 20.0 min" in text and "--jobs 2" in text

"""A lent GPU machine's run, prepared here: the wheels it lacks (bench/gpu_wheels.py), the environment that rehearses
it (bench/gpu_rehearsal.py: the machine's packages only, no network) and bench/gpu_remote.sh run in it."""

import re
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

import gpu_check
import gpu_rehearsal
import gpu_wheels

IN_A_VENV = sys.prefix != sys.base_prefix


def requirement_names(path: Path) -> list[str]:
    lines = (raw.split("#", 1)[0].strip() for raw in path.read_text().splitlines())
    return [gpu_wheels.canonical(re.split(r"[<>=!~;\[ ]", line)[0]) for line in lines if line]


# ------------------------------------------------------------------------------------ what is carried
def test_every_requirement_is_on_the_gpu_machine_carried_or_declared_not_needed():
    """A new requirement forces a decision: on the machine, pinned in wheels.txt, or named in NOT_CARRIED."""
    machine = set(gpu_wheels.read_machine()[1])
    pins = gpu_wheels.read_pins(gpu_wheels.PINS)
    for name in requirement_names(ROOT / "requirements.txt") + requirement_names(ROOT / "requirements-dev.txt"):
        homes = [name in machine, name in pins, name in gpu_wheels.NOT_CARRIED]
        assert sum(homes) == 1, f"{name}: on the machine {homes[0]}, pinned {homes[1]}, not carried {homes[2]}"


def test_pins_are_what_requirements_allow_and_shadow_nothing_on_the_machine():
    from packaging.requirements import Requirement

    pins = gpu_wheels.read_pins(gpu_wheels.PINS)
    assert {"hydra-core", "omegaconf", "antlr4-python3-runtime", "braceexpand", "clean-fid", "diffusers",
            "webdataset"} <= set(pins)  # fmt: skip
    assert not set(pins) & set(gpu_wheels.read_machine()[1])  # --no-deps over the machine's own version would shadow it
    assert pins["omegaconf"].startswith("2.3.")  # hydra-core 1.3 refuses omegaconf 2.4
    specs = {}
    for f in ("requirements.txt", "requirements-dev.txt"):
        for raw in (ROOT / f).read_text().splitlines():
            line = raw.split("#", 1)[0].strip()
            if line:
                req = Requirement(line)
                specs[gpu_wheels.canonical(req.name)] = req.specifier
    for name, version in pins.items():
        if name in specs:
            assert specs[name].contains(version), f"{name}=={version} is outside requirements' {specs[name]}"


def test_read_pins_rejects_what_pip_install_no_deps_cannot_take(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("# comment\nHydra_Core==1.3.8  # why\n\nbraceexpand == 0.1.7\n")
    assert gpu_wheels.read_pins(good) == {"hydra-core": "1.3.8", "braceexpand": "0.1.7"}
    twice = tmp_path / "twice.txt"
    twice.write_text("hydra-core==1.3.8\nhydra_core==1.3.2\n")
    with pytest.raises(SystemExit, match=r"twice.txt:2: hydra-core is pinned twice"):
        gpu_wheels.read_pins(twice)
    ranged = tmp_path / "ranged.txt"
    ranged.write_text("omegaconf>=2.3\n")
    with pytest.raises(SystemExit, match=r"ranged.txt:1: expected 'name==version'"):
        gpu_wheels.read_pins(ranged)


@pytest.mark.parametrize(("filename", "ok"), [
    ("hydra_core-1.3.8-py3-none-any.whl", True),
    ("braceexpand-0.1.7-py2.py3-none-any.whl", True),
    ("numpy-2.5.2-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl", True),
    ("numpy-2.5.2-cp311-cp311-manylinux_2_28_x86_64.whl", False),  # another Python
    ("numpy-2.5.2-cp312-cp312-manylinux_2_28_aarch64.whl", False),  # another processor
    ("pywin-1.0-py3-none-win_amd64.whl", False),
    ("old-1.0-py2-none-any.whl", False),
])  # fmt: skip
def test_wheels_for_the_gpu_machine(filename, ok):
    assert gpu_wheels.runs_on_target(filename) is ok


def _wheel(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    path = folder / f"{name}-{version}-py3-none-any.whl"
    meta = "\n".join([f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}",
                      *(f"Requires-Dist: {r}" for r in requires)]) + "\n"  # fmt: skip
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}.py", "VALUE = 1\n")
        z.writestr(f"{name}-{version}.dist-info/METADATA", meta)
        wheel = "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        z.writestr(f"{name}-{version}.dist-info/WHEEL", wheel)
        z.writestr(f"{name}-{version}.dist-info/RECORD", "")
    return path


def test_unmet_requirements_are_judged_for_the_gpu_machine(tmp_path):
    lazy = 'lazy-importer>=0.1; python_version < "3.15"'  # true on the GPU machine's 3.12
    alpha = ["beta>=2", "zipp", 'typing; python_version < "3.5"', lazy, 'pytest; extra == "test"']
    wheels = [_wheel(tmp_path, "alpha", "1.0", alpha), _wheel(tmp_path, "beta", "2.0", [])]
    assert gpu_wheels.requirements_of(wheels[1]) == []
    assert gpu_wheels.unmet(wheels, {"zipp"}) == [f"alpha-1.0-py3-none-any.whl: {lazy}"]
    assert gpu_wheels.unmet(wheels, {"zipp", "lazy-importer"}) == []


# ------------------------------------------------------------------------------------ the rehearsal's pieces
def test_the_gpu_check_collects_every_gpu_test():
    """gpu_check collects only GPU_TEST_FILES (the rest of the suite imports what a GPU machine lacks): a gpu-marked
    test anywhere else would never run there."""
    marked = {str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("*.py") if "mark.gpu" in p.read_text()}
    marked.discard("tests/test_gpu_remote.py")  # this file names the marker, it marks nothing
    assert marked and marked <= set(gpu_check.GPU_TEST_FILES)


def test_the_two_device_calls_fit_one_loan_of_a_gpu_machine():
    """15 minutes of device time, its start (1-2 min) included; no command over 10 minutes; each call's steps fit its
    budget by their estimates, and the budget plus the remote script's own time fits the call's timeout."""
    calls = gpu_check.DEVICE_CALLS
    assert sorted(s for c in calls.values() for s in c.steps) == sorted(gpu_check.STEP_NAMES)
    assert calls[1].timeout_s <= 9 * 60 and calls[2].timeout_s <= 5 * 60
    for call in calls.values():
        assert call.budget_min * 60 + gpu_check.REMOTE_SETUP_S <= call.timeout_s
        needed = sum(gpu_check.ESTIMATES["cuda"][s][0] + gpu_check.KILL_MARGIN_S for s in call.steps)
        assert needed <= call.budget_min * 60 - 10  # 10 s: starting Python and torch before the first step
    args = gpu_check.parse(["--call", "2"])
    assert (args.budget_min, args.only) == (4.25, ["stage1_fsdp"])
    assert gpu_check.parse(["--call", "1", "--budget-min", "3"]).budget_min == 3
    assert gpu_check.parse([]).budget_min == 8.0 and gpu_check.parse([]).only is None


def _dist(site: Path, name: str, files: dict[str, str], requires: tuple[str, ...] = ()) -> None:
    info = site / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n"
                                   + "".join(f"Requires-Dist: {r}\n" for r in requires))  # fmt: skip
    for rel, text in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)
    records = [*files, f"{name}-1.0.dist-info/METADATA", f"{name}-1.0.dist-info/RECORD", f"../../../bin/{name}"]
    (info / "RECORD").write_text("".join(f"{r},,\n" for r in records))


def test_link_plan_shows_only_the_wanted_distributions_and_enters_shared_namespace_folders(tmp_path):
    """``nvidia/`` is shared by two distributions, one of them unwanted: it is entered, its own part linked."""
    requires = ("cublas", 'win; sys_platform == "win32"')
    _dist(tmp_path, "torch", {"torch/__init__.py": "", "functorch/__init__.py": ""}, requires)
    _dist(tmp_path, "cublas", {"nvidia/cublas/lib.so": "", "nvidia/cublas/__init__.py": ""})
    _dist(tmp_path, "other", {"nvidia/other/lib.so": "", "other.pth": "import os\n"})
    _dist(tmp_path, "win", {"win.py": ""})
    dists = gpu_rehearsal.distributions(tmp_path)
    assert set(dists) == {"torch", "cublas", "other", "win"}
    assert gpu_rehearsal.needed_by(dists, {"torch"}) == {"cublas"}  # not win: its marker is false here
    plan = gpu_rehearsal.link_plan(dists, {"torch", "cublas"})
    assert set(plan) == {("torch",), ("functorch",), ("torch-1.0.dist-info",), ("nvidia", "cublas"),
                         ("cublas-1.0.dist-info",)}  # fmt: skip
    assert plan[("nvidia", "cublas")] == "cublas"


def test_out_problems_are_what_the_device_tool_would_not_bring_back(tmp_path):
    (tmp_path / "logs").mkdir()
    for i in range(7):
        (tmp_path / "logs" / f"s{i}.log").write_text("x")
    (tmp_path / "remote.log").write_text("x")
    assert gpu_rehearsal.out_problems(tmp_path) == []  # 8 files, one folder down
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c" / "deep.json").write_text("x")
    (tmp_path / "odd name.md").write_text("x")
    problems = gpu_rehearsal.out_problems(tmp_path)
    assert "10 files in $OUT (at most 8 come back)" in problems
    assert "a/b/c/deep.json: more than 2 folders down" in problems
    assert any(p.startswith("odd name.md: a name with characters") for p in problems)


def test_machine_list_names_the_python_and_the_torch_stack():
    python, machine = gpu_wheels.read_machine()
    assert python == "3.12.3"
    assert {machine[n] for n in ("torch", "torchvision", "lightning", "transformers")} == {"2.11.0", "0.26.0", "2.6.6",
                                                                                          "5.17.0"}  # fmt: skip
    assert "hydra-core" not in machine and "diffusers" not in machine and "pytest" in machine


# ------------------------------------------------------------------------------------ rehearsals end to end
@pytest.mark.skipif(not IN_A_VENV, reason="borrows the GPU machine's packages from the venv the tests run in")
def test_the_rehearsal_hides_what_the_gpu_machine_lacks(tmp_path):
    """Carrying a wheel that is not hydra: the rehearsal's Python finds no hydra (the venv here has it), so the remote
    script stops at its import check, says so, and the rehearsal fails, listing why."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "alpha", "1.0", [])
    cmd = [sys.executable, str(ROOT / "bench/gpu_rehearsal.py"), "--from", sys.prefix, "--out", str(tmp_path / "r"),
           "--wheels", str(wheels)]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert "No module named 'hydra'" in r.stdout or "No module named 'omegaconf'" in r.stdout, r.stdout[-3000:]
    assert "rehearsal: FAILED" in r.stdout and "bench/gpu_remote.sh exited with 2" in r.stdout
    assert (tmp_path / "r/OUT/remote.log").is_file()
    versions = [line for line in r.stdout.splitlines() if line.startswith("torch ") and "hydra-core" in line]
    assert versions and "hydra-core MISSING" in versions[0] and "diffusers MISSING" in versions[0]
    linked = {p.name for p in (tmp_path / "r/venv").glob("lib/python*/site-packages/*")}
    assert "torch" in linked and "lightning" in linked and not {"hydra", "wandb", "faiss", "fastapi"} & linked


@pytest.mark.slow
@pytest.mark.skipif(not IN_A_VENV, reason="borrows the GPU machine's packages from the venv the tests run in")
def test_the_rehearsal_of_the_gpu_machine_passes(tmp_path):
    """make gpu-wheels, then bench/gpu_rehearsal.py (CPU dry run of every step) on the machine's packages, offline."""
    wheels = tmp_path / "wheels"
    assert gpu_wheels.main(["--dest", str(wheels)]) == 0  # needs the package index (the wheels are fetched here)
    assert {gpu_wheels.parse_wheel_name(w.name)[0] for w in wheels.glob("*.whl")} == set(
        gpu_wheels.read_pins(gpu_wheels.PINS))  # fmt: skip
    cmd = [sys.executable, str(ROOT / "bench/gpu_rehearsal.py"), "--from", sys.prefix, "--out", str(tmp_path / "r"),
           "--wheels", str(wheels)]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and "rehearsal: PASSED" in r.stdout, r.stdout[-5000:] + r.stderr[-3000:]
    back = sorted(str(p.relative_to(tmp_path / "r/OUT")) for p in (tmp_path / "r/OUT").rglob("*") if p.is_file())
    assert back == ["gpu_check.json", "gpu_check.md", *(f"logs/{s}.log" for s in sorted(gpu_check.STEP_NAMES)),
                    "remote.log"]  # fmt: skip
    assert metadata.version("torch") in (tmp_path / "r/OUT/remote.log").read_text()

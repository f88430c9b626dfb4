"""The wheels a lent GPU machine needs and lacks, fetched here into ``.whl/`` for the device tool to carry there.

    make gpu-wheels                              # = python3 bench/gpu_wheels.py --dest .whl
    python3 bench/gpu_wheels.py --dest .whl --pins bench/gpu_machine/wheels.txt --max-mib 16

The GPU machine has no network and its own Python (3.12) with PyTorch; what the GPU check imports beyond that machine's
packages (``bench/gpu_machine/packages.txt``) is pinned in ``bench/gpu_machine/wheels.txt``. Each pin is downloaded as
a wheel for CPython 3.12 on manylinux x86-64 (pure Python wheels serve any Python 3); a package published as a source
tarball only (antlr4-python3-runtime) is built into a wheel here, which must come out pure Python. Each wheel's own
requirements (markers evaluated for that machine) must be on the machine or among the wheels. Wheels already in
``--dest`` at the pinned version are kept (a rerun offline works), any other file there is removed (two versions of one
package stop ``pip install --no-deps`` on the machine). Prints one row per wheel and the total, and exits 1 when the
total is over ``--max-mib`` (the device tool carries 64 MiB in all, the repository included) or a requirement is unmet.
"""

from __future__ import annotations

import argparse
import email.parser
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PINS = ROOT / "bench/gpu_machine/wheels.txt"
MACHINE = ROOT / "bench/gpu_machine/packages.txt"
TARGET_PYTHON = "3.12"  # the GPU machine's interpreter (bench/gpu_machine/packages.txt)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")  # fmt: skip
PY_TAGS = {"py3", "py312", "cp312"}
ABI_TAGS = {"none", "abi3", "cp312"}
# the markers of a wheel's requirements, evaluated for the GPU machine
TARGET_MARKERS = {"python_version": TARGET_PYTHON, "python_full_version": "3.12.3", "implementation_name": "cpython",
                  "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
                  "os_name": "posix", "platform_machine": "x86_64", "extra": ""}  # fmt: skip
# requirements*.txt packages the GPU machine lacks and that are not carried: nothing the GPU check runs imports them
# (tests/test_gpu_remote.py: every requirement is on the machine, pinned in wheels.txt or named here)
NOT_CARRIED = {
    "wandb": "only logger=wandb imports it; the check logs to csv",
    "torch-fidelity": "not imported: emu reads its Inception weights file by path",
    "pytesseract": "the curation's OCR filter",
    "hydra-submitit-launcher": "hydra/launcher=slurm",
    "fastapi": "the annotation app (emu.annotate)",
    "uvicorn": "the annotation app (emu.annotate)",
    "faiss-cpu": "the curation's near-duplicate search",
    "ruff": "lint",
    "selenium": "the browser tests",
}


def canonical(name: str) -> str:
    """PEP 503 name: ``Hydra_Core`` and ``hydra-core`` are the same project."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str]:
    """``{canonical name: version}`` from ``name==version`` lines (comments and blank lines ignored); a line of
    another form, or a name pinned twice, is an error naming the line."""
    pins: dict[str, str] = {}
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([A-Za-z0-9.+!_-]+)", line)
        if m is None:
            raise SystemExit(f"{path}:{n}: expected 'name==version', got {raw!r}")
        name = canonical(m.group(1))
        if name in pins:
            raise SystemExit(f"{path}:{n}: {name} is pinned twice: keep one version")
        pins[name] = m.group(2)
    return pins


def parse_wheel_name(filename: str) -> tuple[str, str, str, str, str]:
    """``(canonical name, version, python tag, abi tag, platform tag)`` of a wheel file name (PEP 427)."""
    parts = filename[: -len(".whl")].split("-")
    if not filename.endswith(".whl") or len(parts) not in (5, 6):
        raise ValueError(f"not a wheel file name: {filename}")
    return canonical(parts[0]), parts[1], parts[-3], parts[-2], parts[-1]


def runs_on_target(filename: str) -> bool:
    """Whether a wheel installs on CPython 3.12, manylinux x86-64 (every one of a compressed tag set may match)."""
    _, _, py, abi, plat = parse_wheel_name(filename)
    plats = plat.split(".")
    linux = any(p == "any" or (p.startswith("manylinux") and p.endswith("_x86_64")) for p in plats)
    return bool(set(py.split(".")) & PY_TAGS) and bool(set(abi.split(".")) & ABI_TAGS) and linux


def find_wheel(dest: Path, name: str, version: str) -> Path | None:
    for p in sorted(dest.glob("*.whl")):
        n, v, *_ = parse_wheel_name(p.name)
        if (n, v) == (name, version):
            return p
    return None


def requirements_of(wheel: Path) -> list[str]:
    """The ``Requires-Dist`` lines of a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        meta = email.parser.HeaderParser().parsestr(z.read(name).decode())
    return meta.get_all("Requires-Dist") or []


def unmet(wheels: list[Path], there: set[str]) -> list[str]:
    """``"wheel: requirement"`` for each requirement of the wheels (markers evaluated for the GPU machine) that
    neither the machine's packages nor the wheels themselves provide (canonical names in ``there``)."""
    from packaging.requirements import Requirement

    provided = there | {parse_wheel_name(w.name)[0] for w in wheels}
    missing = []
    for wheel in wheels:
        for raw in requirements_of(wheel):
            req = Requirement(raw)
            if (req.marker is None or req.marker.evaluate(TARGET_MARKERS)) and canonical(req.name) not in provided:
                missing.append(f"{wheel.name}: {raw}")
    return missing


def read_machine(path: Path = MACHINE) -> tuple[str | None, dict[str, str | None]]:
    """The GPU machine's Python version and ``{canonical package name: version or None}`` from packages.txt
    (``name`` or ``name==version`` lines; ``python==X`` is the interpreter)."""
    python, packages = None, {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, version = line.partition("==")
        if canonical(name) == "python":
            python = version or None
        else:
            packages[canonical(name)] = version or None
    return python, packages


def pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


def fetch(name: str, version: str, dest: Path) -> tuple[Path, str]:
    """Download the pinned wheel for the target, or build one from the source tarball when none is published.
    Returns ``(wheel, "downloaded" | "built here")``."""
    with tempfile.TemporaryDirectory() as tmp:
        target = ["--python-version", TARGET_PYTHON, "--implementation", "cp"]
        target += [a for p in PLATFORMS for a in ("--platform", p)]
        r = pip("download", "--quiet", "--no-deps", "--only-binary=:all:", *target, "-d", tmp, f"{name}=={version}")
        how = "downloaded"
        if r.returncode != 0:
            if "No matching distribution" not in r.stderr and "from versions: none" not in r.stderr:
                raise SystemExit(f"pip download {name}=={version} failed:\n{r.stderr[-2000:]}")
            r = pip("wheel", "--quiet", "--no-deps", "--no-binary", name, "-w", tmp, f"{name}=={version}")
            how = "built here"
            if r.returncode != 0:
                raise SystemExit(f"no wheel of {name}=={version} is published and building one failed:\n"
                                 f"{r.stderr[-2000:]}")  # fmt: skip
        (wheel,) = Path(tmp).glob("*.whl")
        if not runs_on_target(wheel.name):
            raise SystemExit(f"{wheel.name} does not install on CPython {TARGET_PYTHON} manylinux x86-64 (it was "
                             f"{how}): pin a version with a pure Python or cp312 manylinux wheel")  # fmt: skip
        return Path(wheel.replace(dest / wheel.name)), how


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dest", default=str(ROOT / ".whl"), help="folder of the wheels (its other files are removed)")
    p.add_argument("--pins", default=str(PINS), help="name==version lines")
    p.add_argument("--max-mib", type=float, default=16.0, help="exit 1 when the wheels weigh more")
    args = p.parse_args(argv)
    pins, dest = read_pins(Path(args.pins)), Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    wheels = {}  # wheel -> how it came
    for name, version in pins.items():
        wheel = find_wheel(dest, name, version)
        if wheel is None:
            wheel, how = fetch(name, version, dest)
            wheels[wheel] = how
        else:
            wheels[wheel] = "already here"
    for stale in sorted(set(dest.iterdir()) - set(wheels)):
        print(f"removed {stale.name} (not pinned in {args.pins})")
        stale.unlink()
    total = sum(w.stat().st_size for w in wheels)
    width = max(len(w.name) for w in wheels)
    for wheel, how in wheels.items():
        print(f"{wheel.name:<{width}}  {wheel.stat().st_size / 2**10:8.1f} KiB  {how}")
    verdict = "ok" if total <= args.max_mib * 2**20 else f"OVER the {args.max_mib:g} MiB limit"
    print(f"{len(wheels)} wheels in {dest}: {total / 2**20:.2f} MiB ({verdict}, limit {args.max_mib:g} MiB)")
    missing = unmet(list(wheels), set(read_machine()[1]))
    for line in missing:
        print(f"unmet on the GPU machine: {line} (pin it in {args.pins}, or add it to {MACHINE.name} if it is there)")
    return 0 if total <= args.max_mib * 2**20 and not missing else 1


if __name__ == "__main__":
    sys.exit(main())

"""Rehearse a lent GPU machine's run here: its package set only, the carried wheels, no network, bench/gpu_remote.sh.

    make gpu-rehearsal                                   # make gpu-wheels, then this with the defaults below
    python bench/gpu_rehearsal.py --from .venv --out outputs/gpu_rehearsal [-- ARGS for bench/gpu_remote.sh]

A GPU machine has its own Python with PyTorch and a fixed set of packages (``bench/gpu_machine/packages.txt``), no
network and no make. This builds a fresh venv here whose site-packages holds exactly the distributions of that list
that ``--from`` (a venv of this machine) has, symlinked from it (nothing else of ``--from`` is visible: not emu, not
wandb, faiss, fastapi or selenium), then runs ``bash bench/gpu_remote.sh`` with that venv's Python in a network
namespace of its own (``unshare --net``, loopback only: the package index cannot be reached; where ``unshare`` is
refused, proxies that point nowhere and ``PIP_NO_INDEX`` stand in, said so). Without CUDA the remote script runs
bench/gpu_check.py's CPU dry run. The rehearsal passes when the remote script exits 0, every step of its report is
``ok`` and what it leaves in ``$OUT`` is what the device tool brings back (at most 8 files, no more than 2 folders
down, plain names). Prints the package versions that differ from the GPU machine's, and exits 0 or 1.

``--from`` a venv built with the GPU machine's own versions (torch 2.11, torchvision 0.26, lightning 2.6.6,
transformers 5.17 on Python 3.12; docs/benchmarks.md shows how) rehearses those versions too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from importlib import metadata
from pathlib import Path

from gpu_wheels import canonical, read_machine

ROOT = Path(__file__).resolve().parents[1]
MAX_FILES, MAX_FOLDERS = 8, 2  # what the device tool brings back from $OUT
NAME_OK = re.compile(r"[A-Za-z0-9._-]+")
# brings loopback up inside the new network namespace (gloo's FSDP dry run talks to 127.0.0.1), then runs the command
LOOPBACK_UP = """
import fcntl, os, socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
flags = struct.unpack("16sh", fcntl.ioctl(s, 0x8913, struct.pack("16sh", b"lo", 0)))[1]  # SIOCGIFFLAGS
fcntl.ioctl(s, 0x8914, struct.pack("16sh", b"lo", flags | 1))  # SIOCSIFFLAGS, IFF_UP
os.execvp(sys.argv[1], sys.argv[1:])
"""


def python_version(python: Path) -> str:
    return subprocess.run([str(python), "-c", "import platform; print(platform.python_version())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip


def site_packages(venv: Path) -> Path:
    """The purelib folder of a venv, asked of its own Python."""
    r = subprocess.run([str(venv / "bin/python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       capture_output=True, text=True, check=True)  # fmt: skip
    return Path(r.stdout.strip())


def distributions(site: Path) -> dict[str, metadata.Distribution]:
    """``{canonical name: distribution}`` installed in ``site`` (first one found per name)."""
    found: dict[str, metadata.Distribution] = {}
    for dist in metadata.distributions(path=[str(site)]):
        found.setdefault(canonical(dist.metadata["Name"]), dist)
    return found


def installed_paths(dist: metadata.Distribution) -> list[tuple[str, ...]]:
    """The dist's files inside site-packages (RECORD), as path parts; scripts and data outside it are left out."""
    return [Path(f).parts for f in dist.files or [] if not str(f).startswith("..")]


def link_plan(dists: dict[str, metadata.Distribution], wanted: set[str]) -> dict[tuple[str, ...], str]:
    """Which paths of site-packages to symlink so that exactly the ``wanted`` distributions are visible:
    ``{path parts: owner}``, each the shortest prefix of a wanted dist's file that no other installed distribution
    also has files under (a namespace folder such as ``nvidia/`` shared with others is entered, not linked whole)."""
    owners: dict[tuple[str, ...], set[str]] = defaultdict(set)
    for name, dist in dists.items():
        for parts in installed_paths(dist):
            for i in range(1, len(parts) + 1):
                owners[parts[:i]].add(name)
    plan: dict[tuple[str, ...], str] = {}
    for name in sorted(wanted & set(dists)):
        for parts in installed_paths(dists[name]):
            prefix = next((parts[:i] for i in range(1, len(parts) + 1) if owners[parts[:i]] == {name}), parts)
            if not any(prefix[:i] in plan for i in range(1, len(prefix))):
                plan[prefix] = name
    return plan


def needed_by(dists: dict[str, metadata.Distribution], names: set[str], python: str | None = None) -> set[str]:
    """The installed distributions that ``names`` need, directly or not (their requirements without extras, markers
    evaluated for Python ``python``, e.g. ``"3.12.1"``, default the running one), less ``names`` themselves."""
    from packaging.requirements import Requirement

    env = {"extra": ""}
    if python:
        env.update(python_full_version=python, python_version=".".join(python.split(".")[:2]))
    found, todo = set(names), list(names)
    while todo:
        for raw in dists[todo.pop()].requires or []:
            req = Requirement(raw)
            dep = canonical(req.name)
            if (req.marker is None or req.marker.evaluate(env)) and dep in dists and dep not in found:
                found.add(dep)
                todo.append(dep)
    return found - names


def build_env(source: Path, target: Path, wanted: set[str]) -> tuple[Path, dict[str, str], dict[str, str]]:
    """A fresh venv at ``target`` (the base interpreter of ``source``, no pip of its own) whose site-packages holds
    symlinks to the ``wanted`` distributions of venv ``source``, and to what those need as installed there (a package
    here can be newer than the machine's and need what the machine's version does not: huggingface-hub 2 needs
    httpx2, 1.33 does not). Returns ``(its python, {wanted name: version}, {needed-only name: version})``."""
    if target.exists():
        shutil.rmtree(target)
    subprocess.run([str(source / "bin/python"), "-m", "venv", "--without-pip", str(target)], check=True)
    src_site, dst_site = site_packages(source), site_packages(target)
    dists = distributions(src_site)
    present = wanted & set(dists)
    extra = needed_by(dists, present, python_version(target / "bin/python"))
    for parts in link_plan(dists, present | extra):
        src, dst = src_site.joinpath(*parts), dst_site.joinpath(*parts)
        if src.exists() or src.is_symlink():
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(src)
    version = lambda names: {n: dists[n].version for n in sorted(names)}
    return target / "bin/python", version(present), version(extra)


def out_problems(out: Path) -> list[str]:
    """What the device tool would not bring back from ``out``: too many files, too deep, odd names, links."""
    problems, files = [], [p for p in sorted(out.rglob("*")) if not p.is_dir()]
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files in $OUT (at most {MAX_FILES} come back)")
    for p in files:
        rel = p.relative_to(out)
        if len(rel.parts) - 1 > MAX_FOLDERS:
            problems.append(f"{rel}: more than {MAX_FOLDERS} folders down")
        if not all(NAME_OK.fullmatch(part) for part in rel.parts):
            problems.append(f"{rel}: a name with characters other than letters, digits, '.', '_', '-'")
        if p.is_symlink() or not p.is_file():
            problems.append(f"{rel}: not a plain file")
    return problems


def offline_command(command: list[str]) -> tuple[list[str], dict[str, str], str]:
    """``command`` in a network namespace of its own with loopback up, or, where that is refused, with the index and
    proxies pointed nowhere. Returns ``(command, extra environment, how)``."""
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True) if shutil.which("unshare") else None
    if probe is not None and probe.returncode == 0:
        return (["unshare", "--net", sys.executable, "-c", LOOPBACK_UP, *command], {},
                "network namespace of its own (unshare --net): loopback only")  # fmt: skip
    nowhere = "http://127.0.0.1:9"
    env = {"PIP_NO_INDEX": "1", "http_proxy": nowhere, "https_proxy": nowhere, "HTTP_PROXY": nowhere,
           "HTTPS_PROXY": nowhere, "no_proxy": "127.0.0.1,localhost"}  # fmt: skip
    return command, env, "unshare --net refused here: PIP_NO_INDEX=1 and proxies that point nowhere instead"


def clean_environment(python: Path) -> dict[str, str]:
    """This process's environment less what points at another Python (venvs, PYTHONPATH), with the rehearsal venv
    first on PATH."""
    drop = {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "CONDA_PREFIX"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and not (Path(p) / "activate").exists()]
    env["PATH"] = os.pathsep.join([str(python.parent), *path])
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--from", dest="source", default=str(ROOT / ".venv"), help="the venv to borrow packages from")
    p.add_argument("--out", default=str(ROOT / "outputs/gpu_rehearsal"), help="the venv, $OUT and the run go here")
    p.add_argument("--wheels", default=str(ROOT / ".whl"), help="what `make gpu-wheels` made")
    p.add_argument("remote_args", nargs="*", help="arguments of bench/gpu_remote.sh (after --)")
    args = p.parse_args(argv)
    source, out = Path(args.source).resolve(), Path(args.out).resolve()
    if not (source / "bin/python").exists():
        raise SystemExit(f"--from {source}: not a venv (no bin/python); `make install` makes .venv")
    if not list(Path(args.wheels).glob("*.whl")):
        raise SystemExit(f"no wheels in {args.wheels}: run `make gpu-wheels` first")
    want_python, machine = read_machine()
    python, borrowed, needed = build_env(source, out / "venv", set(machine))
    print(f"rehearsal venv {out / 'venv'}: Python {python_version(python)} (the GPU machine: {want_python}), "
          f"{len(borrowed)} of the machine's {len(machine)} packages borrowed from {source}")  # fmt: skip
    differ = [f"{n} {v} (there {machine[n]})" for n, v in borrowed.items() if machine[n] and machine[n] != v]
    if differ:
        print("versions here that differ from the GPU machine's: " + ", ".join(differ))
    if needed:
        print("not on the machine's list, borrowed because the versions here need them: "
              + ", ".join(f"{n} {v}" for n, v in needed.items()))  # fmt: skip
    remote_out, run_dir = out / "OUT", out / "run"
    for folder in (remote_out, run_dir):
        shutil.rmtree(folder, ignore_errors=True)
    remote_out.mkdir(parents=True)
    command, extra, how = offline_command(["bash", str(ROOT / "bench/gpu_remote.sh"), *args.remote_args])
    print(f"running bench/gpu_remote.sh {' '.join(args.remote_args)}: {how}", flush=True)
    env = {**clean_environment(python), **extra, "PYTHON": str(python), "OUT": str(remote_out),
           "WHEELS": str(Path(args.wheels).resolve()), "EMU_RUN_DIR": str(run_dir)}  # fmt: skip
    rc = subprocess.run(command, cwd=ROOT, env=env).returncode
    problems = [f"bench/gpu_remote.sh exited with {rc}"] if rc else []
    problems += out_problems(remote_out)
    report = remote_out / "gpu_check.json"
    if report.is_file():
        steps = json.loads(report.read_text())["steps"]
        problems += [f"step {s['step']}: {s['status']}" for s in steps if s["status"] != "ok"]
        if not steps:
            problems.append("the report lists no step")
    else:
        problems.append("no gpu_check.json came back in $OUT")
    back = sorted(str(f.relative_to(remote_out)) for f in remote_out.rglob("*") if f.is_file())
    print(f"\nrehearsal: $OUT holds {len(back)} files: {', '.join(back)}")
    print("rehearsal: " + ("PASSED" if not problems else "FAILED\n- " + "\n- ".join(problems)))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

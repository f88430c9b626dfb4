"""One prepared GPU check: every GPU claim of the codebase measured in one unattended run under a wall-time budget.

    make gpu-check                                  # make install (timed), then this script with the options below
    python bench/gpu_check.py --out outputs/gpu_check --budget-min 8 --device auto --install-seconds 0
    bash bench/gpu_remote.sh --call 1               # on a lent GPU machine (no network, its own Python), then --call 2

It prints the machine (device, driver from nvidia-smi, torch, CUDA and cuDNN versions, the install time it was given),
then runs these steps, each as a subprocess with its own time box, and writes ``<out>/gpu_check.json`` and
``<out>/gpu_check.md`` (one table: step, status, seconds, headline figures; the table is printed too), each step's
whole output in ``<out>/logs/<step>.log``:

1. ``gpu_tests``: ``pytest -m gpu`` (tests/test_gpu.py: bf16 autocast of the autoencoder, U-Net, conditioner and
   sampling against fp32, a one-rank ``trainer=fsdp`` run, flash attention in the U-Net);
2. ``unet_step``: bench/unet_step.py at ``paper_reduced`` (the 2.8B U-Net's block shapes, 1.2B parameters), ours with
   bf16, channels-last, compile, fused AdamW and TF32 against diffusers eager, with MFU against the bf16 dense peak
   of :data:`PEAK_BF16_DENSE` for the device (which entry was used is printed and recorded);
3. ``autoencoder_step``: bench/autoencoder_step.py at ``paper`` (256px), ours vs diffusers, the same options;
4. ``sampling``: bench/sampling.py, seconds per image at 1024x1024 for 50 and 20 DPM++ 2M steps with CFG, the
   ``paper_reduced`` U-Net over the paper autoencoder, bf16;
5. ``stage1_fsdp``: bench/stage1_fsdp.py: ``train.py experiment=stage1_pretrain trainer=fsdp`` with the full 2.8B
   U-Net on haystack data at 256px in bf16 for a few steps, a sharded checkpoint saved, the run resumed from it;
   step time and peak memory (random-weight frozen models of the real shapes, built locally: nothing is downloaded).

Without CUDA (``--device auto`` on a CPU machine, or ``--device cpu``) the same steps run on tiny configs on CPU: a dry
run that proves the plumbing (the gpu tests are collected and skip) in about a minute on 2 cores. ``--only STEP ...``
runs some of the steps (a rerun of what a first run skipped). ``--call 1`` and ``--call 2`` are the two device calls of
one loan of a GPU machine (:data:`DEVICE_CALLS`: the budget and steps of each; an explicit ``--budget-min`` or
``--only`` wins): a loan is 15 minutes of device time, its start included, and no command may run over 10 minutes.

The budget counts from this script's start. Before each step the time left is compared with the step's estimate
(:data:`ESTIMATES`, guessed for an H100/H200 until a GPU run replaces them with the seconds it records): a step that
would not fit is reported as ``skipped (would not fit: needs ~X s, Y s left)``; one that runs is killed with its whole
process group at its time box, the smaller of its own timeout and the time left (less :data:`KILL_MARGIN_S` for
the stopping), and reported as ``timeout``. A step that exits non-zero is ``failed (rc N: last line)`` (more lines
in the JSON and the markdown). So the check never runs past its budget, apart from the moment it takes to write the
report. Exit status: 1 when a step failed or timed out, else 0 (skipped steps are listed, not failures).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

STARTED = time.monotonic()  # the budget counts from here (torch is imported later, inside the budget)
ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"

# bf16 dense tensor-core peaks (FLOP/s), matched in order against torch.cuda.get_device_name(); first match wins
PEAK_BF16_DENSE = (
    ("H100 PCIe", ("H100", "PCIe"), 756e12),
    ("H100 NVL", ("H100", "NVL"), 835e12),
    ("H200", ("H200",), 989e12),
    ("H100 SXM", ("H100",), 989e12),
    ("A100", ("A100",), 312e12),
)
# (estimate, timeout) in seconds per step and device type; GPU figures are guesses until a GPU run measures them
ESTIMATES = {
    "cuda": {"gpu_tests": (60, 150), "unet_step": (110, 240), "autoencoder_step": (60, 150), "sampling": (40, 120),
             "stage1_fsdp": (200, 330)},
    "cpu": {"gpu_tests": (15, 120), "unet_step": (10, 90), "autoencoder_step": (8, 90), "sampling": (6, 90),
            "stage1_fsdp": (35, 180)},
}  # fmt: skip
KILL_GRACE_S = 3.0  # between SIGTERM and SIGKILL, and after SIGKILL, when stopping a step at its time box
KILL_MARGIN_S = 2 * KILL_GRACE_S + 2  # kept back from the time left for stopping a step that runs over
STEP_NAMES = tuple(ESTIMATES["cuda"])


@dataclass(frozen=True)
class DeviceCall:
    """One call of the device tool on a lent GPU machine: bench/gpu_remote.sh with ``--call N``."""

    budget_min: float  # bench/gpu_check.py's budget
    steps: tuple[str, ...]
    timeout_s: int  # the device call's timeout_s: the budget plus REMOTE_SETUP_S


# One loan: the first call ≤ 9 min (gpu tests, U-Net and autoencoder steps, sampling), the second ≤ 5 min (the 2.8B
# FSDP stage 1 with its save and resume), on one warm machine (docs/benchmarks.md: the calls, ready to paste)
DEVICE_CALLS = {
    1: DeviceCall(8.0, ("gpu_tests", "unet_step", "autoencoder_step", "sampling"), 540),
    2: DeviceCall(4.25, ("stage1_fsdp",), 300),
}
REMOTE_SETUP_S = 30  # bench/gpu_remote.sh around the check: machine and disk listing, wheels, versions, copies to $OUT
TARGETS = {"ratio": 1.15, "mfu": 0.40}  # training step ours / diffusers eager; model FLOPs utilisation
# the files holding the gpu-marked tests (tests/test_gpu_remote.py checks no other has one): collecting only these, the
# gpu tests run where the rest of the suite's imports (fastapi, selenium, faiss) are not installed, as on a lent GPU
GPU_TEST_FILES = ("tests/test_gpu.py",)


@dataclass(frozen=True)
class Step:
    """One measurement: a command and how to read its output into a headline."""

    name: str
    title: str
    command: list[str]
    estimate_s: float
    timeout_s: float
    headline: Callable[[dict | None, bool], str]  # (the step's result, on CUDA) -> the table's figures


# ------------------------------------------------------------------------------------ scheduling (pure)
def peak_for_device(name: str) -> tuple[str, float] | None:
    """The ``(table entry, bf16 dense FLOP/s)`` of :data:`PEAK_BF16_DENSE` matching a CUDA device name, or None."""
    for label, needles, flops in PEAK_BF16_DENSE:
        if all(n.lower() in name.lower() for n in needles):
            return label, flops
    return None


def time_left(budget_s: float, elapsed_s: float) -> float:
    return budget_s - elapsed_s


def plan(
    estimate_s: float, timeout_s: float, left_s: float, margin_s: float = KILL_MARGIN_S
) -> tuple[float | None, str]:
    """Whether a step runs: ``(time box, "")`` when its estimate fits in the time left less ``margin_s``, else
    ``(None, reason)``. The time box is its own timeout, cut to the time left less the margin kept for stopping it."""
    if estimate_s > left_s - margin_s:
        return None, f"skipped (would not fit: needs ~{estimate_s:.0f} s, {max(left_s, 0):.0f} s left)"
    return min(timeout_s, left_s - margin_s), ""


def outcome(rc: int | None, timed_out: bool, box_s: float, output: str, needs_json: bool) -> str:
    """A finished step's status: ``ok``, ``timeout (killed after N s)`` or ``failed (rc N: last line)``."""
    if timed_out:
        return f"timeout (killed after {box_s:.0f} s)"
    if rc != 0:
        last = last_lines(output, 1)
        return f"failed (rc {rc}: {last[0][:160] if last else 'no output'})"
    if needs_json and last_json(output) is None:
        return "failed (rc 0 but no JSON result line)"
    return "ok"


def last_lines(output: str, n: int) -> list[str]:
    return [line for line in output.splitlines() if line.strip()][-n:]


def last_json(output: str) -> dict | None:
    """The benchmark's result: its last line parsed as a JSON object, or None."""
    lines = last_lines(output, 1)
    try:
        r = json.loads(lines[0]) if lines else None
    except json.JSONDecodeError:
        return None
    return r if isinstance(r, dict) else None


def pytest_counts(output: str) -> dict[str, int] | None:
    """``{"passed": 3, "skipped": 2, "deselected": 248, ...}`` from pytest's summary line, or None without one."""
    summary = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|skipped|deselected|error)", line)]
    if not summary:
        return None
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)",
                                                summary[-1])}  # fmt: skip
    if "error" in counts:
        counts["errors"] = counts.pop("error") + counts.get("errors", 0)
    return counts


# ------------------------------------------------------------------------------------ headlines (pure)
def judge(value: float | None, target: float, cuda: bool) -> str:
    if not cuda or value is None:
        return ""
    return f" (target >= {target:g}: {'met' if value >= target else 'missed'})"


def tests_headline(r: dict | None, cuda: bool) -> str:
    if r is None:
        return "no pytest summary"
    order = ("passed", "failed", "errors", "skipped", "deselected", "xfailed", "xpassed")
    text = ", ".join(f"{r[k]} {k}" for k in order if r.get(k))
    if not cuda and r.get("skipped") and not r.get("passed"):
        text += " (no CUDA: the gpu tests skip)"
    elif cuda:
        text += f" (target: none failing: {'met' if not r.get('failed') and not r.get('errors') else 'missed'})"
    return text


def training_headline(r: dict | None, cuda: bool) -> str:
    """Ratio ours / diffusers, ours' images/s and step time, MFU and the peak it was taken against, peak memory."""
    if r is None:
        return ""
    ours = r["ours"]
    parts = [
        f"ours/diffusers {r['ratio']:.3f}x{judge(r['ratio'], TARGETS['ratio'], cuda)}",
        f"ours {ours['images_per_second']:g} img/s ({ours['ms_per_step']:g} ms/step, batch {r['batch']})",
    ]
    if ours.get("mfu") is not None:
        peak = r.get("peak_flops")
        of = f" of {peak / 1e12:.0f} TFLOP/s" if peak else ""
        parts.append(f"MFU {ours['mfu']:.1%}{of}{judge(ours['mfu'], TARGETS['mfu'], cuda)}")
    elif not cuda:
        parts.append("MFU: GPU only")
    mems = [f"{n} {r[n]['peak_memory_mb'] / 1024:.1f} GB" for n in ("ours", "diffusers") if r[n].get("peak_memory_mb")]
    if mems:
        parts.append("peak memory " + ", ".join(mems))
    return "; ".join(parts)


def sampling_headline(r: dict | None, cuda: bool) -> str:
    if r is None:
        return ""
    per = ", ".join(f"{row['steps']} steps {row['seconds_per_image']:g} s/image" for row in r["results"])
    return f"{per} at {r['resolution']}x{r['resolution']} ({r['sampler']}, CFG {r['guidance']:g}, {r['dtype']})"


def count(n: int) -> str:
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M"


def stage1_headline(r: dict | None, cuda: bool) -> str:
    if r is None:
        return ""
    first, resumed, c = r["first"], r["resumed"], r["checkpoint"]
    memory = "CUDA memory" if cuda else "RSS"
    return (f"{count(r['unet_params'])} U-Net, {r['precision'].split(' (')[0]}: {first['median_step_seconds']:g} "
            f"s/step ({first['images_per_second']:g} img/s, batch {r['batch']} at {r['resolution']}px), peak {memory} "
            f"{max(first['peak_memory_gb'], resumed['peak_memory_gb']):g} GB; checkpoint {c['shards']} shard(s) "
            f"{c['gb']:g} GB{'' if c['ema'] else ' (no EMA)'} saved in ~{first['after_last_step_seconds']:g} s; "
            f"resumed at step {resumed['start_step']} -> {resumed['end_step']}")  # fmt: skip


# ------------------------------------------------------------------------------------ the steps
def steps_for(device: str, out: Path, peak: tuple[str, float] | None) -> list[Step]:
    """The five steps' commands for ``cuda`` (paper shapes, bf16) or ``cpu`` (tiny configs, fp32)."""
    py = sys.executable
    cuda = device == "cuda"
    est = ESTIMATES[device]
    if cuda:
        tuned = ["--device", "cuda", "--dtype", "bfloat16", "--channels-last", "--compile", "--fused", "--tf32",
                 "--diffusers-eager", "--steps", "5", "--rounds", "3", "--warmup", "2"]  # fmt: skip
        tuned += ["--peak-flops", f"{peak[1]:g}"] if peak else []
        unet, autoencoder = ["--config", "paper_reduced", *tuned], ["--config", "paper", *tuned]
        sampling = ["--config", "paper_reduced", "--device", "cuda", "--dtype", "bfloat16", "--resolution", "1024",
                    "--images", "2"]  # fmt: skip
        stage1 = ["--scale", "paper", "--device", "cuda"]
    else:
        tiny = ["--config", "tiny", "--device", "cpu", "--steps", "1", "--rounds", "2", "--warmup", "1"]
        unet, autoencoder = tiny, tiny
        sampling = ["--config", "tiny", "--device", "cpu"]
        stage1 = ["--scale", "tiny", "--device", "cpu"]
    specs = [
        ("gpu_tests", "gpu tests (pytest -m gpu)", [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
         *GPU_TEST_FILES], tests_headline),
        ("unet_step", "U-Net training step vs diffusers", [py, str(BENCH / "unet_step.py"), *unet], training_headline),
        ("autoencoder_step", "autoencoder step vs diffusers", [py, str(BENCH / "autoencoder_step.py"), *autoencoder],
         training_headline),
        ("sampling", "sampling s/image", [py, str(BENCH / "sampling.py"), *sampling, "--steps", "50", "20"],
         sampling_headline),
        ("stage1_fsdp", "stage 1, trainer=fsdp, resume", [py, str(BENCH / "stage1_fsdp.py"), *stage1, "--out",
         str(out / "stage1_fsdp")], stage1_headline),
    ]  # fmt: skip
    return [Step(name, title, cmd, *est[name], headline) for name, title, cmd, headline in specs]


def run_command(command: list[str], box_s: float, log: Path) -> tuple[int | None, bool, str]:
    """Run ``command`` in its own process group from the repository root, output to ``log``; at ``box_s`` seconds
    the group is terminated (then killed). Returns ``(return code, timed out, output)``."""
    with open(log, "w") as f:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc, timed_out = proc.wait(timeout=box_s), False
        except subprocess.TimeoutExpired:
            timed_out, rc = True, None
            stop_group(proc)
    return rc, timed_out, log.read_text(errors="replace")


def stop_group(proc: subprocess.Popen, grace_s: float = KILL_GRACE_S) -> None:
    """SIGTERM to the step's process group (its children included), SIGKILL after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_steps(steps: list[Step], budget_s: float, logs: Path, cuda: bool, started: float = STARTED,
              clock: Callable[[], float] = time.monotonic) -> list[dict]:  # fmt: skip
    """Run or skip each step in turn within ``budget_s`` counted from ``started``; one record per step."""
    records = []
    for i, step in enumerate(steps, 1):
        left = time_left(budget_s, clock() - started)
        box, reason = plan(step.estimate_s, step.timeout_s, left)
        record = {"step": step.name, "title": step.title, "command": " ".join(step.command),
                  "estimate_s": step.estimate_s, "timeout_s": step.timeout_s, "left_s": round(left, 1)}  # fmt: skip
        if box is None:
            print(f"[{i}/{len(steps)}] {step.name}: {reason}", flush=True)
            records.append({**record, "status": reason, "seconds": None, "result": None, "headline": ""})
            continue
        print(f"[{i}/{len(steps)}] {step.name}: running (time box {box:.0f} s) ...", flush=True)
        log = logs / f"{step.name}.log"
        t0 = clock()
        rc, timed_out, output = run_command(step.command, box, log)
        seconds = clock() - t0
        is_tests = step.name == "gpu_tests"
        result = pytest_counts(output) if is_tests else last_json(output)
        status = outcome(rc, timed_out, box, output, needs_json=not is_tests)
        if is_tests and status == "ok" and (result is None or not sum(result.values())):
            status = "failed (no pytest summary line)"
        headline = step.headline(result, cuda) if result is not None and (status == "ok" or is_tests) else ""
        print(f"    {status} in {seconds:.1f} s{': ' + headline if headline else ''}", flush=True)
        records.append({**record, "status": status, "seconds": round(seconds, 1), "time_box_s": round(box, 1),
                        "rc": rc, "result": result, "headline": headline, "log": str(log),
                        "last_lines": [] if status == "ok" else last_lines(output, 20)})  # fmt: skip
    return records


# ------------------------------------------------------------------------------------ the machine
def nvidia_smi() -> str:
    """GPU name, driver and memory from ``nvidia-smi``, or why there is none."""
    if shutil.which("nvidia-smi") is None:
        return "nvidia-smi not found"
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)  # fmt: skip
    except subprocess.TimeoutExpired:
        return "nvidia-smi did not answer in 20 s"
    return r.stdout.strip() or f"nvidia-smi failed: {r.stderr.strip()[:200]}"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def environment(device: str, install_seconds: float | None) -> dict:
    """What the check ran on."""
    import torch

    env = {"date": datetime.date.today().isoformat(), "device_type": device, "python": platform.python_version(),
           "torch": torch.__version__, "cuda": torch.version.cuda, "cpu": f"{cpu_model()}, {os.cpu_count()} cores",
           "nvidia_smi": nvidia_smi(), "install_seconds": install_seconds}  # fmt: skip
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                   gpu_memory_gb=round(props.total_memory / 2**30, 1), capability=f"{props.major}.{props.minor}",
                   cudnn=torch.backends.cudnn.version())  # fmt: skip
    return env


def install_note(seconds: float | None) -> str:
    if seconds is None:
        return "not timed (`make gpu-check` times `make install`, bench/gpu_remote.sh its wheels)"
    return f"{seconds:.0f} s"


def describe_environment(env: dict, peak: tuple[str, float] | None) -> list[str]:
    lines = [f"device: {env.get('gpu', 'CPU (dry run on tiny configs)')}"
             + (f" x{env['gpu_count']}, {env['gpu_memory_gb']} GB, sm {env['capability']}" if "gpu" in env else ""),
             f"driver (nvidia-smi): {env['nvidia_smi']}",
             f"torch {env['torch']}, CUDA {env['cuda']}" + (f", cuDNN {env['cudnn']}" if env.get("cudnn") else ""),
             f"CPU: {env['cpu']}; python {env['python']}; {env['date']}",
             f"install before the check (make install, or gpu_remote.sh's wheels): "
             f"{install_note(env['install_seconds'])}"]  # fmt: skip
    if env["device_type"] == "cuda" and peak:
        lines.append(f"MFU peak: {peak[0]} bf16 dense {peak[1] / 1e12:.0f} TFLOP/s (bench/gpu_check.py's table)")
    elif env["device_type"] == "cuda":
        lines.append("MFU peak: the device is not in bench/gpu_check.py's table: Lightning's table is used, if any")
    return lines


# ------------------------------------------------------------------------------------ the report
def cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(records: list[dict], env_lines: list[str], budget_s: float, used_s: float) -> str:
    """The report: the machine, then one table (step, status, seconds, headline figures), then failure details."""
    lines = ["# GPU check", "", *(f"- {line}" for line in env_lines),
             f"- budget {budget_s:.0f} s, used {used_s:.0f} s", "",
             "| step | status | seconds | headline figures |", "| --- | --- | ---: | --- |"]  # fmt: skip
    for r in records:
        secs = "-" if r["seconds"] is None else f"{r['seconds']:.1f}"
        lines.append(f"| {cell(r['title'])} | {cell(r['status'])} | {secs} | {cell(r['headline']) or '-'} |")
    for r in records:
        if r.get("last_lines"):
            lines += ["", f"`{r['step']}` ({r['status'].split(' (')[0]}), last lines of {r['log']}:", "", "```",
                      *r["last_lines"], "```"]  # fmt: skip
    return "\n".join(lines) + "\n"


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch (use --device auto for the CPU dry run)")
    return requested


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="outputs/gpu_check", help="folder for gpu_check.json / .md and the logs")
    p.add_argument("--budget-min", type=float, default=None,
                   help="wall-time budget in minutes, counted from start (default: --call's, else 8)")  # fmt: skip
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto: cuda if available, else a CPU dry run on tiny configs")  # fmt: skip
    p.add_argument("--install-seconds", type=float, default=None, help="seconds of the install before the check")
    p.add_argument("--only", nargs="+", choices=STEP_NAMES, default=None, help="run only these steps (a rerun)")
    p.add_argument("--call", type=int, choices=sorted(DEVICE_CALLS), default=None,
                   help="one of the two device calls of a GPU loan: its budget and steps (DEVICE_CALLS)")  # fmt: skip
    args = p.parse_args(argv)
    call = DEVICE_CALLS.get(args.call)
    if args.budget_min is None:
        args.budget_min = call.budget_min if call else 8.0
    if args.only is None and call:
        args.only = list(call.steps)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device = resolve_device(args.device)
    out = Path(args.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    env = environment(device, args.install_seconds)
    peak = peak_for_device(env["gpu"]) if device == "cuda" else None
    env_lines = describe_environment(env, peak)
    print("\n".join(env_lines), flush=True)
    budget = args.budget_min * 60
    steps = [s for s in steps_for(device, out, peak) if args.only is None or s.name in args.only]
    records = run_steps(steps, budget, out / "logs", cuda=device == "cuda")
    used = time.monotonic() - STARTED
    report = {"environment": env, "mfu_peak": {"entry": peak[0], "flops": peak[1]} if peak else None,
              "call": args.call, "budget_s": budget, "used_s": round(used, 1), "steps": records}  # fmt: skip
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    md = markdown(records, env_lines, budget, used)
    (out / "gpu_check.md").write_text(md)
    print("\n" + md + f"\nwritten: {out / 'gpu_check.json'}, {out / 'gpu_check.md'}")
    return 1 if any(r["status"].startswith(("failed", "timeout")) for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())

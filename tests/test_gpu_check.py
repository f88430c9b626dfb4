"""bench/gpu_check.py: the time-box scheduling and the reading of results (pure functions, no subprocesses), then its
CPU dry run end to end (every step on tiny configs: the plumbing a GPU run will use) and with a budget nothing fits."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

import gpu_check

STEPS = ["gpu_tests", "unet_step", "autoencoder_step", "sampling", "stage1_fsdp"]


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------ scheduling
def test_plan_runs_a_step_that_fits_with_its_time_box_cut_to_the_time_left():
    assert gpu_check.plan(60, 150, 400, margin_s=5) == (150, "")
    assert gpu_check.plan(60, 150, 100, margin_s=5) == (95, "")  # never past the budget


def test_plan_skips_a_step_whose_estimate_exceeds_the_time_left():
    assert gpu_check.plan(200, 330, 120, margin_s=5) == (None, "skipped (would not fit: needs ~200 s, 120 s left)")
    assert gpu_check.plan(96, 330, 100, margin_s=5)[0] is None  # the margin for stopping a step counts
    assert gpu_check.plan(1, 10, -3)[1] == "skipped (would not fit: needs ~1 s, 0 s left)"


def _fake_steps(estimates: list[float]) -> list[gpu_check.Step]:
    return [gpu_check.Step(f"s{i}", f"step {i}", ["cmd", str(i)], e, 40, lambda r, cuda: f"x={r['x']}")
            for i, e in enumerate(estimates)]  # fmt: skip


def test_run_steps_skips_what_would_not_fit_and_boxes_what_runs(tmp_path, monkeypatch):
    """Each fake step takes 30 s of a fake clock; a budget of 100 s runs three and skips the fourth."""
    assert gpu_check.KILL_MARGIN_S == 8
    now, boxes = [0.0], []

    def fake_run(command, box_s, log):
        boxes.append(box_s)
        now[0] += 30
        return 0, False, 'some output\n{"x": 1}\n'

    monkeypatch.setattr(gpu_check, "run_command", fake_run)
    records = gpu_check.run_steps(_fake_steps([30, 30, 30, 30]), 100, tmp_path, cuda=False, started=0.0,
                                  clock=lambda: now[0])  # fmt: skip
    assert [r["status"] for r in records] == ["ok", "ok", "ok", "skipped (would not fit: needs ~30 s, 10 s left)"]
    assert boxes == [40, 40, 32]  # its own timeout, then cut to the time left less the margin for stopping it
    assert records[0]["headline"] == "x=1" and records[0]["result"] == {"x": 1}
    assert records[3]["seconds"] is None and records[3]["result"] is None


def test_run_steps_reports_timeouts_and_failures_with_their_last_lines(tmp_path, monkeypatch):
    outcomes = iter([(None, True, "started\n"), (2, False, "Traceback\nRuntimeError: boom\n"), (0, False, "no json")])
    monkeypatch.setattr(gpu_check, "run_command", lambda command, box_s, log: next(outcomes))
    records = gpu_check.run_steps(_fake_steps([1, 1, 1]), 1000, tmp_path, cuda=False, started=0.0, clock=lambda: 0.0)
    assert [r["status"] for r in records] == ["timeout (killed after 40 s)", "failed (rc 2: RuntimeError: boom)",
                                              "failed (rc 0 but no JSON result line)"]  # fmt: skip
    assert records[1]["last_lines"] == ["Traceback", "RuntimeError: boom"]
    md = gpu_check.markdown(records, ["device: test"], 1000, 3)
    assert "| step 1 | failed (rc 2: RuntimeError: boom) |" in md and "RuntimeError: boom\n```" in md


# ------------------------------------------------------------------------------------ reading results
@pytest.mark.parametrize(("name", "entry"), [("NVIDIA H100 80GB HBM3", ("H100 SXM", 989e12)),
                                             ("NVIDIA H100 PCIe", ("H100 PCIe", 756e12)),
                                             ("NVIDIA H100 NVL", ("H100 NVL", 835e12)),
                                             ("NVIDIA H200", ("H200", 989e12)),
                                             ("NVIDIA A100-SXM4-80GB", ("A100", 312e12)),
                                             ("NVIDIA GeForce RTX 4090", None)])  # fmt: skip
def test_peak_flops_table_by_device_name(name, entry):
    assert gpu_check.peak_for_device(name) == entry


def test_pytest_summary_counts():
    assert gpu_check.pytest_counts("....\n3 passed, 2 skipped, 248 deselected in 5.21s\n") == {
        "passed": 3, "skipped": 2, "deselected": 248}  # fmt: skip
    assert gpu_check.pytest_counts("=== 1 failed, 4 passed, 1 error in 3.0s ===") == {
        "failed": 1, "passed": 4, "errors": 1}  # fmt: skip
    assert gpu_check.pytest_counts("collected nothing") is None
    headline = gpu_check.tests_headline({"passed": 5, "failed": 1, "deselected": 9}, cuda=True)
    assert headline == "5 passed, 1 failed, 9 deselected (target: none failing: missed)"


def test_training_headline_judges_the_targets_on_cuda_only():
    r = {"ratio": 1.2, "batch": 8, "peak_flops": 989e12, "ours": {"images_per_second": 90.0, "ms_per_step": 88.9,
         "mfu": 0.35, "peak_memory_mb": 40960}, "diffusers": {"peak_memory_mb": 51200}}  # fmt: skip
    cuda = gpu_check.training_headline(r, cuda=True)
    assert "1.200x (target >= 1.15: met)" in cuda and "MFU 35.0% of 989 TFLOP/s (target >= 0.4: missed)" in cuda
    assert "peak memory ours 40.0 GB, diffusers 50.0 GB" in cuda
    assert "target" not in gpu_check.training_headline(r, cuda=False)


def test_stage1_checkpoint_leaves_the_ema_out_only_when_the_disk_is_short():
    import stage1_fsdp

    gb, params = 2**30, 10**9  # float32 weights + AdamW moments: 12 bytes a parameter, the EMA 4 more; 2 GB margin
    assert stage1_fsdp.keep_ema(params, 100 * gb) == (True, None)
    ema, note = stage1_fsdp.keep_ema(params, 15 * gb)
    assert not ema and note.startswith("EMA off")
    with pytest.raises(RuntimeError, match="free disk even without the EMA"):
        stage1_fsdp.keep_ema(params, 10 * gb)


# ------------------------------------------------------------------------------------ the CPU dry run
def _dry_run(out, budget_min: float) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "bench/gpu_check.py"), "--device", "cpu", "--out", str(out), "--budget-min",
           str(budget_min), "--install-seconds", "0"]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert (out / "gpu_check.json").is_file() and (out / "gpu_check.md").is_file(), r.stdout[-3000:] + r.stderr
    return r, json.loads((out / "gpu_check.json").read_text())


@pytest.mark.slow  # ~50 s: every step of the GPU check, dry, on the CPU
def test_cpu_dry_run_runs_every_step_and_writes_the_report(tmp_path):
    r, report = _dry_run(tmp_path, budget_min=5)
    steps = {s["step"]: s for s in report["steps"]}
    assert list(steps) == STEPS
    assert all(s["status"] == "ok" for s in steps.values()), {k: s["last_lines"] for k, s in steps.items()}
    assert r.returncode == 0 and report["used_s"] < report["budget_s"]
    assert report["environment"]["device_type"] == "cpu" and report["environment"]["install_seconds"] == 0
    assert all(s["seconds"] > 0 and s["headline"] for s in steps.values())

    tests = steps["gpu_tests"]["result"]  # only the gpu tests' file collected (GPU_TEST_FILES), skipped without CUDA
    assert tests["skipped"] >= 6 and not tests.get("passed") and not tests.get("failed") and not tests.get("errors")
    for name in ("unet_step", "autoencoder_step"):
        res = steps[name]["result"]
        assert res["config"] == "tiny" and res["ratio"] > 0 and res["ours"]["images_per_second"] > 0
    sampling = steps["sampling"]["result"]
    assert [row["steps"] for row in sampling["results"]] == [50, 20]
    assert all(row["seconds_per_image"] > 0 for row in sampling["results"])
    stage1 = steps["stage1_fsdp"]["result"]
    assert (stage1["first"]["end_step"], stage1["resumed"]["start_step"]) == (2, 2)
    assert stage1["checkpoint"]["shards"] == 1 and stage1["first"]["median_step_seconds"] > 0

    md = (tmp_path / "gpu_check.md").read_text()
    assert md.count("| ok |") == len(STEPS) and md in r.stdout  # the table is printed too


def test_a_budget_nothing_fits_in_skips_every_step(tmp_path):
    r, report = _dry_run(tmp_path, budget_min=0.01)
    assert r.returncode == 0  # skipped steps are reported, not failures
    assert [s["step"] for s in report["steps"]] == STEPS
    assert all(s["status"].startswith("skipped (would not fit: needs ~") for s in report["steps"])
    assert not (tmp_path / "logs" / "gpu_tests.log").exists()  # nothing was started

"""Faults lose nothing: kill -9 of the driver, concurrent drivers on one suite folder, a SLURM
node going down, `scontrol requeue`. Each cell ends with exactly one complete result and is
never trained to completion twice (``runs.log`` in each cell folder records every start/end)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import dispatch
from bench.suite import load_suite
from tests.test_dispatch import write_suite

ROOT = Path(__file__).resolve().parent.parent
# Four cells of ~10 epochs: long enough to be caught mid-training.
LONG = {"epochs": 10, "max_steps_per_epoch": 6}


def driver(suite: Path, out: Path, data_root: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "run_suite.py"), "run", str(suite), "--executor", "local", "--no-report",
            "--data-root", str(data_root), "--out", str(out), *extra]


def ends(cell_dir: Path) -> list[str]:
    log = cell_dir / "runs.log"
    return [line.split()[-1] for line in log.read_text().splitlines() if " end " in line] if log.exists() else []


def assert_every_cell_done_once(suite_dir: Path, expected_cells: int, epochs: int | None = None) -> None:
    cells = [p for p in suite_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(cells) == expected_cells
    for cell in cells:
        result = json.loads((cell / "result.json").read_text())
        assert result["status"] == "ok", (cell.name, result["reason"])
        if epochs:
            assert [e["epoch"] for e in result["epochs"]] == list(range(1, epochs + 1))
        assert ends(cell).count("ok") == 1, (cell.name, (cell / "runs.log").read_text())
        assert not list(cell.glob(".*.tmp")), "a temporary file was left behind"


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow  # kill-and-resume / a whole script: over 10 s on 2 cores; `make test` runs it
def test_driver_killed_mid_grid_resumes_and_skips_finished(tmp_path, synthetic_root):
    suite = write_suite(tmp_path, "killed", defaults=LONG)
    out, suite_dir = tmp_path / "results", tmp_path / "results" / "killed"
    child = subprocess.Popen(driver(suite, out, synthetic_root), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    # wait until one cell is finished and the next one has an epoch checkpoint, then kill -9
    wait_for(lambda: list(suite_dir.glob("*/result.json")) and list(suite_dir.glob("*/checkpoint.pt")),
             240, "a finished cell and a checkpoint")
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    finished = {p.parent.name: p.stat().st_mtime_ns for p in suite_dir.glob("*/result.json")}
    interrupted = {p.parent.name for p in suite_dir.glob("*/checkpoint.pt")} - set(finished)
    assert interrupted, "no cell was interrupted mid-training"
    for path in suite_dir.glob("*/result.json"):
        json.loads(path.read_text())  # never a partial file

    proc = subprocess.run(driver(suite, out, synthetic_root), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_every_cell_done_once(suite_dir, 4)
    for name, mtime in finished.items():
        assert (suite_dir / name / "result.json").stat().st_mtime_ns == mtime, f"{name} was rerun"
    for name in interrupted:
        result = json.loads((suite_dir / name / "result.json").read_text())
        assert result["measurements"]["resumed_from_epoch"] >= 1, f"{name} did not resume"
        assert [e["epoch"] for e in result["epochs"]] == list(range(1, LONG["epochs"] + 1))


@pytest.mark.slow  # kill-and-resume / a whole script: over 10 s on 2 cores; `make test` runs it
def test_concurrent_drivers_never_clobber_a_cell(tmp_path, synthetic_root):
    """Two drivers on overlapping grids of one suite folder: the cell lock lets one of them run
    each cell; the other skips it as running elsewhere or finds it finished."""
    suite = write_suite(tmp_path, "shared", defaults={"epochs": 3, "max_steps_per_epoch": 4})
    out, suite_dir = tmp_path / "results", tmp_path / "results" / "shared"
    first = subprocess.Popen(driver(suite, out, synthetic_root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    second = subprocess.Popen(driver(suite, out, synthetic_root, "--only", "seed=0"), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    outputs = [p.communicate(timeout=600)[0] for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, outputs
    assert_every_cell_done_once(suite_dir, 4)
    # a third run finds everything done and runs nothing
    third = subprocess.run(driver(suite, out, synthetic_root), capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and "nothing to run" in third.stdout, third.stdout
    assert_every_cell_done_once(suite_dir, 4)


# ---- on the local SLURM cluster ----------------------------------------------------------------

def node_name() -> str:
    return subprocess.run(["sinfo", "-h", "-o", "%N"], capture_output=True, text=True, check=True).stdout.split()[0]


def submit(tmp_path, name, synthetic_root, defaults) -> tuple[Path, Path]:
    suite = write_suite(tmp_path, name, defaults=defaults, resources={"timeout_min": 10})
    out, suite_dir = tmp_path / "results", tmp_path / "results" / name
    proc = subprocess.run([sys.executable, str(ROOT / "run_suite.py"), "run", str(suite), "--executor", "slurm",
                           "--data-root", str(synthetic_root), "--out", str(out)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return suite, suite_dir


def wait_for_suite(suite: Path, suite_dir: Path) -> None:
    cells = load_suite(suite).cells()
    dispatch.wait_for_jobs(cells, suite_dir, poll_s=1)


@pytest.mark.slurm
def test_node_down_and_resumed_loses_no_cell(slurm_cluster, tmp_path, synthetic_root):
    # long enough that the node goes down under running cells even on a fast idle machine
    suite, suite_dir = submit(tmp_path, "node_down", synthetic_root, {**LONG, "epochs": 40})
    node = node_name()
    wait_for(lambda: list(suite_dir.glob("*/checkpoint.pt")), 180, "a running cell with a checkpoint")
    try:
        subprocess.run(["scontrol", "update", f"nodename={node}", "state=down", "reason=fault-test"], check=True)
        time.sleep(5)  # jobs on the node are killed and requeued; queued ones wait
    finally:
        # ReturnToService=2 may already have brought the node back; resume is refused then
        subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], capture_output=True)
    wait_for_suite(suite, suite_dir)
    assert_every_cell_done_once(suite_dir, 4, epochs=40)
    restarted = [json.loads(p.read_text()) for p in suite_dir.glob("*/result.json")]
    assert any(int((r["slurm"] or {}).get("slurm_restart_count", 0)) >= 1 for r in restarted), \
        "no job was requeued by the node failure"


@pytest.mark.slurm
def test_scontrol_requeue_of_a_running_cell_ends_complete(slurm_cluster, tmp_path, synthetic_root):
    suite, suite_dir = submit(tmp_path, "requeued", synthetic_root, {**LONG, "epochs": 30})
    wait_for(lambda: list(suite_dir.glob("*/checkpoint.pt")), 180, "a running cell with a checkpoint")
    victim = next(suite_dir.glob("*/checkpoint.pt")).parent
    job_id = json.loads((victim / "job.json").read_text())["job_id"]
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    wait_for_suite(suite, suite_dir)
    assert_every_cell_done_once(suite_dir, 4)
    result = json.loads((victim / "result.json").read_text())
    assert int(result["slurm"]["slurm_restart_count"]) >= 1
    assert result["measurements"]["resumed_from_epoch"] >= 1
    assert [e["epoch"] for e in result["epochs"]] == list(range(1, 31))

"""`run --jobs N`: a worker that dies fails its own cell only; Ctrl-C stops the whole run at once."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


def _suite(tmp_path: Path, seeds: int, epochs: int) -> Path:
    suite = {"name": "par", "grid": {"method": ["linear_probe"], "seed": list(range(seeds))},
             "defaults": {"dataset": "synthetic", "backbone": "vit_test", "weights": None, "image_size": 32,
                          "embedding_size": 16, "epochs": epochs, "max_steps_per_epoch": 3, "batch_size": 8,
                          "samples_per_class": 2, "num_workers": 0, "device": "cpu", "eval_every": 1000,
                          "torch_threads": 1}}
    path = tmp_path / "par.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


def _start(path: Path, data: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "run_suite.py", "run", str(path), "--executor", "local", "--jobs", "2",
                             "--data-root", str(data), "--out", str(out), "--no-report"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _worker_pids(suite_dir: Path, driver: int, timeout: float = 90) -> dict[str, int]:
    """Cell folder -> pid of the worker process holding it (read from its lock file)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        pids = {}
        for lock in suite_dir.glob("*/.lock"):
            parts = lock.read_text().split()
            if len(parts) == 2 and int(parts[1]) != driver:
                pids[lock.parent.name] = int(parts[1])
        if len(pids) >= 2:
            return pids
        time.sleep(0.2)
    raise AssertionError(f"no two cells started in {timeout} s")


@pytest.mark.slow
def test_a_killed_worker_fails_its_own_cell_and_the_others_finish(synthetic_root, tmp_path):
    out = tmp_path / "out"
    driver = _start(_suite(tmp_path, seeds=3, epochs=60), synthetic_root, out)
    pids = _worker_pids(out / "par", driver.pid)
    victim, pid = sorted(pids.items())[0]
    os.kill(pid, signal.SIGKILL)
    output, _ = driver.communicate(timeout=300)
    assert driver.returncode == 1, output  # one failed cell
    assert "killed by SIGKILL" in output
    results = {p.parent.name: json.loads(p.read_text()) for p in (out / "par").glob("*/result.json")}
    assert victim not in results  # nothing written for it: a rerun resumes it from its checkpoint
    assert len(results) == 2 and all(r["status"] == "ok" for r in results.values())


@pytest.mark.slow
def test_ctrl_c_stops_the_running_cells_and_starts_no_other(synthetic_root, tmp_path):
    out = tmp_path / "out"
    driver = _start(_suite(tmp_path, seeds=5, epochs=400), synthetic_root, out)
    _worker_pids(out / "par", driver.pid)
    started = time.time()
    os.killpg(driver.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    output, _ = driver.communicate(timeout=60)
    assert time.time() - started < 30
    assert driver.returncode == 130, output
    assert "interrupted: 2 running cells stopped" in output and "3 not started" in output
    assert not list((out / "par").glob("*/result.json"))

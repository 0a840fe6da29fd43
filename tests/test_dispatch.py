"""Running suites: skipping finished cells, states from files, the local, debug and SLURM executors.

Tests marked ``slurm`` need the local one-node cluster (``bash scripts/slurm-local.sh up``); the
``slurm_cluster`` fixture skips them, with the reason in the summary, when it is not there.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

import run_suite
from bench import dispatch
from bench.dispatch import CellState
from bench.suite import SUITES_DIR, load_suite

# A cell that fails when it runs (not at load: a bad name would stop the whole suite): the
# synthetic test split cannot have R@500, which the runner finds before training.
BREAK_LINEAR_PROBE = {"when": {"method": "linear_probe"}, "set": {"recall_ks": [1, 500]}}


def write_suite(tmp_path: Path, name: str, *, defaults=None, resources=None, overrides=(), grid=None) -> Path:
    """The smoke suite under another name, with changes."""
    data = yaml.safe_load((SUITES_DIR / "smoke.yaml").read_text())
    data["name"] = name
    data["defaults"].update(defaults or {})
    data["resources"].update(resources or {})
    data["overrides"] = list(overrides)
    if grid is not None:
        data["grid"] = grid
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run(capsys, *argv) -> tuple[int, str]:
    code = run_suite.main(["run", *map(str, argv)])
    return code, capsys.readouterr().out


def status(capsys, suite, out) -> str:
    assert run_suite.main(["status", str(suite), "--out", str(out)]) == 0
    return capsys.readouterr().out


def results_of(suite_dir: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in suite_dir.glob("*/result.json")}


def mtimes(suite_dir: Path) -> dict[str, float]:
    return {p.parent.name: p.stat().st_mtime_ns for p in suite_dir.glob("*/result.json")}


# ---- without a cluster ------------------------------------------------------------------------


def test_local_run_skips_done_and_failed_cells_and_reruns_what_is_missing(tmp_path, synthetic_root, capsys):
    path = write_suite(tmp_path, "local", overrides=[BREAK_LINEAR_PROBE])
    out, suite_dir = tmp_path / "results", tmp_path / "results" / "local"
    common = (path, "--executor", "local", "--data-root", synthetic_root, "--out", out, "--no-report")

    code, text = run(capsys, *common)
    assert code == 1  # one cell failed
    results = results_of(suite_dir)
    assert sorted(r["status"] for r in results.values()) == ["failed", "ok", "ok", "ok"]
    failed = next(r for r in results.values() if r["status"] == "failed")
    assert failed["key"]["method"] == "linear_probe" and "recall@500" in failed["reason"]
    expected = [{"cell_id": c.cell_id, "key": c.key} for c in load_suite(path).cells()]
    written = json.loads((suite_dir / "cells.json").read_text())
    assert written["suite_file"] == str(path.resolve())
    assert [{k: c[k] for k in ("cell_id", "key")} for c in written["cells"]] == expected

    listing = status(capsys, path, out)
    assert "4 cells: 3 done, 1 failed" in listing and "recall@500" in listing

    before = mtimes(suite_dir)
    code, text = run(capsys, *common)
    assert code == 0 and "nothing to run" in text and "1 cells failed: skipped" in text
    assert mtimes(suite_dir) == before

    gone = next(cell for cell, r in results.items() if r["key"]["method"] == "bitfit")
    (suite_dir / gone / "result.json").unlink()
    code, text = run(capsys, *common)
    after = mtimes(suite_dir)
    assert {c for c in after if after[c] != before.get(c)} == {gone}
    assert results_of(suite_dir)[gone]["status"] == "ok"


def test_debug_executor_runs_cells_in_this_process(tmp_path, synthetic_root, capsys):
    code, _ = run(capsys, "smoke", "--executor", "debug", "--only", "method=linear_probe",
                  "--data-root", synthetic_root, "--out", tmp_path)
    assert code == 0
    (result,) = results_of(tmp_path / "smoke").values()
    assert result["status"] == "ok" and result["key"]["method"] == "linear_probe"


def test_states_come_from_result_files_locks_and_slurm_job_files(tmp_path, monkeypatch):
    suite = load_suite("smoke", check_methods=False)
    done, failed, queued, lost, never = suite.cells()[:4] + [None]
    suite_dir = tmp_path / "smoke"
    for cell, status_ in ((done, "ok"), (failed, "failed")):
        (suite_dir / cell.cell_id).mkdir(parents=True)
        (suite_dir / cell.cell_id / "result.json").write_text(json.dumps(
            {"status": status_, "reason": "NaN loss at epoch 2" if status_ == "failed" else None,
             "cell_id": cell.cell_id, "suite": "smoke", "final": {"test": {"recall@1": 0.5}}}))
    for cell, job_id in ((queued, "41_2"), (lost, "41_3")):
        (suite_dir / cell.cell_id).mkdir(parents=True)
        (suite_dir / cell.cell_id / "job.json").write_text(json.dumps({"job_id": job_id, "log": "x.out"}))
    monkeypatch.setattr(dispatch, "slurm_job_states", lambda ids: {"41_2": "PENDING", "41_3": "TIMEOUT"})
    states = dispatch.collect_states(suite.cells(), suite_dir)
    assert states[done.cell_id] == CellState("done", "R@1 50.0")
    assert states[failed.cell_id] == CellState("failed", "NaN loss at epoch 2")
    assert states[queued.cell_id] == CellState("queued", "job 41_2 pending")
    assert states[lost.cell_id].state == "pending" and "41_3 ended (timeout) without a result" in states[lost.cell_id].detail

    todo, skipped = dispatch.select_cells(suite.cells(), states, rerun_failed=True, fresh=False)
    assert [c.cell_id for c in todo] == [failed.cell_id, lost.cell_id]
    assert sum(skipped.values()) == 2


def test_squeue_and_sacct_states_are_parsed():
    assert dispatch._parse_states("12_0|RUNNING\n12_1|CANCELLED by 0\n\n13|COMPLETED\n") == {
        "12_0": "RUNNING", "12_1": "CANCELLED", "13": "COMPLETED"}


def test_a_requeued_task_resumes_even_when_the_first_start_was_fresh(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr("bench.runner.run_cell", lambda config, cell_dir, *, key, fresh, progress: calls.append(fresh)
                        or {"status": "ok", "reason": None})
    job = dispatch.CellJob()
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert job("config", str(tmp_path), {}, True) == {"status": "ok", "reason": None}
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    job("config", str(tmp_path), {}, True)
    assert calls == [True, False]
    # submitit's requeue on timeout/preemption resubmits the very same call
    assert job.checkpoint("config", str(tmp_path), {}, True).args == ("config", str(tmp_path), {}, True)


# ---- on the local SLURM cluster ---------------------------------------------------------------


@pytest.fixture
def fast_wait(monkeypatch):
    monkeypatch.setenv("BENCH_SLURM_POLL_S", "1")  # the one-node test cluster answers at once


@pytest.mark.slurm
def test_smoke_suite_through_a_slurm_job_array(slurm_cluster, fast_wait, tmp_path, synthetic_root, capsys):
    path = write_suite(tmp_path, "smoke_slurm", overrides=[BREAK_LINEAR_PROBE])
    out, suite_dir = tmp_path / "results", tmp_path / "results" / "smoke_slurm"
    common = (path, "--executor", "slurm", "--data-root", synthetic_root, "--out", out)

    code, text = run(capsys, *common, "--wait")
    assert "submitted 4 cells" in text
    assert code == 1  # the broken cell
    results = results_of(suite_dir)
    assert sorted(r["status"] for r in results.values()) == ["failed", "ok", "ok", "ok"]
    array_ids = {r["slurm"]["slurm_array_job_id"] for r in results.values()}
    assert len(array_ids) == 1  # one job array, one task per cell
    assert {r["slurm"]["slurm_array_task_id"] for r in results.values()} == {"0", "1", "2", "3"}
    listing = status(capsys, path, out)
    assert "3 done, 1 failed" in listing
    assert re.search(r"linear_probe.*failed.*recall@500", listing)

    jobs_before = {p.parent.name: p.read_text() for p in suite_dir.glob("*/job.json")}
    code, text = run(capsys, *common, "--wait")
    assert code == 0 and "nothing to run" in text and "submitted" not in text
    assert {p.parent.name: p.read_text() for p in suite_dir.glob("*/job.json")} == jobs_before

    gone = next(cell for cell, r in results.items() if r["key"]["method"] == "vpt_deep")
    (suite_dir / gone / "result.json").unlink()
    before = mtimes(suite_dir)
    code, text = run(capsys, *common, "--wait")
    assert code == 0 and "submitted 1 cells" in text
    after = mtimes(suite_dir)
    assert {c for c in after if after[c] != before.get(c)} == {gone}
    resubmitted = {p.parent.name for p in suite_dir.glob("*/job.json") if p.read_text() != jobs_before[p.parent.name]}
    assert resubmitted == {gone}


def one_cell_suite(tmp_path: Path, name: str, epochs: int, steps: int, **resources) -> Path:
    return write_suite(tmp_path, name, defaults={"epochs": epochs, "max_steps_per_epoch": steps},
                       resources={"timeout_min": 10, **resources},
                       grid={"method": [{"name": "vpt_deep", "args": {"num_prompts": 2, "prompt_depth": 2}}],
                             "seed": [0]})


def seconds_per_epoch(tmp_path: Path, data_root: Path, steps: int) -> float:
    """Wall seconds of one epoch of `one_cell_suite`'s cell on this machine, now."""
    from bench.runner import run_cell

    (cell,) = load_suite(one_cell_suite(tmp_path, "calibrate", 2, steps)).cells(data_root=str(data_root))
    result = run_cell(cell.config, tmp_path / "calibrate-cell", key=cell.key)
    assert result["status"] == "ok", result["reason"]
    # training and evaluation only: start-up (imports, data index, model) is paid once per run
    training = sum(e["time_s"] for e in result["epochs"]) + result["measurements"]["eval_time_s"]
    return training / len(result["epochs"])


def wait_for_log(log: Path, pattern: str, timeout_s: float) -> str:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        text = log.read_text() if log.exists() else ""
        if re.search(pattern, text):
            return text
        time.sleep(0.2)
    raise AssertionError(f"{pattern!r} not in {log} after {timeout_s} s:\n{text}")


def job_state(job_id: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout.strip()
    return out or "GONE"


def slurm_task_pids(job_id: str) -> list[int]:
    """The pids of the Python processes of a SLURM job's tasks on this (the only) node."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            command = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        program, *arguments = command.split(b"\0")
        if (f"SLURM_JOB_ID={job_id}".encode() in env and b"python" in Path(program.decode()).name.encode()
                and b"submitit.core._submit" in arguments):  # not srun, whose arguments name it too
            pids.append(int(proc.name))
    return pids


def assert_resumed_and_complete(suite_dir: Path, epochs: int) -> str:
    (result,) = results_of(suite_dir).values()
    assert result["status"] == "ok", result["reason"]
    assert [e["epoch"] for e in result["epochs"]] == list(range(1, epochs + 1))  # each epoch once
    assert int(result["slurm"]["slurm_restart_count"]) >= 1
    log = Path(json.loads(next(suite_dir.glob("*/job.json")).read_text())["log"]).read_text()
    ends = re.findall(r"epoch_end (\d+)", log)
    assert sorted(map(int, ends)) == list(range(1, epochs + 1)), log  # no epoch trained twice to its end
    assert re.search(r"cell_start epoch \d+ of \d+ \(resumed after epoch [1-9]", log), log
    return log


@pytest.mark.slurm
def test_preempted_cell_is_requeued_and_resumes_from_its_last_epoch(slurm_cluster, fast_wait, tmp_path,
                                                                     synthetic_root, capsys):
    epochs = 16  # the signal must find the job still training: ~0.3-1.5 s per epoch here
    path = one_cell_suite(tmp_path, "preempt", epochs, steps=10)
    out, suite_dir = tmp_path / "results", tmp_path / "results" / "preempt"
    code, _ = run(capsys, path, "--executor", "slurm", "--data-root", synthetic_root, "--out", out)
    assert code == 0
    job = json.loads(next(suite_dir.glob("*/job.json")).read_text())
    wait_for_log(Path(job["log"]), r"epoch_end 2\b", timeout_s=120)
    # what SLURM sends a checkpointable job before preempting it: submitit checkpoints and requeues
    subprocess.run(["scancel", "--signal=USR2", job["job_id"]], check=True)
    cells = load_suite(path).cells()
    assert all(s.state == "done" for s in dispatch.wait_for_jobs(cells, suite_dir, poll_s=1).values())
    log = assert_resumed_and_complete(suite_dir, epochs)
    assert "Requeued job" in log


@pytest.mark.slurm
@pytest.mark.parametrize("resources, tasks", [
    ({"gpus_per_node": 4}, {"gpus_per_node": 4, "nodes": 1, "ntasks_per_node": 4}),  # one rank per GPU
    ({"gpus_per_node": 4, "nodes": 2}, {"gpus_per_node": 4, "nodes": 2, "ntasks_per_node": 4}),
    ({"gpus_per_node": 4, "ranks_per_node": 2}, {"gpus_per_node": 4, "nodes": 1, "ntasks_per_node": 2}),
    ({"gpus_per_node": 1}, {"gpus_per_node": 1}),  # one process: no task parameters at all
    ({"gpus_per_node": 0}, {}),
])
def test_a_cells_ranks_become_slurm_tasks(slurm_cluster, tmp_path, resources, tasks):
    suite = load_suite(SUITES_DIR / "smoke.yaml")
    executor = dispatch.make_executor("slurm", tmp_path, suite, {"timeout_min": 10, **resources})
    parameters = executor._executor.parameters
    assert {k: parameters[k] for k in ("gpus_per_node", "nodes", "ntasks_per_node") if k in parameters} == tasks


@pytest.mark.slurm
@pytest.mark.slow  # a two-task job, stopped and requeued: 30-60 s
@pytest.mark.parametrize("stop", ["preempted", "killed", "one rank killed"])
def test_a_cell_on_two_slurm_tasks_is_stopped_requeued_and_ends_as_one_process(stop, slurm_cluster, fast_wait,
                                                                              tmp_path, synthetic_root, capsys):
    """``resources.ranks_per_node: 2``: one cell as two SLURM tasks (gloo on the CPU), wired by
    submitit's TorchDistributedEnvironment. Preempted (USR2) mid-epoch: every rank stops at the
    same step, rank 0 checkpoints there, submitit requeues. Killed (``scontrol requeue``): both
    tasks die at once, SLURM requeues. One rank killed: rank 0 fails the cell naming it (its
    heartbeat ended), the job ends, a requeue reruns the cell. Every way the requeued ranks
    resume from the one checkpoint and end with the one-process cell's numbers."""
    from bench.runner import run_cell

    epochs = 12
    path = write_suite(tmp_path, "two_ranks", defaults={"epochs": epochs, "max_steps_per_epoch": 10,
                                                        "optimizer": "sgd", "lr": 1e-2, "torch_threads": 1},
                       resources={"timeout_min": 10, "ranks_per_node": 2, "cpus_per_task": 1},
                       grid={"method": [{"name": "vpt_deep", "args": {"num_prompts": 2, "prompt_depth": 2}}],
                             "seed": [0]})
    (cell,) = load_suite(path).cells(data_root=str(synthetic_root))
    expected = run_cell(cell.config, tmp_path / "one-process", key=cell.key)
    assert expected["status"] == "ok", expected["reason"]

    out, suite_dir = tmp_path / "results", tmp_path / "results" / "two_ranks"
    code, text = run(capsys, path, "--executor", "slurm", "--data-root", synthetic_root, "--out", out)
    assert code == 0, text
    job = json.loads(next(suite_dir.glob("*/job.json")).read_text())
    wait_for_log(Path(job["log"]), r"epoch_end 2\b", timeout_s=120)
    if stop == "preempted":
        subprocess.run(["scancel", "--signal=USR2", job["job_id"]], check=True)
    elif stop == "killed":  # both ranks die at once (a node crash), then SLURM requeues the job
        tasks = slurm_task_pids(job["job_id"])
        assert len(tasks) == 2, tasks
        for pid in tasks:
            os.kill(pid, signal.SIGKILL)
        subprocess.run(["scontrol", "requeue", job["job_id"]], check=True)
    else:  # rank 1 alone dies (the OOM killer): rank 0 says which, and the cell fails
        rank1 = [pid for pid in slurm_task_pids(job["job_id"]) if b"SLURM_PROCID=1" in
                 Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")]
        assert len(rank1) == 1, rank1
        os.kill(rank1[0], signal.SIGKILL)
        result_path = next(suite_dir.glob("*/job.json")).parent / "result.json"
        deadline = time.time() + 60
        while not result_path.exists() and time.time() < deadline:
            time.sleep(0.2)
        failed = json.loads(result_path.read_text())
        assert failed["status"] == "failed" and "rank 1 stopped answering" in failed["reason"], failed["reason"]
        assert list(result_path.parent.glob("checkpoint.pt"))
        while job_state(job["job_id"]) in ("RUNNING", "COMPLETING") and time.time() < deadline:
            time.sleep(0.5)
        subprocess.run(["scontrol", "requeue", job["job_id"]], check=True)
    assert all(s.state == "done" for s in dispatch.wait_for_jobs([cell], suite_dir, poll_s=1).values())
    log = assert_resumed_and_complete(suite_dir, epochs)
    assert ("Requeued job" in log) == (stop == "preempted")  # submitit's requeue, or SLURM's own
    if stop == "one rank killed":
        assert len(list(next(suite_dir.glob("*/job.json")).parent.glob("result.json.failed-*"))) == 1
    (result,) = results_of(suite_dir).values()
    assert result["measurements"]["world_size"] == 2 and result["measurements"]["batch_per_rank"] == 4
    assert result["final"] == expected["final"]
    assert [e["train_loss"] for e in result["epochs"]] == pytest.approx(
        [e["train_loss"] for e in expected["epochs"]], rel=1e-5)


@pytest.mark.slurm
@pytest.mark.slow
def test_cell_longer_than_its_time_limit_is_requeued_until_done(slurm_cluster, fast_wait, tmp_path,
                                                                 synthetic_root, capsys):
    # The cell must outlast the 1-minute limit on any machine: time two epochs here first and
    # ask for ~150 s of training. SLURM checks time limits every 30 s and signals up to one
    # period ahead: USR2 comes 20-50 s into each run, before the kill at 60-90 s.
    epochs = max(20, int(150 / seconds_per_epoch(tmp_path, synthetic_root, steps=20)))
    path = one_cell_suite(tmp_path, "time_limit", epochs, steps=20, timeout_min=1, signal_delay_s=10,
                          max_num_timeout=20)
    out, suite_dir = tmp_path / "results", tmp_path / "results" / "time_limit"
    code, text = run(capsys, path, "--executor", "slurm", "--data-root", synthetic_root, "--out", out, "--wait")
    assert code == 0, text
    log = assert_resumed_and_complete(suite_dir, epochs)
    assert "this job is timed-out" in log

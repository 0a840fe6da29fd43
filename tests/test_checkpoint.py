"""Checkpoints that scale (issue 18): big tables in safetensors beside a small checkpoint,
written so that a crash between the two leaves the previous epoch loadable; checkpoint_every,
checkpoint_minutes and the SLURM stop signal, with resumes that end exactly as uninterrupted runs."""
from __future__ import annotations

import os
import signal

import pytest
import torch

from bench import checkpoint
from bench.config import CellConfig
from bench.runner import run_cell
from tests.tiny import tiny_config

TINY = tiny_config(epochs=3, max_steps_per_epoch=4, method="vptsp_g", method_args={
    "num_prompts": 2, "prompt_depth": 2, "num_class_prompts": 1, "class_prompt_depth": 2, "class_prompt_offload": "cpu"})


class Stop(Exception):
    pass


def config(synthetic_root, **extra) -> CellConfig:
    return CellConfig(dataset="synthetic", data_root=str(synthetic_root), **{**TINY, **extra})


def outcome(result: dict) -> tuple:
    assert result["status"] == "ok", result["reason"]
    return result["final"]["test"], [e["train_loss"] for e in result["epochs"]]


def stop_at(epoch: int, step: int | None = None):
    def listener(event):
        if event["event"] == "epoch_end" and step is None and event["epoch"] == epoch:
            raise Stop
        if event["event"] == "step" and step is not None and (event["epoch"], event["step"]) == (epoch, step):
            raise Stop
    return listener


@pytest.fixture
def small_tables(monkeypatch):
    monkeypatch.setattr(checkpoint, "TABLE_BYTES", 1024)  # the test's class prompts count as big tables


@pytest.fixture(scope="module")
def uninterrupted(synthetic_root, tmp_path_factory):
    return outcome(run_cell(config(synthetic_root), tmp_path_factory.mktemp("whole") / "cell", key={}))


def test_tables_go_to_safetensors_and_a_crash_resumes_to_the_same_result(synthetic_root, tmp_path, small_tables,
                                                                        uninterrupted):
    cell = tmp_path / "cell"
    assert run_cell(config(synthetic_root), cell, key={}, progress=stop_at(2))["status"] == "failed"
    (tables,) = cell.glob("checkpoint.tables.*.safetensors")
    small = torch.load(cell / "checkpoint.pt", weights_only=True)
    assert small["__tables__"]["file"] == tables.name and small["epoch"] == 2
    from safetensors import safe_open

    with safe_open(str(tables), framework="pt") as f:
        assert any("class_prompts.table.weight" in key for key in f.keys())
        assert any("exp_avg" in key for key in f.keys())  # SparseAdamW's state of the table
    assert outcome(run_cell(config(synthetic_root), cell, key={})) == uninterrupted
    assert not list(cell.glob("checkpoint*"))


def test_a_crash_between_the_two_writes_leaves_the_previous_epoch_loadable(synthetic_root, tmp_path, small_tables,
                                                                          monkeypatch):
    cell = tmp_path / "cell"
    run_cell(config(synthetic_root), cell, key={}, progress=stop_at(1))
    first_tables = {p.name for p in cell.glob("checkpoint.tables.*")}
    real = checkpoint.atomic_write_bytes
    monkeypatch.setattr(checkpoint, "atomic_write_bytes", lambda path, data: (_ for _ in ()).throw(Stop()))
    assert run_cell(config(synthetic_root), cell, key={})["status"] == "failed"  # died writing epoch 2's
    monkeypatch.setattr(checkpoint, "atomic_write_bytes", real)
    assert first_tables <= {p.name for p in cell.glob("checkpoint.tables.*")}
    state = checkpoint.load_checkpoint(cell, torch.load(cell / "checkpoint.pt", weights_only=True)["identity"],
                                       lambda e: pytest.fail(e["text"]))
    assert state["epoch"] == 1 and "learner" in state


def test_checkpoint_every_saves_only_those_epochs(synthetic_root, tmp_path):
    cell = tmp_path / "cell"
    run_cell(config(synthetic_root, checkpoint_every=2), cell, key={}, progress=stop_at(1))
    assert not (cell / "checkpoint.pt").exists()
    run_cell(config(synthetic_root, checkpoint_every=2), cell, key={}, progress=stop_at(3, step=1))
    assert torch.load(cell / "checkpoint.pt", weights_only=True)["epoch"] == 2


def test_checkpoint_minutes_saves_inside_an_epoch_and_resumes_exactly(synthetic_root, tmp_path, uninterrupted):
    cell = tmp_path / "cell"
    cfg = config(synthetic_root, checkpoint_minutes=1e-9)  # every step
    assert run_cell(cfg, cell, key={}, progress=stop_at(2, step=3))["status"] == "failed"
    state = torch.load(cell / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 2)  # epoch 2's first two steps are in it (it stopped in the 3rd)
    assert outcome(run_cell(cfg, cell, key={})) == uninterrupted


def test_the_slurm_stop_signal_checkpoints_first_then_hands_over(synthetic_root, tmp_path, uninterrupted):
    cell = tmp_path / "cell"
    handed = []

    def submitit_handler(signum, frame):  # what submitit installs: requeue, then exit
        handed.append(signum)
        raise Stop

    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        def send(event):
            if event["event"] == "step" and (event["epoch"], event["step"]) == (2, 2):
                os.kill(os.getpid(), signal.SIGUSR2)
        result = run_cell(config(synthetic_root), cell, key={}, progress=send)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert handed == [signal.SIGUSR2] and result["status"] == "failed"
    state = torch.load(cell / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 2)
    assert outcome(run_cell(config(synthetic_root), cell, key={})) == uninterrupted


def test_augmentation_does_not_depend_on_the_worker_count(synthetic_root, tmp_path):
    a = outcome(run_cell(config(synthetic_root, num_workers=0), tmp_path / "a", key={}))
    b = outcome(run_cell(config(synthetic_root, num_workers=2), tmp_path / "b", key={}))
    assert a == b


def _saved_tables(cell, small_tables):
    """A checkpoint with one big learner table and one big optimiser tensor; their values."""
    torch.manual_seed(0)
    table, moment = torch.randn(64, 8), torch.rand(64, 8)
    checkpoint.save_checkpoint(cell, {"identity": "x", "epoch": 1, "learner": {"table": table, "bias": torch.ones(3)},
                                      "optimizers": [{"state": {0: {"exp_avg": moment}}}]})
    return table, moment


def test_a_table_is_read_straight_into_the_models_tensor(tmp_path, small_tables):
    table, moment = _saved_tables(tmp_path, small_tables)
    destination = torch.zeros(64, 8)
    pointer = destination.data_ptr()
    state = checkpoint.load_checkpoint(tmp_path, "x", lambda e: pytest.fail(e["text"]),
                                       into={"learner": {"table": destination}})
    assert state["learner"]["table"] is destination and destination.data_ptr() == pointer  # no second copy
    assert torch.equal(destination, table)
    assert torch.equal(state["optimizers"][0]["state"][0]["exp_avg"], moment)  # no destination: a tensor of its own
    assert torch.equal(state["learner"]["bias"], torch.ones(3))  # small: in checkpoint.pt
    # a destination of another shape or dtype: a checkpoint of another model, refused before any
    # byte is written, and moved aside so that the next run starts clean
    other = torch.zeros(64, 8, dtype=torch.float64)
    notes = []
    state = checkpoint.load_checkpoint(tmp_path, "x", notes.append, into={"learner": {"table": other}})
    assert state is None and not other.any() and "checkpoint of another model" in notes[0]["text"]
    assert not (tmp_path / "checkpoint.pt").exists()


def test_a_tables_file_of_another_run_is_refused_by_its_hash(tmp_path, small_tables):
    """Same names, shapes and dtypes, other numbers (another seed's file under this name)."""
    from safetensors.torch import load_file, save_file

    _saved_tables(tmp_path, small_tables)
    (tables,) = tmp_path.glob("checkpoint.tables.*.safetensors")
    content = {k: v + 1 for k, v in load_file(str(tables)).items()}
    save_file(content, str(tables))
    destination = torch.full((64, 8), 7.0)
    notes = []
    state = checkpoint.load_checkpoint(tmp_path, "x", notes.append, into={"learner": {"table": destination}})
    assert state is None and torch.all(destination == 7.0)  # the model untouched, restart from epoch 0
    assert "does not match the hash" in notes[0]["text"] and not (tmp_path / "checkpoint.pt").exists()


def test_a_cut_short_tables_file_is_found_before_the_model_is_touched(tmp_path, small_tables):
    _saved_tables(tmp_path, small_tables)
    (tables,) = tmp_path.glob("checkpoint.tables.*.safetensors")
    tables.write_bytes(tables.read_bytes()[:-100])
    destination = torch.full((64, 8), 7.0)
    notes = []
    state = checkpoint.load_checkpoint(tmp_path, "x", notes.append, into={"learner": {"table": destination}})
    assert state is None and torch.all(destination == 7.0)  # restarts from epoch 0 with the model as it was
    assert "cut short" in notes[0]["text"] and not (tmp_path / "checkpoint.pt").exists()


def test_a_read_that_fails_inside_the_model_fails_the_cell_instead_of_restarting(tmp_path, small_tables,
                                                                                monkeypatch):
    _saved_tables(tmp_path, small_tables)
    real = checkpoint.read_tensor

    def failing(handle, entry, start, out=None):
        if out is not None:
            out.fill_(1.0)  # part of the table already landed
            raise OSError(5, "Input/output error")
        return real(handle, entry, start, out)

    monkeypatch.setattr(checkpoint, "read_tensor", failing)
    with pytest.raises(checkpoint.ResumeFailure, match="rerun the cell"):
        checkpoint.load_checkpoint(tmp_path, "x", lambda e: None, into={"learner": {"table": torch.zeros(64, 8)}})
    assert not (tmp_path / "checkpoint.pt").exists()  # moved aside: the rerun starts from epoch 0

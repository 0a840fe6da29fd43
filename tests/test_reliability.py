"""Nothing silently wrong, nothing lost: one test per finding of the new-user and adversarial
trials (issue 20, numbered as there). Each failed before its fix. Listed in TESTING.md."""
from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import peft_dml_cli as cli
from bench import dispatch, results
from bench.config import CellConfig
from bench.data import load_dataset, make_synthetic_dataset
from bench.errors import UserError
from bench.suite import SuiteError, load_suite
from tests import layouts
from tests import report_fixtures as fx
from tests.tiny import tiny_config

ROOT = Path(__file__).resolve().parent.parent
TINY = tiny_config(max_steps_per_epoch=2, eval_batch_size=64)


def main(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_suite(tmp_path: Path, name: str, grid: dict, **extra) -> Path:
    data = {"name": name, "grid": grid, "defaults": {"dataset": "synthetic", **TINY}, **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_synthetic_dataset(root / "synthetic", num_classes=8, images_per_class=12, image_size=32)
    return root


def local_run(capsys, suite: Path, data: Path, out: Path, *extra) -> tuple[int, str, str]:
    return main(capsys, "run", suite, "--executor", "local", "--data-root", data, "--out", out, "--no-report", *extra)


def ok_results(suite_dir: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in suite_dir.glob("*/result.json")}


# --- silently wrong --------------------------------------------------------------------------

def test_1_numeric_class_folders_sort_numerically_text_names_as_text(tmp_path):
    layouts.make_class_folders(tmp_path / "cars196", [str(i) for i in range(1, 197)])
    splits = load_dataset("cars196", tmp_path)
    assert splits.train.class_names == [str(i) for i in range(1, 99)]
    assert splits.test.class_names[:3] == ["99", "100", "101"]
    text = layouts.make_cars196(tmp_path / "text" / "cars196")
    names = sorted(p.name for p in (text / "images").iterdir())
    assert load_dataset("cars196", tmp_path / "text").train.class_names == names[:98]


def test_2_every_cell_prints_and_records_its_split_summary(data, tmp_path, capsys):
    code, out, _ = main(capsys, "cell", "--dataset", "synthetic", "--data-root", data, "--backbone", "vit_test",
                        "--weights", "none", "--epochs", "1", "--out", tmp_path, *sum((["--set", f"{k}={v}"] for k, v in
                        TINY.items() if k not in ("backbone", "weights", "epochs")), []))
    assert code == 0
    assert "data synthetic" in out and "train 4 classes / 48 images (001.class_0000 .. 004.class_0003)" in out
    (result,) = ok_results(tmp_path / "adhoc").values()
    assert result["data"]["splits"]["test"] == {"classes": 4, "images": 48, "first_class": "005.class_0004",
                                                "last_class": "008.class_0007"}
    assert result["data"]["lone_queries"] == 0


def test_3_local_cells_measure_their_own_memory(data, tmp_path, capsys):
    # full fine-tuning first: the linear probe after it must not inherit its peak
    suite = write_suite(tmp_path, "memory", {"method": ["full_ft", "linear_probe"], "seed": [0]})
    assert local_run(capsys, suite, data, tmp_path / "out")[0] == 0
    memory = {r["config"]["method"]: r["measurements"] for r in ok_results(tmp_path / "out" / "memory").values()}
    assert memory["full_ft"]["memory_kind"] == "counted_training"
    assert memory["linear_probe"]["peak_memory_bytes"] < memory["full_ft"]["peak_memory_bytes"]
    assert memory["linear_probe"]["process_peak_rss_bytes"] > 0  # kept, as what it is


def sweep_suite(root: Path, with_validation: bool) -> Path:
    """An lr sweep where the best validation row is not the best test row."""
    suite_dir = root / "ablation_lr"
    for lr, test_r1, val_r1 in ((1e-4, 0.80, 0.70), (1e-3, 0.75, 0.78), (1e-2, 0.60, 0.50)):
        key = {"dataset": "cub200", "backbone": fx.VIT_S, "method": "vpt_deep", "seed": 0, "lr": lr}
        data = fx.result(key, test_r1, 0.4)
        if with_validation:
            data["final"]["val"] = {"recall@1": val_r1, "map@r": 0.3}
            data["final"]["selection"] = "val"
        fx.write(suite_dir, data)
    return suite_dir


@pytest.mark.parametrize("with_validation", [True, False])
def test_4_sweep_tables_bold_the_validation_choice_or_say_it_is_on_test(tmp_path, with_validation):
    from report.load import load_suite as load_results
    from report.render import to_markdown
    from report.tables import build_table

    table = build_table(load_results(sweep_suite(tmp_path, with_validation)), "ablation")
    text = to_markdown(table)
    bolded = [line for line in text.splitlines() if "**" in line and line.startswith("| 0.0")]
    if with_validation:
        assert table.bold_by == "val" and "validation R@1 selects" in table.caption
        assert len(bolded) == 1 and bolded[0].startswith("| 0.001 ")
    else:
        assert table.bold_by == "test" and "oracle" in table.caption
        assert bolded[0].startswith("| 0.0001 ")


def test_5_summary_of_a_one_seed_sweep_has_one_row_per_setting(tmp_path):
    from report.load import load_suite as load_results
    from report.summary import summary_rows

    rows = summary_rows(load_results(sweep_suite(tmp_path, False)), top=None)
    assert len(rows) == 3 and set(rows["n"]) == {1}
    assert any("lr=0.001" in name for name in rows["method_name"])


# --- training thrown away --------------------------------------------------------------------

def test_6_impossible_recall_k_fails_before_training_and_recall_ks_overrides(tmp_path):
    from bench.runner import run_cell

    import numpy as np
    from PIL import Image

    layouts.make_sop(tmp_path / "sop", train_classes=6, test_classes=4, images_per_class=4)
    rng = np.random.default_rng(0)  # images of their own: identical ones embed identically, a degenerate cell
    for image in sorted((tmp_path / "sop" / "images").rglob("*.JPG")):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(image, "JPEG")
    config = CellConfig(dataset="sop", data_root=str(tmp_path), **{**TINY, "batch_size": 4})
    result = run_cell(config, tmp_path / "cell", key={"method": "linear_probe"})
    assert result["status"] == "failed" and result["epochs"] == []
    assert "recall@1000" in result["reason"] and "the largest possible K is 15" in result["reason"]
    assert result["measurements"] is None and not (tmp_path / "cell" / "checkpoint.pt").exists()
    fixed = CellConfig(dataset="sop", data_root=str(tmp_path), recall_ks=[1, 10], **{**TINY, "batch_size": 4})
    result = run_cell(fixed, tmp_path / "cell2", key={"method": "linear_probe"})
    assert result["status"] == "ok" and set(result["final"]["test"]) >= {"recall@1", "recall@10"}


def test_7_unreadable_data_root_stops_dry_run_and_submission_before_anything_is_queued(tmp_path, capsys):
    suite = write_suite(tmp_path, "nodata", {"method": ["linear_probe", "bitfit"], "seed": [0]})
    for extra in (["--dry-run"], ["--executor", "local"]):
        code, _, err = main(capsys, "run", suite, "--data-root", tmp_path / "nonexistent", "--out", tmp_path / "out",
                            *extra)
        assert code == 2 and "2 cells cannot read their data" in err and "nonexistent" in err
    assert not list((tmp_path / "out").glob("nodata/*/result.json"))
    code, out, _ = main(capsys, "run", suite, "--data-root", tmp_path / "nonexistent", "--dry-run",
                        "--no-data-check", "--out", tmp_path / "out")
    assert code == 0 and "2 cells: 2 pending" in out


@pytest.mark.parametrize("flag, value, expected", [
    ("--method", "vpt_depp", "did you mean 'vpt_deep'"),
    ("--method-arg", "num_promts=3", "did you mean 'num_prompts'"),
    ("--backbone", "vit_smal_patch16_224", "unknown timm model"),
])
def test_8_typos_fail_up_front_with_exit_2_and_no_folder(data, tmp_path, capsys, flag, value, expected):
    argv = ["cell", "--dataset", "synthetic", "--data-root", data, "--backbone", "vit_test", "--method", "vpt_deep",
            "--out", tmp_path / "out", flag, value]
    code, _, err = main(capsys, *argv)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# --- tracebacks and weak messages ------------------------------------------------------------

NUMERIC_FIELDS = [f for f, kind in ((f.name, f.type) for f in __import__("dataclasses").fields(CellConfig))
                  if kind.startswith(("int", "float")) and f not in ("num_workers",)]


@pytest.mark.parametrize("field_name", NUMERIC_FIELDS)
def test_9_report_of_a_sweep_over_any_numeric_field(tmp_path, field_name):
    from report.cli import build_report

    suite_dir = tmp_path / "sweep"
    for i, value in enumerate((1, 2)):
        key = {"dataset": "cub200", "backbone": fx.VIT_S, "method": "vpt_deep", "seed": 0, field_name: value}
        data = fx.result(key, 0.7 + 0.01 * i, 0.4)
        data["cell_id"] = f"cell-{i}"
        fx.write(suite_dir, data)
    written = build_report(suite_dir)
    assert "index.md" in written
    epochs = (suite_dir / "report" / "epochs.csv").read_text().splitlines()[0].split(",")
    assert len(epochs) == len(set(epochs))  # no column twice (lr the axis vs the epoch's lr)


def test_10_sbatch_without_a_reachable_cluster_says_so(data, tmp_path, capsys, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for command in ("sbatch", "sinfo", "squeue"):
        (bin_dir / command).write_text("#!/bin/sh\necho 'slurm_load_partitions: Unable to contact slurm "
                                       "controller (connect failure)' >&2\nexit 1\n")
        (bin_dir / command).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    suite = write_suite(tmp_path, "noslurm", {"method": ["linear_probe"], "seed": [0]})
    code, _, err = main(capsys, "run", suite, "--data-root", data, "--out", tmp_path / "out")
    assert code == 2
    assert "SLURM is not reachable" in err and "sinfo" in err and "--executor local" in err


def test_11_official_archives_are_found_from_their_parent_folder(tmp_path):
    root = tmp_path / "parent"
    layouts.make_cub200(root / "CUB_200_2011")
    assert load_dataset("cub200", root).root.endswith("CUB_200_2011")
    inshop = root / "In-shop Clothes Retrieval Benchmark"
    layouts.make_inshop(inshop / "Img")  # Img/img/... and the index beside it
    (inshop / "Eval").mkdir()
    os.replace(inshop / "Img" / "list_eval_partition.txt", inshop / "Eval" / "list_eval_partition.txt")
    splits = load_dataset("inshop", root)
    assert splits.query is not None and Path(splits.query.paths[0]).is_file()
    with pytest.raises(UserError, match=r"found in .*: CUB_200_2011/"):
        load_dataset("sop", root)


def test_12_evaluate_takes_column_labels_npz_and_prints_percent(tmp_path, capsys):
    rng = np.random.default_rng(0)
    embeddings, labels = rng.normal(size=(40, 8)), np.repeat(np.arange(10), 4)
    np.save(tmp_path / "e.npy", embeddings)
    np.save(tmp_path / "l.npy", labels[:, None])
    np.savez(tmp_path / "both.npz", emb=embeddings, labels=labels)
    code, out, _ = main(capsys, "evaluate", tmp_path / "e.npy", tmp_path / "l.npy", "--json")
    metrics = json.loads(out)
    assert code == 0 and 0 <= metrics["recall@1"] <= 1  # fractions in --json
    code, out, _ = main(capsys, "evaluate", f"{tmp_path / 'both.npz'}:emb", f"{tmp_path / 'both.npz'}:labels")
    assert code == 0 and f"{100 * metrics['recall@1']:.2f}" in out and "R@1" in out
    code, _, err = main(capsys, "evaluate", tmp_path / "both.npz", tmp_path / "l.npy")
    assert code == 2 and "holds 2 arrays (emb, labels)" in err


def test_13_renaming_a_label_reruns_nothing_and_the_report_shows_the_new_name(data, tmp_path, capsys):
    from report.load import load_suite as load_results

    grid = {"method": [{"name": "linear_probe", "label": "Old name"}], "seed": [0]}
    suite = write_suite(tmp_path, "labels", grid)
    assert local_run(capsys, suite, data, tmp_path / "out")[0] == 0
    suite.write_text(suite.read_text().replace("Old name", "New name"))
    code, out, _ = local_run(capsys, suite, data, tmp_path / "out")
    assert code == 0 and "nothing to run" in out
    assert list(load_results(tmp_path / "out" / "labels").ok["method_name"]) == ["New name"]


@pytest.mark.parametrize("assignment, option", [("method=full_ft", "--method"), ("seed=3", "--seed")])
def test_14_set_of_a_field_owned_by_a_flag_is_refused(data, tmp_path, capsys, assignment, option):
    code, _, err = main(capsys, "cell", "--dataset", "synthetic", "--data-root", data, "--backbone", "vit_test",
                        "--out", tmp_path, "--set", assignment)
    assert code == 2 and option in err


def test_15_leaking_splits_and_escaping_paths_are_refused(tmp_path):
    sop = layouts.make_sop(tmp_path / "a" / "sop")
    test_index = sop / "Info_Files" / "Ebay_test.txt"
    train_line = (sop / "Info_Files" / "Ebay_train.txt").read_text().splitlines()[1]
    test_index.write_text(test_index.read_text() + train_line.replace("1 1 1", "99 9 1", 1) + "\n")
    with pytest.raises(UserError, match="listed in both train and test"):
        load_dataset("sop", tmp_path / "a")
    sop = layouts.make_sop(tmp_path / "b" / "sop")
    test_index = sop / "Info_Files" / "Ebay_test.txt"
    test_index.write_text(test_index.read_text() + "99 1 1 bicycle_final/shared_class.JPG\n")
    layouts.write_image(sop / "images" / "bicycle_final" / "shared_class.JPG")
    with pytest.raises(UserError, match="classes are in both train and test"):
        load_dataset("sop", tmp_path / "b")
    sop = layouts.make_sop(tmp_path / "c" / "sop")
    test_index = sop / "Info_Files" / "Ebay_test.txt"
    test_index.write_text(test_index.read_text() + "99 9 1 ../../secret.JPG\n")
    with pytest.raises(UserError, match="leaves the dataset folder"):
        load_dataset("sop", tmp_path / "c")


def test_16_corrupt_result_is_named_in_status_and_report_and_moved_aside(data, tmp_path, capsys):
    suite = write_suite(tmp_path, "corrupt", {"method": ["linear_probe"], "seed": [0]})
    out = tmp_path / "out"
    assert local_run(capsys, suite, data, out)[0] == 0
    (path,) = (out / "corrupt").glob("*/result.json")
    path.write_text(path.read_text()[:100])  # truncated
    code, listing, _ = main(capsys, "status", suite, "--out", out)
    assert "corrupt" in listing and "1 corrupt" in listing and str(path.parent.name) in listing
    code, report_out, _ = main(capsys, "report", "corrupt", "--results", out)
    assert code == 0 and "1 corrupt" in report_out
    assert local_run(capsys, suite, data, out)[0] == 0
    assert json.loads(path.read_text())["status"] == "ok"
    assert len(list(path.parent.glob("result.json.corrupt-*"))) == 1  # kept, never deleted


def test_17_full_disk_is_one_message_and_the_cell_records_it(data, tmp_path, monkeypatch, capsys):
    real_fsync = os.fsync
    victims = {"checkpoint.pt"}

    def fsync(fd):
        name = os.readlink(f"/proc/self/fd/{fd}")
        if any(f".{victim}." in name for victim in victims):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(results.os, "fsync", fsync)
    argv = ["cell", "--dataset", "synthetic", "--data-root", data, "--backbone", "vit_test", "--weights", "none",
            "--epochs", "1", "--set", "num_workers=0", "--set", "batch_size=8", "--out", tmp_path / "out"]
    code, out, _ = main(capsys, *argv)
    (result,) = ok_results(tmp_path / "out" / "adhoc").values()
    assert code == 1 and result["status"] == "failed"
    assert "checkpoint.pt: no space left on the device" in result["reason"] and "MiB free" in result["reason"]
    victims.add("result.json")  # now not even the failure record can be written
    code, _, err = main(capsys, *argv, "--fresh")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no space left" in err


def tree(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.lstat().st_mtime_ns for p in folder.rglob("*")}


def test_18_status_and_report_elsewhere_write_nothing_into_results(data, tmp_path, capsys):
    suite = write_suite(tmp_path, "readonly", {"method": ["linear_probe"], "seed": [0]})
    out = tmp_path / "out"
    assert local_run(capsys, suite, data, out)[0] == 0
    for lock in out.rglob(".lock"):
        lock.unlink()  # results copied off a cluster have no lock files
    before = tree(out)
    assert main(capsys, "status", suite, "--out", out)[0] == 0
    assert main(capsys, "report", "readonly", "--results", out, "--out", tmp_path / "elsewhere")[0] == 0
    assert tree(out) == before and (tmp_path / "elsewhere" / "index.md").is_file()
    if os.geteuid() != 0:  # as root (CI) permissions do not stop writes; the tree check above does
        os.chmod(out / "readonly", 0o555)
        assert main(capsys, "status", suite, "--out", out)[0] == 0


def test_19_odd_inputs_get_one_clear_error(data, tmp_path, capsys):
    suite = write_suite(tmp_path, "odd", {"method": ["linear_probe"], "seed": [0]})
    out = tmp_path / "out"
    assert local_run(capsys, suite, data, out)[0] == 0
    os.symlink("loop", out / "odd" / "loop")  # a symlink loop in the results folder
    assert main(capsys, "status", suite, "--out", out)[0] == 0
    assert main(capsys, "report", "odd", "--results", out)[0] == 0
    (path,) = (out / "odd").glob("*/result.json")
    broken = json.loads(path.read_text())
    broken["final"] = "a string"
    path.write_text(json.dumps(broken))
    code, listing, _ = main(capsys, "status", suite, "--out", out)
    assert code == 0 and "'final' must be dict or null" in listing.replace("\n", "")
    huge = tmp_path / "huge.yaml"
    huge.write_text("name: huge\n" + "# padding\n" * 200_000)
    code, _, err = main(capsys, "status", huge)
    assert code == 2 and "too large for a suite file" in err
    code, _, err = main(capsys, "describe", "--num-classes", "-5")
    assert code == 2 and "--num-classes must be a positive integer" in err
    liar = tmp_path / "liar.npy"
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                  "shape": (2 ** 40, 8)})
    liar.write_bytes(b"\x93NUMPY\x01\x00" + header.getvalue()[8:] + b"\0" * 64)
    np.save(tmp_path / "l.npy", np.zeros(4))
    code, _, err = main(capsys, "evaluate", liar, tmp_path / "l.npy")
    assert code == 2 and "truncated or not a .npy file" in err and str(liar) in err


def test_20_a_kill_between_result_and_checkpoint_removal_keeps_the_training(data, tmp_path, monkeypatch):
    from bench import runner
    from bench.runner import run_cell

    config = CellConfig(dataset="synthetic", data_root=str(data), **{**TINY, "epochs": 2})
    order = []
    monkeypatch.setattr(runner, "atomic_write_json", lambda path, data: order.append("result") or
                        results.atomic_write_json(path, data))
    import bench.checkpointer

    real_remove = bench.checkpointer.remove_checkpoint
    monkeypatch.setattr(bench.checkpointer, "remove_checkpoint", lambda d: order.append("checkpoint") or real_remove(d))
    assert run_cell(config, tmp_path / "cell", key={})["status"] == "ok"
    assert order == ["result", "checkpoint"]  # a kill in between leaves a result, not nothing


def test_21_an_unexpected_error_in_one_cell_does_not_stop_the_local_grid(data, tmp_path, capsys):
    suite = write_suite(tmp_path, "blocked", {"method": ["linear_probe", "bitfit"], "seed": [0]})
    first = load_suite(suite).cells(data_root=str(data))[0]
    (tmp_path / "out" / "blocked" / first.cell_id / "result.json").mkdir(parents=True)
    code, out, _ = local_run(capsys, suite, data, tmp_path / "out")
    states = dispatch.collect_states(load_suite(suite).cells(data_root=str(data)), tmp_path / "out" / "blocked")
    assert [s.state for s in states.values()] == ["done", "done"]  # the folder was moved aside
    assert list((tmp_path / "out" / "blocked" / first.cell_id).glob("result.json.corrupt-*"))


def test_22_foreign_results_and_symlinked_cells_are_not_trusted(data, tmp_path, capsys):
    suite = write_suite(tmp_path, "foreign", {"method": ["linear_probe", "bitfit"], "seed": [0]})
    out = tmp_path / "out"
    assert local_run(capsys, suite, data, out)[0] == 0
    first, second = load_suite(suite).cells(data_root=str(data))
    suite_dir = out / "foreign"
    (suite_dir / second.cell_id / "result.json").write_text((suite_dir / first.cell_id / "result.json").read_text())
    states = dispatch.collect_states([first, second], suite_dir)
    assert states[second.cell_id].state == "foreign"
    assert local_run(capsys, suite, data, out)[0] == 0  # reruns it, keeping the copy aside
    assert json.loads((suite_dir / second.cell_id / "result.json").read_text())["cell_id"] == second.cell_id
    assert list((suite_dir / second.cell_id).glob("result.json.foreign-*"))
    from report.load import load_suite as load_results

    os.symlink(suite_dir / first.cell_id, suite_dir / "twin")
    assert "twin" in load_results(suite_dir).stale  # not a cell of the suite: left out, and said
    (suite_dir / "cells.json").unlink()  # results copied without it: the twin must not count twice
    statuses = load_results(suite_dir).cells.set_index("cell_id")["status"].to_dict()
    assert statuses["twin"] == "foreign" and sum(s == "ok" for s in statuses.values()) == 2
    with pytest.raises(UserError, match="must not be a symlink"):
        from bench.runner import run_cell

        run_cell(first.config, suite_dir / "twin", key=first.key)


def test_23_bad_runtime_values_fail_before_a_finished_result_is_touched(data, tmp_path, capsys):
    argv = ["cell", "--dataset", "synthetic", "--data-root", data, "--backbone", "vit_test", "--weights", "none",
            "--epochs", "1", "--set", "num_workers=0", "--set", "batch_size=8", "--out", tmp_path]
    assert main(capsys, *argv)[0] == 0
    before = tree(tmp_path / "adhoc")
    for bad in ("device=tpu", "num_workers=-1"):
        code, _, err = main(capsys, *argv, "--fresh", "--set", bad)
        assert code == 2 and bad.split("=")[0] in err
    assert tree(tmp_path / "adhoc") == before


@pytest.mark.parametrize("text, message", [
    ("\n".join(["a: &a [1, 2, 3, 4, 5, 6, 7, 8, 9]"] + [f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]"
                for p, c in zip("abcdefg", "bcdefgh")]) + "\nname: x\ngrid: {seed: [0]}\n", "expand to more than"),
    ("name: x\ngrid: {seed: [0]}\ndefaults:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n",
     "duplicate key 'lr' (first on line 4, again on line 6)"),
])
def test_24_yaml_bombs_and_duplicate_keys_are_refused(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SuiteError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_suite(path)


@pytest.mark.parametrize("field_name, value", [("grad_clip", -1.0), ("weight_decay", float("nan")),
                                               ("momentum", float("inf")), ("loss_alpha", float("nan")),
                                               ("loss_delta", float("-inf")), ("lr", float("inf")),
                                               ("val_fraction", 1.0), ("momentum", 1.0)])
def test_25_numeric_fields_have_valid_ranges(field_name, value):
    with pytest.raises(UserError, match=field_name):
        CellConfig(**{field_name: value})


def test_26_a_corrupt_checkpoint_is_moved_aside_and_the_cell_restarts(data, tmp_path):
    from bench.runner import run_cell

    config = CellConfig(dataset="synthetic", data_root=str(data), **TINY)
    cell_dir = tmp_path / "cell"
    cell_dir.mkdir()
    (cell_dir / "checkpoint.pt").write_bytes(b"not a checkpoint")
    notes = []
    result = run_cell(config, cell_dir, key={}, progress=lambda e: notes.append(e))
    assert result["status"] == "ok"
    assert any(e["event"] == "note" and "checkpoint.pt does not load" in e["text"] for e in notes)
    assert len(list(cell_dir.glob("checkpoint.pt.corrupt-*"))) == 1


def test_27_concurrent_reports_never_leave_a_mixed_folder(tmp_path):
    suite_dir = fx.make_table1_suite(tmp_path)
    out = suite_dir / "report"
    (out / "tables").mkdir(parents=True)
    (out / "tables" / "stale.tex").write_text("from an older report")
    (out / "notes.txt").write_text("mine")
    script = ("import sys; from report.cli import build_report; "
              "build_report(sys.argv[1], table=sys.argv[2])")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(suite_dir), kind], env=env)
             for kind in ("table1", "generic", "table1", "generic")]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    tables = sorted(p.name for p in (out / "tables").iterdir())
    assert tables in (["table1.csv", "table1.md", "table1.tex"], ["generic.csv", "generic.md", "generic.tex"])
    index = (out / "index.md").read_text()
    assert f"tables/{tables[0]}" in index  # the index and the tables are one report's
    assert (out / "notes.txt").read_text() == "mine"  # not the report's: kept
    assert not [p for p in suite_dir.glob(".report.*") if p.name != ".report.lock"]  # no half-built folder


def test_28_huge_and_16_bit_images(tmp_path):
    from bench.data import load_image, verify_images

    huge = tmp_path / "huge.png"
    Image.new("1", (20000, 20000)).save(huge)
    with pytest.raises(UserError, match="huge.png.*DecompressionBombError"):
        load_image(str(huge))
    assert verify_images([str(huge)]) == [str(huge)]  # skip_corrupt_images leaves it out
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(deep)
    pixels = np.asarray(load_image(str(deep)))
    assert pixels.shape == (8, 8, 3) and 126 <= pixels.mean() <= 129  # mid grey, not white


def test_29_huge_finite_embeddings_score_as_their_directions():
    from bench.evaluate import retrieval_metrics

    rng = np.random.default_rng(0)
    embeddings, labels = rng.normal(size=(60, 8)).astype(np.float32), np.repeat(np.arange(15), 4)
    assert retrieval_metrics(embeddings * np.float32(3e37), labels) == retrieval_metrics(embeddings, labels)


def test_30_two_suite_files_with_one_name_do_not_share_a_folder(data, tmp_path, capsys):
    first = write_suite(tmp_path, "twin", {"method": ["linear_probe"], "seed": [0]})
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    second = write_suite(other_dir, "twin", {"method": ["bitfit"], "seed": [0]})
    assert local_run(capsys, first, data, tmp_path / "out")[0] == 0
    code, _, err = local_run(capsys, second, data, tmp_path / "out")
    assert code == 2 and str(first) in err and "another `name:`" in err

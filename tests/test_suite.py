"""Suite files: validation errors that name the file and field, and the shipped paper grids."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import methods
from methods import registry
from bench.suite import SuiteError, load_suite

REPO = Path(__file__).resolve().parent.parent

GOOD = """\
name: tiny
grid:
  dataset: [cub200]
  method: [vpt_deep]
  seed: [0]
defaults: {backbone: vit_s16, batch_size: 64, samples_per_class: 2}
"""

# (case, suite text, substrings the one-line error must contain besides the file name)
BAD_SUITES = [
    ("not yaml", "name: x\ngrid: {dataset: [cub200\n", [":3:", "not valid YAML"]),
    ("not a mapping", "- just\n- a list\n", ["a suite file is a mapping"]),
    ("unknown top-level key", GOOD + "overides: []\n", ["overides", "did you mean 'overrides'?"]),
    ("unknown dataset", GOOD.replace("[cub200]", "[cub201]"), ["grid.dataset[0]", "did you mean 'cub200'?"]),
    ("unknown backbone", GOOD.replace("vit_s16", "vit_s61"), ["defaults.backbone", "did you mean 'vit_s16'?"]),
    ("unknown method", GOOD.replace("[vpt_deep]", "[vpt_depp]"), ["grid.method", "did you mean 'vpt_deep'?"]),
    ("unknown method argument", GOOD + "overrides: [{when: {dataset: cub200}, set: {num_promts: 5}}]\n",
     ["overrides[0].set.num_promts", "did you mean 'num_prompts'?"]),
    ("wrong type", GOOD.replace("samples_per_class: 2", "samples_per_class: two"),
     ["samples_per_class must be int", "'two'"]),
    ("axis not a list", GOOD.replace("seed: [0]", "seed: 0"), ["grid.seed", "must be a list"]),
    ("batch not divisible", GOOD.replace("samples_per_class: 2", "samples_per_class: 3"),
     ["batch_size", "not divisible by samples_per_class=3"]),
    ("empty grid", "name: x\ngrid: {}\n", ["grid", "empty"]),
    ("empty axis", GOOD.replace("seed: [0]", "seed: []"), ["grid.seed", "empty list"]),
    ("everything excluded", GOOD + "exclude: [{dataset: cub200}]\n", ["exclude", "every cell"]),
    ("path traversal in name", GOOD.replace("name: tiny", "name: ../../etc"), ["name", "invalid suite name"]),
    ("when names no grid value", GOOD + "overrides: [{when: {dataset: cub}, set: {lr: 0.1}}]\n",
     ["overrides[0].when.dataset", "did you mean 'cub200'?"]),
    ("override sets an axis", GOOD + "overrides: [{when: {dataset: cub200}, set: {seed: 3}}]\n",
     ["overrides[0].set.seed", "grid axis"]),
    ("unknown resource", GOOD + "resources: {gpu_per_node: 1}\n", ["resources.gpu_per_node", "gpus_per_node"]),
    ("bad protocol", GOOD + "protocol: {selection: best}\n", ["selection", "last, val"]),
]


@pytest.mark.parametrize("text, expected", [c[1:] for c in BAD_SUITES], ids=[c[0] for c in BAD_SUITES])
def test_bad_suite_is_one_error_naming_file_and_field(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SuiteError) as info:
        load_suite(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message.strip()
    for part in expected:
        assert part in message


def test_suite_name_on_the_command_line_cannot_leave_the_suites_folder():
    with pytest.raises(Exception, match="invalid suite name"):
        load_suite("..")
    with pytest.raises(SuiteError, match="did you mean 'table1'"):
        load_suite("tabel1")


def test_cli_prints_suite_errors_in_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(GOOD.replace("[cub200]", "[cub201]"))
    out = subprocess.run([sys.executable, "run_suite.py", "run", str(path), "--dry-run"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.startswith(f"error: {path}: grid.dataset[0]: unknown dataset 'cub201'")
    assert "Traceback" not in out.stderr


def test_precedence_defaults_overrides_then_grid_values(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent("""\
        name: p
        grid:
          dataset: [cub200, cars196]
          proxy_bias_ratio: [0.1]
          method: [{name: vptsp_g, label: G, args: {num_prompts: 7}}]
        defaults: {backbone: vit_b16, lr: 1.0, num_prompts: 1, proxy_bias_ratio: 0.9}
        overrides:
          - when: {dataset: [cub200, cars196]}
            set: {lr: 2.0, num_prompts: 2, epochs: 3}
          - when: {dataset: cars196, method: G}
            set: {lr: 3.0}
        """))
    cub, cars = load_suite(path).cells()
    assert (cub.config.lr, cars.config.lr, cub.config.epochs) == (2.0, 3.0, 3)
    # the cell's own values win over overrides and defaults
    assert cub.config.method_args == {"num_prompts": 7, "proxy_bias_ratio": 0.1}
    assert cub.key == {"dataset": "cub200", "backbone": "vit_b16", "method": "vptsp_g", "label": "G",
                       "seed": 0, "proxy_bias_ratio": 0.1}
    # the short backbone name stays in the key; the config gets the timm name and its embedding
    assert (cub.config.backbone, cub.config.embedding_size) == ("vit_base_patch16_224.augreg_in21k", 512)
    assert cub.config.label == "G" and cub.config.suite == "p"


def test_only_selects_cells_and_names_unknown_keys_and_values():
    suite = load_suite("table2")
    cells = suite.cells(only=["dataset=cars196", "dataset=sop", "backbone=vit_s16"])
    assert {(c.key["dataset"], c.key["backbone"]) for c in cells} == {("cars196", "vit_s16"), ("sop", "vit_s16")}
    with pytest.raises(SuiteError, match="did you mean 'dataset'"):
        suite.cells(only=["datset=sop"])
    with pytest.raises(SuiteError, match="matches no cell.*cars196"):
        suite.cells(only=["dataset=cars"])


# ---- the shipped suites ---------------------------------------------------------------------


def by_key(cells, **key):
    found = [c for c in cells if all(c.key.get(k) == v for k, v in key.items())]
    assert len(found) == 1, (key, [c.key for c in found])
    return found[0]


def test_table1_rows_and_released_cub200_small_settings():
    cells = load_suite("table1").cells()
    assert len(cells) == 36  # zero-shot + the paper's 11 rows, x 3 seeds
    rows = list(dict.fromkeys((c.key["label"], c.key["method"]) for c in cells))
    assert rows == [
        ("Zero-shot (no training)", "zero_shot"),
        ("Full fine-tuning (PA)", "full_ft"), ("Linear probing", "linear_probe"), ("BitFit", "bitfit"),
        ("Adapter (L:7, d:256)", "adapter"), ("Adapter (B) (L:1, d:256)", "adapter+bitfit"),
        ("VPT (L:12, N:10)", "vpt_deep"), ("VPT (B) (L:12, N:10)", "vpt_deep+bitfit"),
        ("VPTSP-M (EMA)", "vptsp_e"), ("VPTSP-M (B)", "vptsp_e+bitfit"),
        ("VPTSP-G (GRU)", "vptsp_g"), ("VPTSP-G (B)", "vptsp_g+bitfit"),
    ]
    assert {c.key["seed"] for c in cells} == {0, 1, 2}
    for c in cells:
        cfg = c.config
        assert (cfg.dataset, cfg.backbone, cfg.embedding_size) == ("cub200", "vit_small_patch16_224.augreg_in21k", 384)
        assert (cfg.batch_size, cfg.samples_per_class, cfg.optimizer, cfg.momentum) == (64, 2, "sgd", 0.9)
        epochs = 0 if cfg.method == "zero_shot" else 15
        assert (cfg.lr, cfg.proxy_lr, cfg.weight_decay, cfg.epochs) == (5e-3, 0.1, 1e-6, epochs)
        assert (cfg.lr_cosine_period, cfg.lr_min, cfg.selection_rule) == (50, 1e-8, "last")
    assert by_key(cells, label="Adapter (L:7, d:256)", seed=0).config.method_args == {
        "adapter_blocks": 7, "adapter_width": 256}
    assert by_key(cells, label="Adapter (B) (L:1, d:256)", seed=0).config.method_args == {
        "adapter_blocks": 1, "adapter_width": 256}
    assert by_key(cells, label="VPT (B) (L:12, N:10)", seed=1).config.method_args == {
        "num_prompts": 10, "prompt_depth": 12}
    vptsp = {"num_prompts": 10, "prompt_depth": 12, "num_class_prompts": 3, "class_prompt_depth": 12,
             "proxy_bias_ratio": 0.5}
    for label in ("VPTSP-M (EMA)", "VPTSP-M (B)", "VPTSP-G (GRU)", "VPTSP-G (B)"):
        assert by_key(cells, label=label, seed=2).config.method_args == vptsp
    assert len({c.cell_id for c in cells}) == 36


# dataset, backbone -> optimizer, lr, proxy_lr, weight_decay, epochs, cosine T, lr_min, batch, per class,
#   (N, L, tau) prompts, (m, L, tau) class prompts, alpha, gru_dropout  (paper.md released configs)
RELEASED = {
    ("cub200", "vit_s16"): ("sgd", 5e-3, 0.1, 1e-6, 15, 50, 1e-8, 64, 2, (10, 12, 0), (3, 12, 0), 0.5, None),
    ("cars196", "vit_s16"): ("adamw", 5e-4, 0.01, 0.0, 50, 50, 1e-6, 64, 2, (80, 11, 2), (50, 8, 2), 0.7, None),
    ("sop", "vit_s16"): ("adamw", 1e-4, 0.05, 1e-4, 120, 120, 5e-5, 32, 1, (90, 12, 0), (5, 12, 0), 0.2, 0.1),
    ("inshop", "vit_s16"): ("adamw", 1e-4, 0.05, 1e-7, 80, 100, 5e-6, 32, 1, (90, 12, 0), (80, 12, 0), 0.2, 0.1),
    ("cub200", "vit_b16"): ("sgd", 1e-3, 0.01, 1e-6, 60, 100, 1e-7, 64, 2, (20, 12, 0), (5, 4, 5), 0.4, None),
    ("cars196", "vit_b16"): ("adamw", 5e-4, 0.01, 0.0, 60, 50, 1e-6, 64, 2, (80, 10, 2), (50, 8, 2), 0.1, None),
    ("sop", "vit_b16"): ("adamw", 1e-4, 0.05, 1e-4, 120, 120, 1e-7, 32, 1, (90, 12, 5), (5, 8, 0), 0.2, 0.5),
    ("inshop", "vit_b16"): ("adamw", 1e-4, 0.05, 0.0, 75, 100, 1e-6, 32, 1, (90, 12, 0), (60, 12, 0), 0.3, None),
    ("inaturalist", "vit_b16"): ("adamw", 1e-4, 0.05, 0.0, 40, 50, 1e-6, 64, 1, (90, 12, 5), (10, 12, 0), 0.2, None),
}


def test_table2_cells_carry_the_released_per_dataset_configs():
    cells = load_suite("table2").cells()
    assert len(cells) == 27  # 9 dataset x backbone configs x 3 seeds
    assert {(c.key["dataset"], c.key["backbone"]) for c in cells} == set(RELEASED)
    for c in cells:
        (opt, lr, proxy_lr, wd, epochs, period, lr_min, batch, per_class, prompts, class_prompts, alpha,
         dropout) = RELEASED[(c.key["dataset"], c.key["backbone"])]
        cfg, args = c.config, c.config.method_args
        assert cfg.method == "vptsp_g+bitfit" and args["accumulator"] == "gru_relu"
        assert cfg.embedding_size == (384 if c.key["backbone"] == "vit_s16" else 512)
        assert (cfg.optimizer, cfg.lr, cfg.proxy_lr, cfg.weight_decay, cfg.epochs) == (opt, lr, proxy_lr, wd, epochs)
        assert (cfg.lr_cosine_period, cfg.lr_min, cfg.batch_size, cfg.samples_per_class) == (period, lr_min, batch, per_class)
        assert (args["num_prompts"], args["prompt_depth"], args["prompt_decrease"]) == prompts
        assert (args["num_class_prompts"], args["class_prompt_depth"], args["class_prompt_decrease"]) == class_prompts
        assert args["proxy_bias_ratio"] == alpha and args.get("gru_dropout") == dropout


def test_ablation_latency_smoke_and_demo_suites():
    accumulator = load_suite("ablation_accumulator").cells()
    assert len(accumulator) == 3 * 6 * 3  # CUB, Cars, SOP x six accumulators x three seeds
    assert {(c.config.method, c.config.method_args.get("accumulator")) for c in accumulator} == {
        ("vptsp_g", "ema"), ("vptsp_g", "gru_tanh"), ("vptsp_g", "gru_relu"), ("vptsp_g", "mean"),
        ("vptsp_g", "attention"), ("vpt_deep+bitfit", None)}
    assert {c.config.dataset for c in accumulator} == {"cub200", "cars196", "sop"}
    assert all(c.config.method_args.get("proxy_bias_ratio", 0.0) == 0.0 for c in accumulator)

    alpha = load_suite("ablation_alpha").cells()
    assert len(alpha) == 36
    assert sorted({c.key["proxy_bias_ratio"] for c in alpha}) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    cars = by_key(alpha, dataset="cars196", proxy_bias_ratio=1.0, seed=0).config
    assert (cars.optimizer, cars.epochs, cars.method_args["proxy_bias_ratio"]) == ("adamw", 50, 1.0)

    prompts = load_suite("ablation_prompts").cells()
    assert len(prompts) == 36
    points = {(c.key["num_prompts"], c.key["prompt_depth"]) for c in prompts}
    assert points == {(n, 12) for n in range(0, 101, 20)} | {(10, d) for d in range(2, 13, 2)}
    assert all(c.config.method_args["num_prompts"] == c.key["num_prompts"] for c in prompts)

    latency = load_suite("latency").cells()
    assert {c.config.method for c in latency} == {"full_ft", "linear_probe", "bitfit", "adapter", "vpt_deep", "vptsp_g"}
    assert {c.config.batch_size for c in latency} == {32, 64}
    assert all((c.config.dataset, c.config.epochs, c.config.max_steps_per_epoch) == ("cars196", 1, 120) for c in latency)

    smoke = load_suite("smoke").cells()
    assert len(smoke) >= 4
    assert all((c.config.dataset, c.config.backbone, c.config.weights, c.config.epochs) ==
               ("synthetic", "vit_test", "none", 2) for c in smoke)

    demo = load_suite("demo")
    cells = demo.cells()
    assert {c.config.method for c in cells} < set(methods.method_names())
    left_out = set(methods.method_names()) - {c.config.method for c in cells}
    paragraph = (REPO / "README.md").read_text().split("Left out for time")[1][:500]
    for method in left_out:  # the README says what the demo leaves out
        assert registry.method_display(method).split(" (")[0] in paragraph, method
    assert {c.config.dataset for c in cells} == {"synthetic", "synthetic_far"}
    assert {c.key["seed"] for c in cells} == set(range(10)) and len(cells) == 65
    replicate = [c for c in cells if c.key.get("label") == "LoRA (replicate)"]
    lora = [c for c in cells if c.key.get("label") == "LoRA" and c.config.dataset == "synthetic"]
    assert {c.key["seed"] for c in replicate}.isdisjoint({c.key["seed"] for c in lora})  # the A/A pair
    assert all(c.config.method_args == lora[0].config.method_args and c.config.lr == lora[0].config.lr
               for c in replicate)
    assert [c["kind"] for c in demo.report["controls"]] == ["negative", "positive", "positive", "positive"]


@pytest.mark.parametrize("suite, cells", [("table2", 27), ("table1", 36)])
def test_dry_run_prints_the_whole_grid_and_writes_nothing(tmp_path, suite, cells):
    out = subprocess.run([sys.executable, "run_suite.py", "run", suite, "--dry-run", "--executor", "local",
                          "--no-data-check", "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"{cells} cells: {cells} pending" in out.stdout
    rows = table_rows(out.stdout)
    assert [int(r.split("│")[1]) for r in rows] == list(range(1, cells + 1))
    # the released code's training problem, on every cell: its init and its positive averaging
    assert all("│ reference │ all " in r for r in rows)
    if suite == "table2":
        cars_s = next(r for r in rows if "cars196" in r and "vit_s16" in r)
        for value in ("adamw", "0.0005", "0.01", "50", "64/2", "num_prompts=80", "prompt_depth=11",
                      "num_class_prompts=50", "proxy_bias_ratio=0.7"):
            assert value in cars_s
        assert sum("inaturalist" in r for r in rows) == 3
    assert not any(tmp_path.iterdir())


def table_rows(text: str) -> list[str]:
    """Rows of a printed rich table, wrapped continuation lines joined to their row."""
    rows: list[str] = []
    for line in text.splitlines():
        if not line.startswith("│"):
            continue
        if line.split("│")[1].strip():
            rows.append(line)
        elif rows:
            rows[-1] += line
    return rows


def test_runtime_fields_do_not_change_the_cell_id():
    from bench.config import CellConfig

    base = CellConfig()
    moved = CellConfig(data_root="/elsewhere", num_workers=0, device="cpu", eval_batch_size=32, torch_threads=1,
                       compile=True)
    assert moved.identity() == base.identity()
    assert CellConfig(lr=1e-4).identity() != base.identity()


def test_the_wide_table_runs_every_registered_method_under_one_tuning_budget():
    suite = load_suite("table1_wide")
    plan = suite.plan()
    finals = plan.waiting + [c.key for c in plan.cells if c.key.get("stage") == "final"]  # zero-shot: no trials
    parts = {part for key in finals for part in registry.method_parts(key["method"])}
    assert parts == set(methods.method_names())  # every method of the registry is a row
    assert {key["dataset"] for key in finals} == {"cub200", "cars196", "sop"}
    assert {key["seed"] for key in finals} == set(range(5))
    trials = [c for c in plan.cells if c.key.get("stage") == "trial"]
    per_method = {}
    for cell in trials:
        per_method.setdefault(cell.key["label"], set()).add((cell.config.dataset, cell.key["trial"]))
    assert len({len(v) for v in per_method.values()}) == 1  # the same budget for every tuned method
    assert "Zero-shot (no training)" not in per_method  # nothing to tune

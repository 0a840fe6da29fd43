"""The reporter on hand-made result folders: numbers, bold, dashes, notes, LaTeX, plots, CLI.

Known numbers come from tests/report_fixtures.py. One report of the table1 suite is built per
session (figures take a few seconds to save); other suites build tables and figure objects only.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console

from bench.errors import UserError
from report import names, published
from report.cli import build_report, resolve_suite_dir, suite_table
from report.load import ReportError, load_suite
from report.plots import make_figures, pareto_front
from report.render import tex, to_latex, to_markdown, write_table
from peft_dml_cli.report import print_summary
from report import load
from report.kinds import KINDS, default_kind
from report.table_model import ORACLE_TITLE
from report.tables import build_table
from tests.no_torch import HEAVY, sitecustomize
from tests import report_fixtures as fx

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def results_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("results")
    fx.make_table1_suite(root)
    fx.make_table2_suite(root)
    fx.make_ablation_suite(root)
    fx.make_latency_suite(root)
    fx.make_accumulator_suite(root)
    return root


@pytest.fixture(scope="module")
def report(results_root) -> dict[str, Path]:
    return build_report(results_root / "table1", oracle=False)


def md_rows(markdown: str) -> dict[str, list[str]]:
    """Markdown table rows by their first cell."""
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| ") and not line.startswith("|:"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            rows[cells[0]] = cells[1:]
    return rows


def pct(values) -> tuple[float, float]:
    values = [100 * v for v in values if v is not None]
    return statistics.fmean(values), statistics.stdev(values)


def shown(values, offset: float = 0.0) -> str:
    """'mean ± h' as the tables print it: h is the half width of the 95 % t interval."""
    from scipy import stats

    mean, std = pct(values)
    n = len([v for v in values if v is not None])
    return f"{mean + offset:.1f} ± {stats.t.ppf(0.975, n - 1) * std / n ** 0.5:.1f}"


# --- loading ---------------------------------------------------------------------------------

def test_load_keeps_failed_and_missing_cells(results_root):
    res = load_suite(results_root / "table1")
    counts = res.cells["status"].value_counts().to_dict()
    assert counts == {"ok": 14, "failed": 1, "missing": 1}
    failed = res.cells[res.cells["status"] == "failed"].iloc[0]
    assert failed["reason"] == fx.FAILED_REASON and failed["method"] == "adapter"
    missing = res.cells[res.cells["status"] == "missing"].iloc[0]
    assert missing["cell_id"] == fx.MISSING_CELL and missing["method"] == "lora"  # key from cells.json
    assert res.axes == ["dataset", "backbone", "method", "label", "seed"]
    assert {"recall@1", "map@r", "oracle/recall@1", "params_trainable", "peak_memory_bytes",
            "memory_kind", "selection"} <= set(res.cells.columns)
    # 14 finished cells x 3 epochs, and the failed cell's one epoch
    assert len(res.epochs) == 14 * 3 + 1
    assert {"cell_id", "epoch", "epoch/train_loss", "test/recall@1", "method_name"} <= set(res.epochs.columns)


def test_folder_without_result_is_missing_and_report_folder_is_not_a_cell(tmp_path):
    suite = tmp_path / "smoke"
    fx.write(suite, fx.result({"dataset": "synthetic", "backbone": "vit_test", "method": "bitfit", "seed": 0},
                              0.5, 0.2))
    (suite / "pending-cell").mkdir()
    (suite / "report").mkdir()  # the default output folder
    (suite / "broken").mkdir()
    (suite / "broken" / "result.json").write_text("{not json")
    res = load_suite(suite)
    by_id = res.cells.set_index("cell_id")["status"].to_dict()
    assert by_id["pending-cell"] == "missing"
    assert by_id["broken"] == "corrupt"  # shown, never counted, with the parse error as reason
    assert "report" not in by_id
    assert "cannot read" in res.cells.set_index("cell_id").loc["broken", "reason"]


def test_folders_not_in_cells_json_are_left_out(tmp_path):
    suite = tmp_path / "s"
    key = {"dataset": "cub200", "backbone": "vit_s16", "method": "bitfit", "seed": 0}
    current = fx.write(suite, fx.result(key, 0.8, 0.4)).parent.name
    old = fx.result(key, 0.1, 0.1)
    old["cell_id"] = "cub200-bitfit-old-config"
    fx.write(suite, old)
    (suite / "cells.json").write_text(json.dumps([{"cell_id": current, "key": key}]))
    res = load_suite(suite)
    assert res.cells["cell_id"].tolist() == [current] and res.stale == ["cub200-bitfit-old-config"]
    table = build_table(res, "table1")
    assert table.rows[0].values["recall@1[%]"].mean == pytest.approx(80.0)  # not averaged with 10.0
    assert any("cub200-bitfit-old-config" in note for note in table.notes)


def test_bad_cells_json_names_the_file(tmp_path):
    suite = tmp_path / "x"
    suite.mkdir()
    (suite / "cells.json").write_text('{"a": 1}')
    with pytest.raises(ReportError, match="cells.json"):
        load_suite(suite)


# --- table1: values, bold, dashes, notes ---------------------------------------------------

def test_table1_numbers_match_hand_computed_means_and_stds(report):
    csv = pd.read_csv(report["tables/table1.csv"])
    ours = csv[csv["source"] == "ours"].set_index("Method")
    for method, r1s in fx.TABLE1_R1.items():
        name = fx.TABLE1_LABELS.get(method) or names.method_display(method)
        mean, std = pct(r1s)
        assert ours.loc[name, "recall@1[%]:mean"] == pytest.approx(mean)
        assert ours.loc[name, "recall@1[%]:std"] == pytest.approx(std)
        assert ours.loc[name, "recall@1[%]:n"] == len([v for v in r1s if v is not None])
        mean, std = pct(fx.TABLE1_MAP[method])
        assert ours.loc[name, "map@r[%]:mean"] == pytest.approx(mean)
        assert ours.loc[name, "map@r[%]:std"] == pytest.approx(std)
        assert ours.loc[name, "params_trainable[M]:mean"] == pytest.approx(fx.TABLE1_PARAMS[method] / 1e6)
        share = 100 * fx.TABLE1_PARAMS[method] / fx.TABLE1_PARAMS["full_ft"]
        assert ours.loc[name, "params_trainable[M]:pct_of_full_ft"] == pytest.approx(share)
    assert ours.loc["LoRA", "recall@1[%]:n"] == 0  # missing: no numbers
    # ours minus the paper's VPTSP-G (B) row (86.6)
    assert ours.loc["VPTSP-G (B)", "delta_recall@1[pp]:mean"] == pytest.approx(pct(fx.TABLE1_R1["vptsp_g+bitfit"])[0] - 86.6)


def test_table1_markdown_bold_dashes_and_notes(report):
    text = report["tables/table1.md"].read_text()
    rows = md_rows(text)
    header = rows["Method"]
    r1, mapr = header.index("R@1"), header.index("MAP@R")
    assert rows["VPTSP-G (B)"][r1] == f"**{shown(fx.TABLE1_R1['vptsp_g+bitfit'])}**" == "**86.8 ± 0.7**"
    assert rows["VPTSP-G (B)"][mapr] == f"**{shown(fx.TABLE1_MAP['vptsp_g+bitfit'])}**"
    assert rows["Full fine-tuning"][r1] == shown(fx.TABLE1_R1["full_ft"]) == "85.5 ± 1.2"
    assert rows["Linear probing"][r1] == shown(fx.TABLE1_R1["linear_probe"])
    assert rows["Adapter"][r1] == shown(fx.TABLE1_R1["adapter"]) + " (n=2)"  # a failed seed
    bold_r1 = [name for name, cells in rows.items() if cells[r1].startswith("**")]
    assert bold_r1 == ["VPTSP-G (B)"]  # best of ours only, paper rows never bold
    assert rows["LoRA"][:4] == ["-", "-", "-", "-"]
    assert rows["Full fine-tuning"][header.index("Tunable params")] == "21.9M (100.0%)"
    assert rows["Linear probing"][header.index("Tunable params")] == "0.19M (0.86%)"
    assert rows["paper: VPTSP-G (B) (Table 1)"][r1] == "86.6"
    assert rows["VPTSP-G (B)"][header.index("Δ R@1 vs paper")] == "+0.2"
    assert f"Failed cells (1): cub200-adapter-vit_s16-s0 ({fx.FAILED_REASON})" in text
    assert f"Missing cells (1): {fx.MISSING_CELL}" in text
    assert "last epoch" in text and "n = 3 seeds" in text and "95% confidence interval" in text
    assert "oracle" not in text  # only with --oracle


def test_table1_latex_escapes_and_bold(report):
    text = report["tables/table1.tex"].read_text()
    assert r"\toprule" in text and r"\midrule" in text and r"\bottomrule" in text
    assert r"\textbf{86.8 $\pm$ 0.7}" in text
    assert r"85.5 $\pm$ 1.2" in text
    assert r"cub200-adapter-vit\_s16-s0" in text and "NaN loss at epoch 2, step 17" in text
    assert r"21.9M (100.0\%)" in text
    assert "±" not in text and "Δ" not in text  # pdflatex-safe


def test_oracle_column_only_when_asked(results_root):
    res = load_suite(results_root / "table1")
    plain = to_markdown(build_table(res, "table1"))
    oracle = build_table(res, "table1", oracle=True)
    text = to_markdown(oracle)
    assert "oracle" not in plain
    assert "R@1 oracle (best test epoch, optimistic)" in text
    assert any(c.title == ORACLE_TITLE for c in oracle.columns)
    # fixtures put the best epoch 0.2 pp above the final one
    assert md_rows(text)["VPTSP-G (B)"][[c.title for c in oracle.columns].index(ORACLE_TITLE)] == f"**{shown(fx.TABLE1_R1['vptsp_g+bitfit'], 0.2)}**"


def test_caption_names_validation_selection(tmp_path):
    suite = tmp_path / "demo"
    for seed in range(2):
        key = {"dataset": "synthetic", "backbone": "demo_vit", "method": "bitfit", "seed": seed}
        fx.write(suite, fx.result(key, 0.5 + seed / 100, 0.2, selection="val"))
    table = build_table(load_suite(suite), "table1")
    assert "validation-selected (best val R@1)" in table.caption
    assert "2 seeds" in table.caption


# --- the other shapes ----------------------------------------------------------------------

def test_table2_columns_follow_the_paper(results_root):
    table = build_table(load_suite(results_root / "table2"), "table2")
    titles = [(c.group, c.title) for c in table.columns]
    assert titles[:4] == [("CUB-200", "R@1"), ("CUB-200", "R@2"), ("CUB-200", "R@4"), ("CUB-200", "MAP@R")]
    assert ("SOP", "R@10") in titles and ("SOP", "R@100") in titles
    rows = md_rows(to_markdown(table))
    # ViT-B/16 VPTSP-G (B) on CUB: 0.86 + 0.02 + 0.01 (+0.002 for seed 1)
    assert rows["VPTSP-G (B)"][0] in ("ViT-S/16/384", "ViT-B/16/512")
    ours = [r for r in table.rows if r.source == "ours" and r.stub == ["VPTSP-G (B)", "ViT-B/16/512"]][0]
    assert ours.values["cub200/recall@1[%]"].mean == pytest.approx(89.1)
    assert ours.values["sop/recall@10[%]"].mean == pytest.approx(96.1)
    paper = [r.stub[0] for r in table.rows if r.source == "paper"]
    assert "paper: VPTSP-G (Table 2)" in paper


def test_ablation_rows_per_swept_value(results_root):
    table = build_table(load_suite(results_root / "ablation_alpha"), "ablation_alpha")
    assert table.stub_titles == ["proxy-bias ratio α"]
    assert [r.stub[0] for r in table.rows if r.source == "ours"] == ["0", "0.6", "1"]
    best = table.rows[table.best(table.columns[0]).pop()]
    assert best.stub == ["0.6"]
    assert any(r.stub[0].startswith("paper: proxy-bias ratio α = 0.6") for r in table.rows)


def test_accumulator_rows_are_labels_matched_to_table7(results_root):
    table = build_table(load_suite(results_root / "ablation_accumulator"), "ablation_accumulator")
    assert table.stub_titles == ["Accumulator"]
    ours = {r.stub[0]: r for r in table.rows if r.source == "ours"}
    assert set(ours) == {"GRU + ReLU", "GRU + tanh", "EMA", "none"}
    delta = [c for c in table.columns if c.fmt == "delta"][0]
    assert ours["GRU + ReLU"].values[delta.key].mean == pytest.approx(86.2 - 86.1)  # via method_args
    assert delta.key not in ours["EMA"].values  # Table 7 has no EMA row


def test_latency_table_per_batch_size(results_root):
    table = build_table(load_suite(results_root / "latency"), "latency")
    assert [c.title for c in table.columns] == ["B=32", "B=64"]
    ours = {r.stub[0]: r for r in table.rows if r.source == "ours"}
    stat = ours["VPTSP"].values["latency_ms/B=64"]
    assert stat.mean == pytest.approx(4.0 * 64 + 0.5) and stat.n == 2
    assert table.rows[table.best(table.columns[1]).pop()].stub == ["Linear"]  # lowest is best
    assert "paper: VPTSP (Table 10)" in [r.stub[0] for r in table.rows]


def test_default_kind_from_suite_name(results_root):
    cells = load_suite(results_root / "table2").cells
    assert default_kind("table1", cells) == "table1"
    assert default_kind("table2", cells) == "table2"
    assert default_kind("latency", cells) == "latency"
    assert default_kind("ablation_alpha", cells) == "ablation_alpha"
    assert default_kind("ablation_batch", cells) == "ablation"
    assert default_kind("smoke", cells) == "generic"  # two datasets
    assert default_kind("smoke", cells[cells["dataset"] == "cub200"]) == "table1"


@pytest.mark.parametrize("suite", ["table1", "table2", "latency", "ablation_accumulator"])
def test_every_kind_renders_any_suite(results_root, suite):
    """--table overrides the shape: no combination of suite and kind may crash."""
    res = load_suite(results_root / suite)
    for kind in KINDS:
        table = build_table(res, kind, oracle=True)
        assert r"\bottomrule" in to_latex(table) and to_markdown(table)


def test_suite_yaml_names_the_default_table(tmp_path):
    (tmp_path / "smoke.yaml").write_text("name: smoke\nreport: {table: generic}\n")
    (tmp_path / "odd.yaml").write_text("report: [not, a, mapping\n")
    assert suite_table("smoke", tmp_path) == "generic"
    assert suite_table("odd", tmp_path) is None  # unreadable: fall back to the name
    assert suite_table("absent", tmp_path) is None
    assert default_kind("table10_latency", pd.DataFrame({"dataset": []})) == "latency"


def test_unknown_table_kind_is_a_user_error(results_root):
    res = load_suite(results_root / "table1")
    with pytest.raises(ReportError, match="did you mean 'table1'"):
        build_table(res, "tabel1")


def test_method_display_names():
    assert names.method_display("vptsp_g+bitfit") == "VPTSP-G (B)"
    assert names.method_display("adapter+bitfit") == "Adapter (B)"
    assert names.method_display("vptsp_e") == "VPTSP-M (EMA)"
    assert names.method_display("lora", "My LoRA") == "My LoRA"
    assert names.backbone_display("vit_s16") == names.backbone_display("vit_small_patch16_224.augreg_in21k") == "ViT-S/16"


def test_published_numbers_match_spec_section_8():
    def r1_map(dataset, backbone):
        rec = [r for r in published.PUBLISHED if r.source in ("Table 2", "Table 3") and r.name == "VPTSP-G"
               and r.dataset == dataset and r.backbone == backbone][0]
        return rec.metrics["recall@1"], rec.metrics.get("map@r")

    assert r1_map("cub200", "vit_s16") == (86.6, 52.7)
    assert r1_map("cars196", "vit_s16") == (87.7, 28.9)
    assert r1_map("sop", "vit_s16") == (84.4, 50.1)
    assert r1_map("inshop", "vit_s16") == (91.2, None)
    assert r1_map("cub200", "vit_b16") == (88.5, 57.0)
    assert r1_map("cars196", "vit_b16") == (91.2, 35.0)
    assert r1_map("sop", "vit_b16") == (86.8, 53.8)
    assert r1_map("inshop", "vit_b16") == (92.5, None)
    assert r1_map("inaturalist", "vit_b16") == (84.5, 48.1)
    table1 = {r.name: r for r in published.PUBLISHED if r.source == "Table 1"}
    assert table1["VPTSP-G (B)"].metrics["params_trainable_m"] == 1.56
    assert table1["VPTSP-G (B)"].method == frozenset({"vptsp_g", "bitfit"})
    latency = {r.name: r.metrics for r in published.PUBLISHED if r.source == "Table 10"}
    assert latency["VPTSP"] == {"latency_ms@32": 166, "latency_ms@64": 260}


# --- LaTeX compiles ------------------------------------------------------------------------

SPECIALS_LABEL = "A_b & c #1 (50%) ~x^y {z} $5 ± α"


@pytest.fixture(scope="module")
def latex_tables(results_root, tmp_path_factory) -> dict[str, Path]:
    """One .tex per kind, plus a table whose label is full of LaTeX specials."""
    out = tmp_path_factory.mktemp("tex")
    specials = tmp_path_factory.mktemp("specials") / "specials"
    key = {"dataset": "cub200", "backbone": "vit_s16", "method": "bitfit", "label": SPECIALS_LABEL, "seed": 0}
    fx.write(specials, fx.result(key, 0.8, 0.4, reason=None))
    sources = {"table1": "table1", "table2": "table2", "generic": "table2", "latency": "latency",
               "ablation_alpha": "ablation_alpha", "ablation_accumulator": "ablation_accumulator"}
    paths = {}
    for kind, suite in sources.items():
        table = build_table(load_suite(results_root / suite), kind, oracle=True)
        paths[kind] = write_table(table, out / kind)["tex"]
    table = build_table(load_suite(specials), "table1")
    table.kind = "specials"
    paths["specials"] = write_table(table, out / "specials")["tex"]
    return paths


def test_latex_specials_are_escaped():
    assert tex("50% a_b & #1") == r"50\% a\_b \& \#1"
    assert tex("± Δ α") == r"$\pm$ $\Delta$ $\alpha$"
    assert tex("é") == "e"  # pdflatex-safe ASCII fallback


@pytest.mark.parametrize("kind", ["table1", "table2", "generic", "latency", "ablation_alpha",
                                  "ablation_accumulator", "specials"])
def test_latex_compiles(kind, latex_tables, tmp_path):
    pdflatex = shutil.which("pdflatex")
    if pdflatex is None:
        pytest.skip("pdflatex not installed: run `bash scripts/ci-deps.sh` (texlive-latex-base and "
                    "texlive-latex-recommended for booktabs)")
    table = latex_tables[kind]
    doc = tmp_path / "doc.tex"
    doc.write_text("\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n"
                   f"\\input{{{table.as_posix()}}}\n\\end{{document}}\n")
    run = subprocess.run([pdflatex, "-interaction=nonstopmode", "-halt-on-error", doc.name],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout[-2000:]
    assert (tmp_path / "doc.pdf").stat().st_size > 0


# --- figures -------------------------------------------------------------------------------

def _check_axes(fig) -> None:
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert visible
    for ax in visible:
        twin = len(ax.get_shared_x_axes().get_siblings(ax)) > 1 and not ax.get_title()
        if twin:  # a second y axis (the cost panel's parameters): its own label, the rest is its host's
            assert ax.get_ylabel()
            continue
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
    assert fig.legends or any(ax.get_legend() for ax in visible)


def test_figures_have_labels_and_files(report, results_root):
    figures = make_figures(load_suite(results_root / "table1"), "table1")
    assert set(figures) == {"acc_vs_params", "acc_vs_memory", "curves_cub200", "latency"}
    for fig in figures.values():
        _check_axes(fig)
    params_ax = figures["acc_vs_params"].axes[0]
    assert params_ax.get_xscale() == "log" and "parameters" in params_ax.get_xlabel()
    assert "Pareto front" in [t.get_text() for t in figures["acc_vs_params"].legends[0].get_texts()]
    for stem in figures:
        for ext in ("png", "pdf"):
            path = report[f"figures/{stem}.{ext}"]
            assert path.exists() and path.stat().st_size > 1000


@pytest.mark.parametrize("suite, expected", [
    ("ablation_alpha", {"ablation_proxy_bias_ratio", "curves_cub200", "curves_cars196"}),
    ("latency", {"latency"}),
    ("ablation_accumulator", {"ablation_accumulator", "acc_vs_params", "acc_vs_memory", "curves_cub200",
                              "latency"}),
])
def test_other_figures(results_root, suite, expected):
    res = load_suite(results_root / suite)
    figures = make_figures(res, default_kind(suite, res.cells))
    assert set(figures) == expected
    for fig in figures.values():
        _check_axes(fig)


def test_pareto_front():
    x = [0.2, 0.3, 1.4, 1.6, 22.0]
    y = [84.6, 85.8, 86.8, 83.2, 85.5]
    assert list(pareto_front(pd.Series(x).to_numpy(), pd.Series(y).to_numpy())) == [0, 1, 2]


# --- summary page and terminal --------------------------------------------------------------

def test_index_links_every_output(report):
    index = report["index.md"]
    text = index.read_text()
    for name, path in report.items():
        if name != "index.md":
            assert f"({name})" in text, name
            assert (index.parent / name).exists()
    assert "Failed and missing cells" in text and fx.FAILED_REASON in text
    assert "last epoch" in text


def test_print_summary():
    console = Console(record=True, width=120)
    frame = pd.DataFrame([
        {"cell_id": "a", "status": "ok", "dataset": "cub200", "backbone": "vit_s16", "method": "bitfit",
         "seed": 0, "recall@1": 0.8, "map@r": 0.4},
        {"cell_id": "b", "status": "failed", "dataset": "cub200", "backbone": "vit_s16", "method": "lora", "seed": 0},
        {"cell_id": "c", "status": "missing", "dataset": "cub200", "backbone": "vit_s16", "method": "lora", "seed": 1},
    ])
    results = load.SuiteResults("s", Path("."), frame, pd.DataFrame(), axes=["dataset", "backbone", "method", "seed"])
    load.add_display_columns(results.cells)
    print_summary(results, console)
    text = console.export_text()
    assert "3 cells: 1 ok, 1 failed, 1 missing" in text
    assert "BitFit" in text and "80.0" in text


# --- command line, without torch -----------------------------------------------------------

# A sitecustomize on PYTHONPATH runs before run_suite.py: torch & co. (and submitit) cannot be
# imported, and at exit the imported modules are written down (tests/no_torch.py).
NO_TORCH = sitecustomize(HEAVY + ("submitit",))


def _run_cli(args, tmp_path, modules_out=None):
    env = dict(os.environ)
    if modules_out is not None:
        (tmp_path / "site").mkdir(exist_ok=True)
        (tmp_path / "site" / "sitecustomize.py").write_text(NO_TORCH)
        env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "site"), str(REPO)])
        env["MODULES_OUT"] = str(modules_out)
    env["MPLBACKEND"] = "Agg"
    return subprocess.run([sys.executable, str(REPO / "run_suite.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_report_without_torch(results_root, tmp_path):
    out = tmp_path / "out"
    modules = tmp_path / "modules.json"
    run = _run_cli(["report", "table1", "--results", str(results_root), "--out", str(out)], tmp_path, modules)
    assert run.returncode == 0, run.stderr
    assert (out / "index.md").exists() and (out / "tables" / "table1.tex").exists()
    assert "14 ok" in run.stdout and "index.md" in run.stdout
    loaded = json.loads(modules.read_text())
    assert not [m for m in loaded if m.split(".")[0] in ("torch", "timm", "faiss", "torchvision")]
    bench_modules = {m for m in loaded if m == "bench" or m.startswith("bench.")}
    assert bench_modules <= {"bench", "bench.results", "bench.errors", "bench.catalog", "bench.metrics", "bench.cell_files"}


def test_cli_unknown_suite_is_one_clear_error(results_root, tmp_path):
    run = _run_cli(["report", "nosuch", "--results", str(results_root)], tmp_path)
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and str(results_root / "nosuch") in lines[0]
    with pytest.raises(UserError):
        resolve_suite_dir("nosuch", results_root)
    assert issubclass(ReportError, UserError)


def test_pretraining_figure_shows_what_each_backbone_costs_and_trains(tmp_path):
    """The backbone ablation's figure: R@1, MAP@R, step latency and trainable parameters."""
    from report.plots import fig_backbones

    suite_dir = tmp_path / "ablation_pretraining"
    for b, (backbone, params) in enumerate((("vit_s16", 1_000_000), ("dinov2_s14", 1_100_000))):
        for seed in (0, 1):
            key = {"dataset": "cub200", "backbone": backbone, "method": "lora", "seed": seed}
            fx.write(suite_dir, fx.result(key, 0.70 + 0.05 * b + 0.01 * seed, 0.40, params=params,
                                          latency_ms=100.0 + 20 * b))
    figure = fig_backbones(load_suite(suite_dir))
    titles = [ax.get_title() for ax in figure.axes if ax.get_title()]
    assert titles == ["CUB-200: R@1", "CUB-200: MAP@R", "CUB-200: cost per step", "CUB-200: trainable parameters"]
    bars = [patch.get_height() for patch in figure.axes[3].patches]
    assert bars == pytest.approx([1.0, 1.1])  # millions, per backbone

"""What a method learned (issue 15): the cell artifacts (retrieval, attention, proxies,
embeddings) against the metrics and hand computations, their byte-identical reruns and resumes,
the figures drawn from them without torch, and the report page in a real browser."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import run_suite
from bench.artifacts import cls_attention, fixed_queries, npz_bytes
from bench.config import CellConfig
from bench.runner import run_cell
from report import browser, pictures
from tests.tiny import tiny_config

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = ("retrieval.npz", "attention.npz", "proxies.npz", "per_query.npz", "test_embeddings.npy",
             "test_labels.npy")
TINY = tiny_config(epochs=2, method="vptsp_g", method_args={
    "num_prompts": 2, "prompt_depth": 2, "num_class_prompts": 1, "class_prompt_depth": 2})


def load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def cell(synthetic_root, tmp_path_factory):
    cell_dir = tmp_path_factory.mktemp("cell") / "vptsp"
    result = run_cell(CellConfig(dataset="synthetic", data_root=str(synthetic_root), **TINY), cell_dir, key={})
    assert result["status"] == "ok", result["reason"]
    return cell_dir, result


# --- artifacts -----------------------------------------------------------------------------

def test_retrieval_neighbours_agree_with_the_metrics_and_the_embeddings(cell):
    cell_dir, result = cell
    retrieval = load(cell_dir / "retrieval.npz")
    per_query = load(cell_dir / "per_query.npz")
    embeddings = np.load(cell_dir / "test_embeddings.npy").astype(np.float32)
    labels = np.load(cell_dir / "test_labels.npy")
    queries = retrieval["query_index"]
    assert len(queries) == 32 and len(set(queries.tolist())) == 32
    assert set(queries.tolist()) <= set(per_query["query_index"].tolist())  # scored queries only
    # brute force: the ten most similar other images, best first
    for row, q in enumerate(queries):
        sims = embeddings @ embeddings[q]
        sims[q] = -np.inf
        order = np.argsort(-sims, kind="stable")[:10]
        assert np.allclose(np.sort(sims[order])[::-1], retrieval["neighbour_similarity"][row], atol=2e-3)
        assert q not in retrieval["neighbour_index"][row]
    assert np.all(np.diff(retrieval["neighbour_similarity"], axis=1) <= 1e-6)
    assert np.array_equal(retrieval["neighbour_label"], labels[retrieval["neighbour_index"]])
    # top-1 hits are exactly the per-query R@1 records of the same queries
    position = {int(q): i for i, q in enumerate(per_query["query_index"])}
    r_at_1 = per_query["hit_at_k"][[position[int(q)] for q in queries], 0]
    assert np.array_equal(retrieval["neighbour_label"][:, 0] == retrieval["query_label"], r_at_1)
    root = Path(str(retrieval["root"]))
    assert all((root / str(p)).is_file() for p in retrieval["neighbour_path"].ravel())


def test_the_same_queries_for_every_cell_of_a_dataset():
    scored = np.arange(3, 500, 2)
    assert np.array_equal(fixed_queries("cub200", scored, 32), fixed_queries("cub200", scored, 32))
    assert not np.array_equal(fixed_queries("cub200", scored, 32), fixed_queries("cars196", scored, 32))
    assert np.all(np.isin(fixed_queries("sop", scored, 32), scored))


def test_saved_test_embeddings_rescore_to_the_cell_metrics(cell, capsys):
    cell_dir, result = cell
    code = run_suite.main(["evaluate", str(cell_dir / "test_embeddings.npy"), str(cell_dir / "test_labels.npy"),
                           "--k", "1", "2", "4", "8", "--json"])
    assert code == 0
    rescored = json.loads(capsys.readouterr().out)
    for metric in ("recall@1", "recall@2", "recall@4", "recall@8", "map@r"):
        # float16 storage: near-ties of this barely trained model may flip, a query or two of 160
        assert abs(rescored[metric] - result["final"]["test"][metric]) <= 2.0 / 160 + 1e-9


def test_attention_rows_are_distributions_over_the_patches(cell):
    cell_dir, _ = cell
    attention = load(cell_dir / "attention.npz")
    assert attention["rollout"].shape == attention["last_block"].shape == (8, 4, 4)  # 32 px, patch 8
    for kind in ("rollout", "last_block"):
        assert np.allclose(attention[kind].reshape(8, -1).sum(1), 1.0, atol=1e-5)
        assert (attention[kind] >= 0).all()
    retrieval = load(cell_dir / "retrieval.npz")
    assert np.array_equal(attention["image_index"], retrieval["query_index"][:8])


def test_rollout_leaves_out_prompts_and_renormalises_by_hand():
    torch.manual_seed(0)
    prefix, prompts, patches = 1, 2, 4
    n = prefix + prompts + patches
    maps = [torch.softmax(torch.randn(1, n, n), dim=-1) for _ in range(3)]
    last, rollout = cls_attention(maps, prefix, patches)
    keep = [0, 3, 4, 5, 6]  # CLS and the patches; the two prompts (1, 2) dropped
    cleaned = []
    for a in maps:
        a = a[0].numpy()[np.ix_(keep, keep)]
        cleaned.append(a / a.sum(1, keepdims=True))
    expected_last = cleaned[-1][0, 1:] / cleaned[-1][0, 1:].sum()
    joint = np.eye(5)
    for a in cleaned:
        step = 0.5 * a + 0.5 * np.eye(5)
        joint = (step / step.sum(1, keepdims=True)) @ joint
    expected_rollout = joint[0, 1:] / joint[0, 1:].sum()
    assert np.allclose(last[0].numpy(), expected_last, atol=1e-6)
    assert np.allclose(rollout[0].numpy(), expected_rollout, atol=1e-6)


def test_proxies_hold_the_mix_of_bias_and_memory_and_exact_class_means(cell, synthetic_root):
    cell_dir, result = cell
    proxies = load(cell_dir / "proxies.npz")
    ratio = float(proxies["proxy_bias_ratio"])
    assert np.allclose(proxies["proxies"], ratio * proxies["bias"] + (1 - ratio) * proxies["memory"], atol=1e-6)
    assert np.allclose(np.linalg.norm(proxies["memory"], axis=1), 1.0, atol=1e-5)  # rows on the sphere
    assert np.allclose(np.linalg.norm(proxies["class_mean"], axis=1), 1.0, atol=1e-5)
    from bench.artifacts import CLASS_MEAN_IMAGES

    classes = result["data"]["splits"]["train"]["classes"]
    assert proxies["class_count"].tolist() == [CLASS_MEAN_IMAGES] * classes  # 20 per class in the data
    alignment = pictures.proxy_alignment(proxies)
    assert alignment.shape == (result["data"]["splits"]["train"]["classes"],)
    assert np.all(np.abs(alignment) <= 1 + 1e-6)


def test_artifacts_are_identical_on_rerun_and_after_a_resume(cell, synthetic_root, tmp_path):
    cell_dir, _ = cell
    config = CellConfig(dataset="synthetic", data_root=str(synthetic_root), **TINY)
    again = tmp_path / "again"
    assert run_cell(config, again, key={})["status"] == "ok"

    class Stop(Exception):
        pass

    def stop_after_first_epoch(event):
        if event["event"] == "epoch_end" and event["epoch"] == 1:
            raise Stop

    resumed = tmp_path / "resumed"
    assert run_cell(config, resumed, key={}, progress=stop_after_first_epoch)["status"] == "failed"
    assert (resumed / "checkpoint.pt").exists() and not (resumed / "retrieval.npz").exists()
    assert run_cell(config, resumed, key={})["status"] == "ok"
    for name in ARTIFACTS:
        original = (cell_dir / name).read_bytes()
        assert (again / name).read_bytes() == original, f"{name} differs on rerun"
        assert (resumed / name).read_bytes() == original, f"{name} differs after a resume"


def test_class_sample_keeps_the_first_images_of_each_class():
    from bench.artifacts import class_sample
    from bench.data import Split

    split = Split([f"img{i}" for i in range(9)], np.array([2, 0, 2, 1, 0, 2, 0, 0, 2]), ["a", "b", "c"])
    sample = class_sample(split, per_class=2)
    assert sample.paths == ["img0", "img1", "img2", "img3", "img4"] and sample.labels.tolist() == [2, 0, 2, 1, 0]


def test_npz_bytes_do_not_depend_on_the_clock(monkeypatch):
    arrays = {"a": np.arange(5), "b": np.array(["x", "yz"])}
    first = npz_bytes(arrays)
    import time

    monkeypatch.setattr(time, "time", lambda: 2_000_000_000.0)
    assert npz_bytes(arrays) == first


def test_save_embeddings_false_writes_none(synthetic_root, tmp_path):
    config = CellConfig(dataset="synthetic", data_root=str(synthetic_root), save_embeddings=False,
                        **{**TINY, "method": "linear_probe", "method_args": {}, "epochs": 1})
    assert run_cell(config, tmp_path / "cell", key={})["status"] == "ok"
    assert not (tmp_path / "cell" / "test_embeddings.npy").exists()
    assert (tmp_path / "cell" / "proxies.npz").exists() and (tmp_path / "cell" / "retrieval.npz").exists()


# --- figures and the page ------------------------------------------------------------------

SUITE = """
name: pictures
description: "Pictures test: three methods, one seed"
grid:
  method:
    - zero_shot
    - linear_probe
    - {name: vptsp_g, args: {num_prompts: 2, prompt_depth: 2, num_class_prompts: 1, class_prompt_depth: 2}}
  seed: [0]
defaults: {dataset: synthetic, data_root: DATA, backbone: vit_test, weights: none, image_size: 32,
           embedding_size: 16, epochs: 2, max_steps_per_epoch: 3, batch_size: 8, samples_per_class: 2,
           optimizer: adamw, lr: 1.0e-3, num_workers: 0, device: cpu, eval_batch_size: 64}
protocol: {val_fraction: 0.0, selection: last}
"""


@pytest.fixture(scope="module")
def report_dir(synthetic_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("pictures")
    suite = base / "pictures.yaml"
    suite.write_text(SUITE.replace("DATA", str(synthetic_root)))
    code = run_suite.main(["run", str(suite), "--executor", "local", "--out", str(base / "results")])
    assert code == 0
    return base / "results" / "pictures" / "report"


def test_the_report_has_every_picture_and_each_img_resolves(report_dir):
    figures = {p.stem for p in (report_dir / "figures").glob("*.png")}
    assert {"retrieval_synthetic_zero_shot_no_training", "retrieval_synthetic_linear_probing", "retrieval_synthetic_vptsp_g",
            "disagreement_synthetic", "attention_synthetic", "attention_last_synthetic", "proxies_synthetic",
            "proxies_pca_synthetic", "curves_synthetic"} <= figures
    page = (report_dir / "index.html").read_text()
    sources = re.findall(r'<img[^>]+src="([^"]+)"', page)
    assert len(sources) >= len(figures)
    assert all((report_dir / src).is_file() for src in sources)
    assert "<script src" not in page and "<link" not in page
    assert "http://" not in re.sub(r"<a [^>]+>", "", page) and "https://" not in re.sub(r"<a [^>]+>", "", page)
    for section in ("Retrievals", "Attention", "Semantic proxies", "Provenance", "Failed and missing cells"):
        assert f">{section}</h" in page
    assert "Learning curves" in page


def test_proxy_figures_leave_out_the_zero_shot_row(report_dir):
    page = (report_dir / "index.md").read_text()
    assert "proxies_synthetic.png" in page
    suite_dir = report_dir.parent
    from report.load import load_suite

    reps = pictures.representatives(load_suite(suite_dir), "synthetic")
    assert [r.method for r in reps] == ["zero_shot", "linear_probe", "vptsp_g"]
    assert [r.method for r in reps if (r.cell_dir / "proxies.npz").exists()] == ["linear_probe", "vptsp_g"]


def test_figures_say_so_when_the_images_are_not_reachable(report_dir, tmp_path):
    copied = tmp_path / "copied"
    shutil.copytree(report_dir.parent, copied, ignore=shutil.ignore_patterns("report"))
    for npz in copied.glob("*/retrieval.npz"):  # as if copied off a cluster: the root is elsewhere
        data = load(npz)
        data["root"] = np.array("/nonexistent/cluster/data/synthetic")
        npz.write_bytes(npz_bytes(data))
    from report.load import load_suite

    rep = pictures.representatives(load_suite(copied), "synthetic")[0]
    fig = pictures.fig_retrieval(rep, "synthetic")
    texts = [t.get_text() for t in fig.texts] + [t.get_text() for ax in fig.axes for t in ax.texts]
    assert any("images not found under /nonexistent/cluster/data/synthetic" in t for t in texts)
    assert any(t.startswith("#") for t in texts)  # indices drawn instead


def test_pictures_import_no_torch():
    code = ("import sys; import report.pictures, report.html, report.browser; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


@pytest.mark.skipif(browser.find_browser() is None,
                    reason="headless Chromium not installed (Debian: apt-get install chromium; "
                           "scripts/ci-deps.sh installs it)")
def test_the_page_opens_in_headless_chromium_with_no_broken_image(report_dir, tmp_path):
    result = browser.check_page(report_dir / "index.html", tmp_path / "page.png")
    assert result.problems == []
    assert result.images >= 9
    assert result.screenshot.stat().st_size > 20_000
    # the check can fail: a page with one missing image is caught
    broken = report_dir.parent / "broken"
    shutil.copytree(report_dir, broken)
    (broken / "figures" / "attention_synthetic.png").unlink()
    failed = browser.check_page(broken / "index.html")
    assert "image did not load: figures/attention_synthetic.png" in failed.problems
    assert any("attention_synthetic.png" in p and "link" in p for p in failed.problems)


DEMO_PAGE = REPO / "results" / "demo" / "report" / "index.html"


@pytest.mark.skipif(browser.find_browser() is None, reason="headless Chromium not installed (Debian: apt-get "
                    "install chromium; scripts/ci-deps.sh installs it)")
@pytest.mark.skipif(not DEMO_PAGE.is_file(), reason=f"no demo report at {DEMO_PAGE}: run `make demo` first "
                    "(.ci/run runs this test after the demo)")
def test_the_demo_page_opens_in_headless_chromium(tmp_path):
    result = browser.check_page(DEMO_PAGE, REPO / "results" / "demo" / "screenshot.png")
    assert result.problems == []
    figures = {p.stem for p in (DEMO_PAGE.parent / "figures").glob("*.png")}
    near = [s for s in figures if s.startswith("retrieval_synthetic_") and not s.startswith("retrieval_synthetic_far_")]
    far = [s for s in figures if s.startswith("retrieval_synthetic_far_")]
    assert len(near) == 7 and len(far) == 6  # every row of the demo's tables, the controls included
    for target in ("synthetic", "synthetic_far"):
        assert {f"attention_{target}", f"proxies_{target}", f"proxies_pca_{target}", f"disagreement_{target}",
                f"curves_{target}"} <= figures
    assert result.images >= len(figures)

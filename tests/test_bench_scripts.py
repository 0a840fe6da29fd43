"""The GPU benchmark must run where only torch and timm are installed (no faiss, no submitit), and
must work the first time it meets a GPU: its whole path runs here as a CPU dry run."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

BLOCK = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in ('faiss', 'submitit'):
            raise ImportError(f'{name} is not installed here')
sys.meta_path.insert(0, Block())
"""


def test_step_latency_runs_without_faiss_and_submitit():
    code = BLOCK + """
import torch
from benchmarks.step_latency import measure
from benchmarks import bench_gpu  # imports cleanly too
row = measure('vit_test', 'vptsp_g+bitfit', batch_size=8, num_classes=10, embedding_size=16,
              device=torch.device('cpu'), amp=False, steps=2, warmup=1)
assert row['step_ms'] > 0 and row['trainable_params'] > 0
print('ok')
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_bench_gpu_says_when_there_is_no_gpu():
    proc = subprocess.run([sys.executable, "benchmarks/bench_gpu.py", "--methods", "linear_probe"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={"CUDA_VISIBLE_DEVICES": "",
                                                                             "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and "needs a CUDA device" in proc.stderr


def test_bench_gpu_dry_run_on_cpu_writes_rows_tables_and_targets(tmp_path):
    methods = ["full_ft", "linear_probe", "vpt_deep", "vpt_deep+bitfit", "vptsp_g", "vptsp_g+bitfit",
               "vptsp_g+bitfit,proxy_checkpointing=true"]
    argv = ["--allow-cpu", "--backbones", "vit_test", "--batch-sizes", "4", "--steps", "1", "--warmup", "1",
            "--methods", *methods, "--loader-img-s", "1e9",
            "--json", str(tmp_path / "rows.json"), "--markdown", str(tmp_path / "gpu.md")]
    code = BLOCK + f"""
import runpy
sys.argv = ['bench_gpu.py', *{argv!r}]
try:
    runpy.run_path('benchmarks/bench_gpu.py', run_name='__main__')
except SystemExit as exit:
    assert not exit.code, exit.code
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["method"] for r in rows] == methods
    assert all(r["step_ms"] > 0 and r["device"] == "cpu" for r in rows)
    report = (tmp_path / "gpu.md").read_text()
    assert "| vit_test | 4 | vptsp_g+bitfit,proxy_checkpointing=true | False |" in report
    assert "| vptsp_g step <= 1.2x vpt_deep | vit_test | 4 |" in report
    assert "| vptsp_g+bitfit step <= 1.2x vpt_deep+bitfit | vit_test | 4 |" in report
    assert "every PEFT method faster per step than full FT" in report
    assert "| loader img/s >= ViT-S/16 step rate" not in report  # no ViT-S/16 rows in a dry run


def test_method_variants_carry_method_arguments_and_model_options():
    from benchmarks.step_latency import build, parse_variant

    assert parse_variant("vptsp_g+bitfit,proxy_checkpointing=true,compile=true,grad_checkpointing=0") == (
        "vptsp_g+bitfit", {"proxy_checkpointing": True}, {"compile": True, "grad_checkpointing": False})
    learner = build("vptsp_g,proxy_checkpointing=true,grad_checkpointing=true", "vit_test", num_classes=4,
                    embedding_size=8)
    assert learner.model.grad_checkpointing and learner.extras["semantic_proxies"].checkpointing
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        parse_variant("vpt_deep,compile")


@pytest.mark.slow  # kill-and-resume / a whole script: over 10 s on 2 cores; `make test` runs it
def test_gpu_session_script_measures_the_loader_and_hands_its_rate_to_bench_gpu(tmp_path):
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": "", "OUT": str(tmp_path),
           "PYTHON": sys.executable, "BENCH_DATA_EXTRA": "--batches 2 --images-per-class 4", "BENCH_GPU_EXTRA": "--allow-cpu --backbones vit_test --batch-sizes 4 "
           "--methods linear_probe --compile-methods none --steps 1 --warmup 1"}
    proc = subprocess.run(["bash", "benchmarks/gpu_session.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = next(line for line in (tmp_path / "data.md").read_text().splitlines() if "| 4 |" in line)
    rate = row.split("|")[4].strip()
    assert f"data loader on this node: {rate} img/s" in (tmp_path / "gpu.md").read_text()
    assert [r["method"] for r in json.loads((tmp_path / "gpu.json").read_text())] == ["linear_probe"]


@pytest.mark.slow
def test_checkpoint_benchmark_runs_small_and_reads_tables_into_the_model():
    """`make bench`'s checkpoint part on a test ViT with 20,000 classes and 1 MiB tables: the
    loaded copy of the model's tables shows in tables-copy's peak, and not in the current path's."""
    proc = subprocess.run([sys.executable, "benchmarks/bench_checkpoint.py", "--backbone", "vit_test",
                           "--classes", "20000", "--table-mib", "1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r[0].strip(): [float(x) for x in r[1:]] for r in
            (line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| ") and "GiB" not in line)}
    assert list(rows) == ["single-file", "tables-copy", "tables"]
    peak, after = 4, 5  # columns after the mode: save s, size, resume s, RSS before, peak, after
    # the model's tables (proxies, class prompts, memory: 0.11 GiB) are held twice only when copied
    assert rows["tables-copy"][peak] - rows["tables"][peak] >= 0.07
    assert rows["tables"][peak] - rows["tables"][after] <= 0.02

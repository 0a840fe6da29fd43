"""The GPU benchmark must run where only torch and timm are installed (no faiss, no submitit)."""
import subprocess
import sys
from pathlib import Path

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

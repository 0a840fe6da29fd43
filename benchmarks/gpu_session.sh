#!/usr/bin/env bash
# Every GPU figure BENCHMARKS.md lacks, in one call on one GPU node (about 8 minutes):
# loader img/s with the default 4 workers, then bench_gpu.py with compile rows and the target
# table, most important rows first (ViT-S/16 batch 64), stopping new rows after --max-minutes.
# Needs torch and timm (faiss and submitit not needed). Output goes to $OUT (or ./bench-gpu-out).
# BENCH_GPU_EXTRA / BENCH_DATA_EXTRA are appended to bench_gpu.py's / bench_data.py's arguments
# (the tests use them for a short CPU dry run).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt" || true
"$python" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee -a "$out/gpu.txt"
# CUB-sized JPEGs (500 px), full decode: the rate a paper-suite cell sees with the defaults.
"$python" benchmarks/bench_data.py --workers 4 --batches 12 --source-sizes 500 --drafts 0 --resized 0 \
    ${BENCH_DATA_EXTRA:-} | tee "$out/data.md"
# columns: | source px | jpeg_draft | workers | img/s | ...; the first row with 4 workers
loader=$(awk -F'|' '$4 ~ /^ *4 *$/ {gsub(/ /, "", $5); print $5; exit}' "$out/data.md")
"$python" benchmarks/bench_gpu.py --backbones vit_s16 vit_b16 --batch-sizes 64 32 --compile \
    --max-minutes "${MAX_MINUTES:-6}" ${loader:+--loader-img-s "$loader"} \
    --json "$out/gpu.json" --markdown "$out/gpu.md" ${BENCH_GPU_EXTRA:-} 2>&1 | tee "$out/gpu.log"

#!/usr/bin/env bash
# The GPU checks of the recipe in one short run (about 5-8 minutes on one H100/H200), for a lent GPU
# machine (the `device` tool runs it from the repository root and brings back what it writes to $OUT):
#   1. the full recipe's K49-sized epoch time (K49-sized random tensors: the values do not change the cost),
#      eager and with torch.compile;
#   2. the real-data comparison on kmnist-dev (pipeline `full` recipe vs the plain loop, 12 epochs) on the GPU.
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]   (needs .venv with the pinned lock, and ../shared/data)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$out"
python=.venv/bin/python
[ -x "$python" ] || python=python3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
timeout 240 "$python" -m benchmarks.train_throughput --device cuda --steps 50 \
  --out "$out/train_throughput_cuda.json" | tee "$out/train_throughput_cuda.log"
timeout 240 "$python" -m benchmarks.train_throughput --device cuda --steps 50 --compile \
  --out "$out/train_throughput_cuda_compile.json" | tee "$out/train_throughput_cuda_compile.log" || true
timeout 300 "$python" -m benchmarks.real_data --device cuda --out "$out/real_data_cuda.json" \
  | tee "$out/real_data_cuda.log"

#!/usr/bin/env bash
# The GPU check of the recipe in one run of at most 8 minutes on one H200, on the GPU machine as it is: its
# image's python3 (torch 2.11), pydantic & co. from the carried .whl/, the data from the carried .device/.
#   1. the full recipe's K49-sized epoch time (K49-sized random tensors on the GPU: the values do not change
#      the cost): bf16 + channels-last eager, the same with torch.compile, and fp32 eager, interleaved; then
#      gathering + augmentation against the step alone;
#   2. the full recipe on kmnist-60k (validated run on 45,000, refit on all 50,000 train images) for as many
#      epochs as fit, scored on its 10,000 dev-test images (never trained on), and the plain loop beside it.
# Prepare here: make device-wheels device-data. The one command for the device tool: benchmarks/GPU.md.
# Usage: bash benchmarks/gpu_check.sh [--dry-run] [OUT_DIR]
#   --dry-run (make device-dry-run, tests/test_device_check.py): the same entry points on the CPU with tiny
#   sizes, every import limited to the image's packages plus the carried wheels (benchmarks/device_guard.py).
set -uo pipefail
cd "$(dirname "$0")/.."
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
out="${1:-${OUT:-benchmarks/results}}"
data="${DEVICE_DATA:-.device/kmnist-60k}"
mkdir -p "$out"
exec > >(tee "$out/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1
if [ ! -f "$data/params.yaml" ]; then
  echo "gpu_check: $data/params.yaml is missing: run 'make device-data' here and carry .device"; exit 2
fi
if [ "$dry" = 1 ]; then
  python="${PYTHON:-.venv/bin/python}"
  py=("$python" -m benchmarks.device_guard)
  device=cpu suffix=dry_run limit=300
  throughput=(--images 2048 --batch-size 32 --steps 2 --warmup 1) variants=(bf16+cl fp32)
  recipe=(--max-train-per-class 10 --max-test-per-class 10 --budget-s 1 --probe-steps 2 --plain-epochs 1)
  export OMP_NUM_THREADS=1  # tiny steps: a second thread only waits on a shared machine
else
  python="${PYTHON:-python3}"
  if [ -d .whl ]; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl || exit 3
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  py=("$python" -m)
  device=cuda suffix=cuda limit=0
  throughput=(--steps 50 --warmup 10) variants=(bf16+cl bf16+cl+compile fp32)
  recipe=(--budget-s 150 --plain-epochs 20)
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
fi
failed=0
step() {  # step SECONDS NAME ARGS...: one entry point under its time limit; a failure is counted, not fatal
  local seconds=$1 name=$2; shift 2
  [ "$limit" -gt 0 ] && seconds=$limit
  echo "== $name ($(date -u +%H:%M:%S), limit ${seconds}s)"
  timeout "$seconds" "${py[@]}" "$@" || { echo "== $name FAILED (exit $?)"; failed=$((failed + 1)); }
}
params=(--params "$data/params.yaml" --device "$device")
step 170 "K49-sized epoch: variants" benchmarks.train_throughput "${params[@]}" "${throughput[@]}" \
  --variants "${variants[@]}" --out "$out/train_throughput_${suffix}_variants.json"
step 40 "K49-sized epoch: gather + augmentation vs the step" benchmarks.train_throughput "${params[@]}" \
  "${throughput[@]}" --out "$out/train_throughput_${suffix}.json"
step 260 "full recipe on $(basename "$data")" benchmarks.device_check recipe --data "$data" --device "$device" \
  "${recipe[@]}" --out "$out/device_check_${suffix}.json"
echo "== done $(date -u +%H:%M:%S): $failed failed"
exit $((failed > 0))
